"""The fault run's clients (no tests here): buyers on ingress and Stripe, error reporters over
HTTP and on the bus, and the ledger of every answer they got.

Each buyer draws its scenarios from its own generator seeded by the run's seed, so one seed
gives the same sequence of operations (timing aside: how often a retry is needed depends on
the faults). Retry jitter comes from a second generator, so retries never shift the plan.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import nats
import nats.errors

from tests.checkout_support import Api, Resp
from tests.fault_stripe import DECLINED_CARD, GOOD_CARD, StripeBuyer
from tests.harness import CLIENT_TOKEN, CLIENT_TOKEN_2


@dataclass
class Ledger:
    """Every client-visible answer, and the promises among them (a 201 must be durable)."""

    ops: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    holds: dict[str, int] = field(default_factory=dict)              # reservation id -> quantity
    hold_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    intents: dict[str, str] = field(default_factory=dict)            # PaymentIntent -> reservation
    intent_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    errors_acked: set[str] = field(default_factory=set)

    def answer(self, kind: str, r: Resp) -> None:
        self.ops[f"{kind} {r.status}"] += 1
        if r.status >= 500 and r.status not in (503, 504):
            self.violations.append(f"{kind}: HTTP {r.status} {r.body[:300]!r}")
        elif r.status in (429, 503, 504) and "Retry-After" not in r.headers:
            self.violations.append(f"{kind}: HTTP {r.status} without Retry-After "
                                   f"{r.body[:300]!r}")

    def hold_made(self, token: str, key: str | None, rid: str, quantity: int) -> None:
        self.holds[rid] = quantity
        if key is not None:
            first = self.hold_keys.setdefault((token, key), rid)
            if first != rid:
                self.violations.append(f"hold key {key!r} answered two reservations {first} "
                                       f"and {rid}")

    def intent_made(self, token: str, key: str, pi: str, rid: str) -> None:
        self.intents[pi] = rid
        first = self.intent_keys.setdefault((token, key), pi)
        if first != pi:
            self.violations.append(f"Idempotency-Key {key!r} answered two PaymentIntents {first} "
                                   f"and {pi}")


@dataclass
class Sale:
    event_id: str
    capacity: int
    opens_at: float  # seconds into the run


@dataclass
class Workload:
    seed: int
    api: Api
    stripe: StripeBuyer
    ledger: Ledger
    sales: list[Sale]
    ttl: int
    started: float   # monotonic
    end: float       # no new scenario after this (monotonic)
    give_up: float   # a retrying client stops here (monotonic)


SCENARIOS = {"pay": 30, "decline": 8, "late": 8, "cancel": 8, "cancel_then_pay": 5,
             "abandon": 7, "abandon_intent": 6, "key_games": 8, "keyed_hold": 7, "report": 8}


class Buyer:
    def __init__(self, run: Workload, n: int):
        self.run = run
        self.n = n
        self.plan = random.Random(f"{run.seed}/buyer/{n}")
        self.jitter = random.Random(f"{run.seed}/jitter/{n}")
        self.token = CLIENT_TOKEN if n % 2 == 0 else CLIENT_TOKEN_2
        self.keys = 0

    def key(self, what: str) -> str:
        self.keys += 1
        return f"fr-{self.run.seed}-{self.n}-{what}-{self.keys}"

    async def loop(self) -> None:
        names, weights = list(SCENARIOS), list(SCENARIOS.values())
        while time.monotonic() < self.run.end:
            name = self.plan.choices(names, weights)[0]
            sale = self.pick_sale()
            self.run.ledger.ops[f"scenario {name}"] += 1
            await getattr(self, f"do_{name}")(sale)
            await asyncio.sleep(self.plan.uniform(0.05, 0.5))

    def pick_sale(self) -> Sale:
        newest, anyone = self.plan.random(), self.plan.random()  # always two draws
        elapsed = time.monotonic() - self.run.started
        opened = [s for s in self.run.sales if s.opens_at <= elapsed] or self.run.sales[:1]
        return opened[-1] if newest < 0.6 else opened[int(anyone * len(opened))]

    # -- HTTP ------------------------------------------------------------------------------------
    async def ask(self, kind: str, method: str, path: str, *, body: Any = None,
                  key: str | None = None) -> Resp | None:
        try:
            r = await self.run.api.call(method, path, token=self.token, body=body, key=key,
                                        timeout=12.0)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.run.ledger.ops[f"{kind} no answer ({type(exc).__name__})"] += 1
            return None
        self.run.ledger.answer(kind, r)
        return r

    async def until_final(self, kind: str, method: str, path: str, *, body: Any = None,
                          key: str | None = None) -> Resp | None:
        """Retry (same key, same body) while the answer is transient, as a good client does: no
        answer, 429, any 5xx (a 500 is a violation, but the key is safe to retry), 409 in use."""
        while True:
            r = await self.ask(kind, method, path, body=body, key=key)
            if (r is not None and r.status < 500 and r.status != 429
                    and code_of(r) != "idempotency_key_in_use"):
                return r
            if time.monotonic() > self.run.give_up:
                self.run.ledger.ops[f"{kind} gave up"] += 1
                return None
            wait = float(r.headers.get("Retry-After", 1)) if r is not None else 0.5
            await asyncio.sleep(min(wait, 2.0) * self.jitter.uniform(0.3, 1.0))

    async def hold(self, sale: Sale, key: str | None = None, quantity: int | None = None
                   ) -> str | None:
        q = quantity or self.plan.choice((1, 1, 1, 2, 2, 3))
        body = {"event_id": sale.event_id, "quantity": q, "customer_ref": f"buyer-{self.n}"}
        if key is None:  # without a key a retry could hold twice: one attempt
            r = await self.ask("hold", "POST", "/v1/reservations", body=body)
        else:
            r = await self.until_final("hold (keyed)", "POST", "/v1/reservations", body=body,
                                       key=key)
        if r is not None and code_of(r) == "sold_out":  # come back a little later
            await asyncio.sleep(self.jitter.uniform(0.3, 1.0))
        if r is None or r.status != 201:
            return None
        rid = r.json["id"]
        self.run.ledger.hold_made(self.token, key, rid, q)
        return rid

    async def intent(self, rid: str, key: str | None = None) -> str | None:
        key = key or self.key("pi")
        r = await self.until_final("payment_intent", "POST", "/v1/payment_intents",
                                   body={"reservation_id": rid}, key=key)
        return self._intent_answer(r, key, rid)

    def _intent_answer(self, r: Resp | None, key: str, rid: str) -> str | None:
        if r is None or r.status != 201:
            return None
        pi = r.json["id"]
        self.run.ledger.intent_made(self.token, key, pi, rid)
        return pi

    async def confirm(self, pi: str, card: str, why: str) -> None:
        try:
            outcome = await self.run.stripe.pay(pi, card)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = f"failed ({type(exc).__name__})"
        self.run.ledger.ops[f"stripe confirm ({why}): {outcome}"] += 1

    async def cancel(self, rid: str) -> None:
        r = await self.until_final("cancel", "POST", f"/v1/reservations/{rid}/cancel")
        if r is not None and r.status == 200:
            self.run.ledger.cancelled.add(rid)

    # -- scenarios -------------------------------------------------------------------------------
    async def do_pay(self, sale: Sale) -> None:
        if (rid := await self.hold(sale)) and (pi := await self.intent(rid)):
            await self.confirm(pi, GOOD_CARD, "pay")

    async def do_decline(self, sale: Sale) -> None:
        if (rid := await self.hold(sale)) and (pi := await self.intent(rid)):
            await self.confirm(pi, DECLINED_CARD, "decline")  # payment_failed; the hold runs out

    async def do_late(self, sale: Sale) -> None:
        """Pays after the hold's TTL: whatever happens (the PaymentIntent cancelled at the hold's
        end, the tickets taken anew, or the money refunded), the money and the tickets agree."""
        late = self.run.ttl + self.plan.uniform(0.5, 2.5)
        if (rid := await self.hold(sale)) and (pi := await self.intent(rid)):
            await asyncio.sleep(late)
            await self.confirm(pi, GOOD_CARD, "late")

    async def do_cancel(self, sale: Sale) -> None:
        with_intent, twice = self.plan.random() < 0.5, self.plan.random() < 0.3
        if rid := await self.hold(sale):
            if with_intent:
                await self.intent(rid)
            await self.cancel(rid)
            if twice:
                await self.cancel(rid)

    async def do_cancel_then_pay(self, sale: Sale) -> None:
        if (rid := await self.hold(sale)) and (pi := await self.intent(rid)):
            await self.cancel(rid)
            await self.confirm(pi, GOOD_CARD, "cancel_then_pay")

    async def do_abandon(self, sale: Sale) -> None:
        await self.hold(sale)

    async def do_abandon_intent(self, sale: Sale) -> None:
        if rid := await self.hold(sale):
            await self.intent(rid)

    async def do_key_games(self, sale: Sale) -> None:
        """One key sent twice at once, the key reused for another body, a second key for the
        same hold; then pays."""
        other = str(uuid.UUID(int=self.plan.getrandbits(128), version=4))
        rid = await self.hold(sale)
        if rid is None:
            return
        key = self.key("pi-twice")
        body = {"reservation_id": rid}
        both = await asyncio.gather(*(self.ask("payment_intent (concurrent)", "POST",
                                               "/v1/payment_intents", body=body, key=key)
                                      for _ in range(2)))
        pis = {p for r in both if (p := self._intent_answer(r, key, rid))}
        pi = pis.pop() if pis else await self.intent(rid, key)
        r = await self.until_final("payment_intent (key reused)", "POST", "/v1/payment_intents",
                                   body={"reservation_id": other}, key=key)
        if r is not None and r.status < 300:
            self.run.ledger.violations.append(
                f"key {key!r} reused for another reservation answered {r.status}: {r.body[:200]!r}")
        r = await self.until_final("payment_intent (second key)", "POST", "/v1/payment_intents",
                                   body=body, key=self.key("pi-second"))
        if r is not None and r.status == 201 and pi is not None:
            self.run.ledger.violations.append(
                f"reservation {rid} got a second PaymentIntent {r.json['id']} besides {pi}")
        if pi is not None:
            await self.confirm(pi, GOOD_CARD, "key_games")

    async def do_keyed_hold(self, sale: Sale) -> None:
        key, q, pay = self.key("hold"), self.plan.choice((1, 2)), self.plan.random() < 0.6
        rid = await self.hold(sale, key=key, quantity=q)
        if rid is None:
            return
        again = await self.hold(sale, key=key, quantity=q)  # a replay: the same hold
        if again is not None and again != rid:
            return  # recorded as a violation by the ledger
        body = {"event_id": sale.event_id, "quantity": q + 1, "customer_ref": f"buyer-{self.n}"}
        r = await self.until_final("hold (key reused)", "POST", "/v1/reservations", body=body,
                                   key=key)
        if r is not None and r.status < 300:
            self.run.ledger.violations.append(
                f"hold key {key!r} reused with another body answered {r.status}")
        if pay and (pi := await self.intent(rid)):
            await self.confirm(pi, GOOD_CARD, "keyed_hold")

    async def do_report(self, sale: Sale) -> None:
        report = new_report(self.plan, "fault-run-web", f"checkout page failed for {sale.event_id}")
        r = await self.until_final("error report (HTTP)", "POST", "/v1/errors", body=report)
        if r is not None and 200 <= r.status < 300:
            self.run.ledger.errors_acked.add(report["id"])


def code_of(r: Resp) -> str | None:
    """The problem's ``code`` (None for a success or a body that is not problem+json)."""
    try:
        return r.code
    except (ValueError, AttributeError):
        return None


def new_report(rng: random.Random, service: str, message: str) -> dict[str, Any]:
    return {"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "occurred_at": datetime.now(UTC).isoformat(), "service": service,
            "level": rng.choice(("warning", "error", "error", "critical")),
            "message": message, "context": {"fault_run": True}}


async def bus_reporter(run: Workload, nats_url: str | list[str]) -> None:
    """Another process reporting on the bus: ``errors.<service>.<level>``, the report's id as
    ``Nats-Msg-Id``; only a PubAck counts, and an unacknowledged report is sent again."""
    plan = random.Random(f"{run.seed}/bus-reporter")

    async def quiet(_: Exception) -> None:  # the nemesis kills nats-server: expected
        return None

    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                            connect_timeout=2, error_cb=quiet)
    js = nc.jetstream(timeout=2.0)
    ledger = run.ledger
    try:
        n = 0
        while time.monotonic() < run.end:
            n += 1
            report = new_report(plan, "fault-run-worker", f"job {n} failed")
            data = json.dumps(report).encode()
            subject = f"errors.fault-run-worker.{report['level']}"
            sends = 2 if plan.random() < 0.1 else 1  # sometimes sent twice on purpose
            for _ in range(sends):
                while time.monotonic() < run.give_up:
                    try:
                        await js.publish(subject, data, headers={"Nats-Msg-Id": report["id"]})
                    except (TimeoutError, nats.errors.Error, OSError) as exc:
                        ledger.ops[f"error report (bus) not acked ({type(exc).__name__})"] += 1
                        await asyncio.sleep(0.3)
                        continue
                    ledger.ops["error report (bus) acked"] += 1
                    ledger.errors_acked.add(report["id"])
                    break
            await asyncio.sleep(plan.uniform(0.1, 0.5))
    finally:
        await nc.close()
