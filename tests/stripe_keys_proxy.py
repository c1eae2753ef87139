"""A faithful stand-in for Stripe's idempotency-key layer, in front of the localstripe emulator.

localstripe ignores ``Idempotency-Key``; real Stripe (docs.stripe.com/idempotency) keeps, per
account and key, the status and body of the first request and replays them to every retry with
``Idempotent-Replayed: true``; a retry with other parameters is an ``idempotency_error`` (400);
a retry while the first is still running is a 409; a request that failed validation (400) is
not kept. This proxy does exactly that and forwards everything else unchanged.

It also records each request's method, path and key (``requests``), and can be stopped and
started again on the same port, which to its clients is Stripe becoming unreachable and back.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from boxoffice.embedded import free_port

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Seen:
    method: str
    path: str
    idempotency_key: str | None
    replayed: bool = False


@dataclass
class Stored:
    params: bytes
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"
    done: asyncio.Event = field(default_factory=asyncio.Event)


class StripeKeysProxy:
    def __init__(self, upstream: str, port: int | None = None):
        self.upstream = upstream.rstrip("/")
        self.port = port or free_port()
        self.requests: list[Seen] = []
        self._keys: dict[tuple[str, str], Stored] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keys_for(self, path: str) -> list[str | None]:
        return [r.idempotency_key for r in self.requests if r.path == path and r.method == "POST"]

    async def start(self) -> StripeKeysProxy:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        """Close the listener and every open connection: Stripe is now unreachable."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request.headers.get("Idempotency-Key")
        seen = Seen(request.method, request.path, key)
        self.requests.append(seen)
        if request.method != "POST" or key is None:
            status, data, ctype = await self._forward(request, body)
            return web.Response(status=status, body=data, content_type=ctype)
        scope = (request.headers.get("Authorization", ""), key)
        stored = self._keys.get(scope)
        if stored is not None:
            if stored.params != body:
                return stripe_error(400, "idempotency_error",
                              "Keys for idempotent requests can only be used with the same "
                              "parameters they were first used with.")
            if not stored.done.is_set():
                return stripe_error(409, "idempotency_error",
                              "There is currently another in-progress request using this "
                              "Idempotent Key.")
            seen.replayed = True
            return web.Response(status=stored.status, body=stored.body,
                                content_type=stored.content_type,
                                headers={"Idempotent-Replayed": "true"})
        stored = self._keys[scope] = Stored(params=body)
        try:
            status, data, ctype = await self._forward(request, body)
        except BaseException:
            del self._keys[scope]  # no answer: nothing is kept, the retry runs afresh
            raise
        if status in (400, 409):  # validation failures and conflicts are not kept
            del self._keys[scope]
        else:
            stored.status, stored.body, stored.content_type = status, data, ctype
        stored.done.set()
        return web.Response(status=status, body=data, content_type=ctype)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body, headers=headers) as resp:
            data = await resp.read()
            return resp.status, data, resp.content_type or "application/json"


def stripe_error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=json.dumps({"error": {"type": kind, "message": message}}))
