"""Shared helpers of the checkout tests: an HTTP client for ingress and the service pair."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import nats.errors
import nats.js.errors

from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, ServiceProcess


@dataclass
class Resp:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        return self.json.get("code") if self.status >= 400 else None


class Api:
    """Talks to ingress the way a client does."""

    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, *, token: str | None = CLIENT_TOKEN,
                   body: Any = None, raw: bytes | None = None, key: str | None = None,
                   headers: dict[str, str] | None = None, timeout: float = 20.0) -> Resp:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if key is not None:
            hdrs["Idempotency-Key"] = key
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        payload: Any = io.BytesIO(data) if data is not None and len(data) > 512 * 1024 else data
        async with self.session.request(method, self.base + path, data=payload, headers=hdrs,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return Resp(r.status, r.headers, await r.read())

    async def create_event(self, capacity: int, price: int = 2500, buckets: int | None = None,
                           currency: str = "eur") -> str:
        body: dict[str, Any] = {"name": "Test gig", "capacity": capacity, "price": price,
                                "currency": currency}
        if buckets:
            body["buckets"] = buckets
        r = await self.call("POST", "/v1/admin/events", token=ADMIN_TOKEN, body=body)
        assert r.status == 201, r.body
        return r.json["id"]

    async def event(self, event_id: str) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/admin/events/{event_id}", token=ADMIN_TOKEN)
        assert r.status == 200, r.body
        return r.json

    async def hold(self, event_id: str, quantity: int = 1, *, token: str = CLIENT_TOKEN,
                   key: str | None = None, **extra: Any) -> Resp:
        return await self.call("POST", "/v1/reservations", token=token, key=key,
                               body={"event_id": event_id, "quantity": quantity, **extra})

    async def pay(self, reservation_id: str, key: str | None, *, token: str = CLIENT_TOKEN,
                  timeout: float = 20.0) -> Resp:
        return await self.call("POST", "/v1/payment_intents", token=token, key=key,
                               body={"reservation_id": reservation_id}, timeout=timeout)

    async def pay_until_done(self, reservation_id: str, key: str, *, deadline: float = 30.0,
                             token: str = CLIENT_TOKEN) -> tuple[Resp, list[Resp]]:
        """Retry as a well-behaved client does (honouring Retry-After) until a final answer."""
        tried: list[Resp] = []
        end = time.monotonic() + deadline
        while True:
            r = await self.pay(reservation_id, key, token=token)
            tried.append(r)
            if r.status not in (409, 503, 504) or r.code == "payment_intent_exists":
                return r, tried
            assert "Retry-After" in r.headers, (r.status, r.body)
            assert time.monotonic() < end, f"no final answer: {[(t.status, t.code) for t in tried]}"
            await asyncio.sleep(min(float(r.headers["Retry-After"]), 1.0))


@dataclass
class Checkout:
    api: Api
    payment: ServiceProcess
    ingress: ServiceProcess


@dataclass
class StreamMessage:
    subject: str
    data: Any


async def stream_messages(nats_url: str, stream: str, at_least: int = 1
                          ) -> list[StreamMessage] | None:
    """Every message on ``stream`` so far, in order; None while fewer than ``at_least``."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return None
        if info.state.messages < at_least:
            return None
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append(StreamMessage(msg.subject, json.loads(msg.data or b"null")))
        return out
    finally:
        await nc.close()


async def nobody_answers(nats_url: str, subject: str) -> bool:
    """True once NATS itself says no one serves ``subject`` (a killed service's subscription
    lingers until the server notices the dropped connection)."""
    nc = await nats.connect(nats_url)
    try:
        await nc.request(subject, b"{}", timeout=0.5)
    except nats.errors.NoRespondersError:
        return True
    except nats.errors.TimeoutError:
        return False
    finally:
        await nc.close()
    return False


def start_checkout(start_service: Callable[..., ServiceProcess], http: aiohttp.ClientSession,
                   **payment_env: str) -> Checkout:
    payment = start_service("payment", **payment_env)
    ingress = start_service("ingress")
    return Checkout(api=Api(http, ingress.url), payment=payment, ingress=ingress)
