"""Stripe around the fault run (no tests here): what localstripe lacks, as small proxies.

- ``FlakyStripe``: the idempotency-key layer of ``StripeKeysProxy`` in front of localstripe, plus
  Stripe's bad moments on the services' calls: a connection reset before the request is seen,
  a 500 before it is seen, a slow answer (the work is done, the answer late), or an answer cut
  mid-body (the work is done, the answer lost). Always a little, often during a "flaky" window.
- ``WebhookRelay``: Stripe's delivery machinery. localstripe delivers each event once, to the
  relay, which then delivers it to ingress as Stripe does: signed afresh at each attempt,
  retried with back-off until a 2xx, sometimes twice, sometimes held back and released later
  (so events arrive out of order).
- ``StripeBuyer``: the buyer's side of Stripe (what Stripe.js does): a card attached and the
  PaymentIntent confirmed, straight at localstripe.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from boxoffice.embedded import free_port
from tests.harness import STRIPE_KEY
from tests.stripe_keys_proxy import StripeKeysProxy

SLOW = web.RequestKey("slow", float)
GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"  # attaches, then the charge is declined


class FlakyStripe(StripeKeysProxy):
    """The keys proxy, misbehaving with probability ``rate`` per request."""

    BASE_RATE = 0.03
    FLAKY_RATE = 0.5

    def __init__(self, upstream: str, rng: random.Random):
        super().__init__(upstream)
        self.rng = rng
        self.windows = 0  # flaky windows open now (they may overlap)
        self.faults: Counter[str] = Counter()

    @property
    def rate(self) -> float:
        return self.FLAKY_RATE if self.windows else self.BASE_RATE

    def _pick(self) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        return self.rng.choice(("reset", "error_500", "slow", "cut"))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._pick()
        if fault is not None:
            self.faults[fault] += 1
        if fault == "reset":  # the connection drops before Stripe saw anything
            await request.read()
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)
        if fault == "error_500":
            await request.read()
            return web.json_response({"error": {"type": "api_error",
                                                "message": "An unknown error occurred"}},
                                     status=500)
        if fault == "slow":
            request[SLOW] = self.rng.uniform(2.0, 7.0)
        resp = await super()._handle(request)
        if fault != "cut" or not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
            return resp
        # the work is done (and kept under its key), the answer is lost half-way
        body = resp.body
        cut = web.StreamResponse(status=resp.status, headers={"Content-Type": "application/json"})
        cut.content_length = len(body)
        await cut.prepare(request)
        await cut.write(body[:len(body) // 2])
        if request.transport is not None:
            request.transport.abort()
        return cut

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        delay = request.get(SLOW)
        if delay:  # Stripe is working on it (the key is in flight) and takes its time
            await asyncio.sleep(delay)
        return await super()._forward(request, body)


def sign(body: bytes, secret: str, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class WebhookRelay:
    """Receives localstripe's webhooks and delivers them to ``target`` the way Stripe does."""

    TWICE = 0.15      # delivered a second time after it was accepted, or concurrently
    HELD_BACK = 0.15  # first attempt delayed 2-8 s: later events overtake it
    ATTEMPT_TIMEOUT = 5.0

    def __init__(self, target: str, secret: str, rng: random.Random):
        self.target = target
        self.secret = secret
        self.rng = rng
        self.port = free_port()
        self.received: dict[str, str] = {}  # event id -> type, as localstripe sent them
        self.accepted: set[str] = set()      # answered 2xx by ingress at least once
        self.answers: Counter[str] = Counter()
        self.shaped: Counter[str] = Counter()
        self.violations: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stripe-webhooks"

    async def start(self) -> WebhookRelay:
        # a fresh connection per attempt, as a webhook sender does (and no stale keep-alive)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application()
        app.router.add_post("/stripe-webhooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = json.loads(body)
        self.received[event["id"]] = event["type"]
        first = self.rng.uniform(2.0, 8.0) if self.rng.random() < self.HELD_BACK else 0.0
        if first:
            self.shaped["held_back"] += 1
        self._spawn(self._deliver(event["id"], body, first))
        if self.rng.random() < self.TWICE:
            self.shaped["twice"] += 1
            self._spawn(self._deliver(event["id"], body, first + self.rng.uniform(0.0, 3.0)))
        return web.json_response({"received": True})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event_id: str, body: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        attempt = 0
        while True:
            status = await self._attempt(event_id, body)
            if 200 <= status < 300:
                self.accepted.add(event_id)
                return
            attempt += 1
            await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt) * self.rng.uniform(0.8, 1.2))

    async def _attempt(self, event_id: str, body: bytes) -> int:
        assert self._session is not None
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "Stripe-Signature": sign(body, self.secret)}
        try:
            async with self._session.post(
                    self.target, data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.ATTEMPT_TIMEOUT)) as r:
                await r.read()
                status, retry_after = r.status, r.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.answers["no answer" if isinstance(exc, asyncio.TimeoutError)
                         else "connection failed"] += 1
            return 0
        self.answers[str(status)] += 1
        if status >= 500 and (status not in (503, 504) or not retry_after):
            self.violations.append(f"webhook delivery of {event_id}: HTTP {status}"
                                   f"{'' if retry_after else ' without Retry-After'}")
        elif 400 <= status < 500:
            self.violations.append(f"webhook delivery of {event_id} refused: HTTP {status}")
        return status


class StripeBuyer:
    """The buyer's browser talking to Stripe: attach a card to a PaymentIntent and confirm it."""

    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session = session
        self.base = base.rstrip("/")

    async def _call(self, method: str, path: str, form: dict[str, str] | None = None
                    ) -> tuple[int, Any]:
        async with self.session.request(
                method, self.base + path, data=form,
                headers={"Authorization": f"Bearer {STRIPE_KEY}"},
                timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status, await r.json(content_type=None)

    async def pay(self, payment_intent_id: str, card: str) -> str:
        """'succeeded', 'declined', or 'refused <status>' (not confirmable, say)."""
        status, pm = await self._call("POST", "/v1/payment_methods", {
            "type": "card", "card[number]": card, "card[exp_month]": "12",
            "card[exp_year]": "2030", "card[cvc]": "123"})
        if status != 200:
            return f"card refused {status}"
        status, _ = await self._call("POST", f"/v1/payment_intents/{payment_intent_id}",
                                     {"payment_method": pm["id"]})
        if status != 200:
            return f"update refused {status}"
        status, pi = await self._call("POST", f"/v1/payment_intents/{payment_intent_id}/confirm")
        if status == 402:
            return "declined"
        if status != 200:
            _, now = await self._call("GET", f"/v1/payment_intents/{payment_intent_id}")
            return f"refused {status} ({now.get('status')})"
        return str(pi["status"])

    async def count(self, path: str) -> int:
        status, page = await self._call("GET", path + "?limit=1")
        assert status == 200, (path, status, page)
        return int(page["total_count"])

    async def list_all(self, path: str) -> list[dict[str, Any]]:
        """Every object of a list endpoint, page by page."""
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = f"?limit=100{f'&starting_after={after}' if after else ''}"
            status, page = await self._call("GET", path + query)
            assert status == 200, (path, status, page)
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return out
            after = page["data"][-1]["id"]
