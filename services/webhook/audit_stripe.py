"""The Stripe check: our books agree with Stripe's.

- Every PaymentIntent at Stripe that carries our metadata (``reservation_id``) is known to us
  (a ``payments`` row) under at most one idempotency key (``payment_intents_log``).
- Our status for it agrees with Stripe's, at the level that matters: money taken (succeeded,
  refunded, disputed on our side), cancelled, or still open.
- Every refund at Stripe is recorded (a full refund: the payment is refunded; a partial one is
  named, since boxoffice keeps the sale and records none), and every refund we recorded exists.

Events in flight explain a difference for a while: a PaymentIntent, refund or Stripe event
younger than ``AUDIT_GRACE_SECONDS``, or a refund or cancel we decided and have not made yet
(``stripe_actions`` pending). Anything else is looked at once more, fresh from Stripe and from
the database, before it is called a violation, so a race between the two reads is never one.

An incremental run lists what Stripe created since its checkpoint, less the grace
(PaymentIntents, refunds, and events for what changed on older PaymentIntents), and the payments
we changed since; a full pass lists everything Stripe has. Stripe's lists filter on ``created``
and page with ``starting_after`` (docs.stripe.com/api/pagination).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from boxoffice.audit import Checkpoint, Examination, Violation
from boxoffice.webhook.audit_stripe_reads import StripeReads

PAID = ("succeeded", "refunded", "disputed")
CONCURRENCY = 8


def stripe_class(status: str | None) -> str:
    return "paid" if status == "succeeded" else ("canceled" if status == "canceled" else "open")


def our_class(status: str) -> str:
    return "paid" if status in PAID else ("canceled" if status == "canceled" else "open")


def refunded(refunds: list[dict[str, Any]]) -> int:
    """What Stripe gave back, or is giving back (a pending refund is one we cannot undo)."""
    return sum(int(r.get("amount") or 0) for r in refunds
               if r.get("status") in ("succeeded", "pending", "requires_action"))


@dataclass
class Ours:
    """What the database says of one PaymentIntent."""

    status: str | None = None       # None: no payments row
    amount: int | None = None
    reservation_id: str | None = None
    keys: int = 0                   # idempotency keys naming it (within their retention)
    pending_action: bool = False    # a refund or cancel decided, not yet made

    def compare(self, pi: str, intent: dict[str, Any], refunds: list[dict[str, Any]] | None
                ) -> list[Violation]:
        """Where our books and Stripe's differ about one PaymentIntent of ours."""
        at_stripe = f"{intent.get('status')} at Stripe"
        meta = (intent.get("metadata") or {}).get("reservation_id")
        ids = {"payment_intent_id": pi, "reservation_id": self.reservation_id or meta}
        subject = f"PaymentIntent {pi}"
        if self.status is None:
            return [Violation("unknown_payment_intent", subject, ids,
                              "recorded by boxoffice under one idempotency key",
                              f"{at_stripe} ({intent.get('amount')} {intent.get('currency')}), "
                              "unknown to boxoffice")]
        out = []
        if self.keys > 1:
            out.append(Violation("two_keys", subject, ids, "one idempotency key",
                                 f"{self.keys} idempotency keys name it"))
        if stripe_class(intent.get("status")) != our_class(self.status):
            out.append(Violation("status_mismatch", subject, ids, at_stripe,
                                 f"{self.status} in boxoffice"))
        if refunds is not None:
            back, amount = refunded(refunds), int(intent.get("amount") or 0)
            if back >= amount > 0 and self.status != "refunded":
                out.append(Violation("refund_not_recorded", subject, ids,
                                     f"refunded in boxoffice (Stripe refunded {back} of {amount})",
                                     f"{self.status} in boxoffice"))
            elif self.status == "refunded" and back < amount:
                out.append(Violation("refund_missing_at_stripe", subject, ids,
                                     f"a refund of {amount} at Stripe (boxoffice says refunded)",
                                     f"{back} refunded at Stripe"))
            elif 0 < back < amount:
                out.append(Violation("partial_refund", subject, ids,
                                     "a full refund or none (boxoffice records no partial refund)",
                                     f"{back} of {amount} refunded at Stripe, "
                                     f"{self.status} in boxoffice"))
        return out


@dataclass
class Seen:
    """What Stripe says of one PaymentIntent: the intent (None: no such PaymentIntent) and its
    refunds (None: not looked up)."""

    intent: dict[str, Any] | None
    refunds: list[dict[str, Any]] | None = None
    last_event: int = 0             # the newest Stripe event about it, unix time


@dataclass
class Window:
    now: int
    lo: int | None                  # None: everything
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    last_event: dict[str, int] = field(default_factory=dict)


OURS = """
SELECT p.payment_intent_id AS pi, p.status, p.amount, p.reservation_id::text,
       (SELECT count(*) FROM payment_intents_log l
        WHERE l.stripe_payment_intent_id = p.payment_intent_id) AS keys,
       EXISTS (SELECT 1 FROM stripe_actions s WHERE s.payment_intent_id = p.payment_intent_id
               AND s.status = 'pending') AS pending_action
FROM payments p WHERE p.payment_intent_id = ANY($1::text[])
UNION ALL
SELECT x.pi, NULL, NULL, NULL,
       (SELECT count(*) FROM payment_intents_log l WHERE l.stripe_payment_intent_id = x.pi),
       EXISTS (SELECT 1 FROM stripe_actions s WHERE s.payment_intent_id = x.pi
               AND s.status = 'pending')
FROM unnest($1::text[]) AS x(pi)
WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.payment_intent_id = x.pi)
"""


class StripeCheck:
    name = "stripe"

    def __init__(self, pool: asyncpg.Pool, reads: StripeReads, *, grace: float,
                 timeout: float = 600.0):
        self.pool = pool
        self.stripe = reads
        self.grace = int(grace)
        self.timeout = timeout

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        now = int(time.time())
        w = Window(now=now, lo=None if since is None else int(since["since"]) - self.grace)
        await self._stripe_side(w)
        reopened = {i["payment_intent_id"] for i in reopen if i.get("payment_intent_id")}
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            if w.lo is None:
                changed = [r["payment_intent_id"] for r in await conn.fetch(
                    "SELECT payment_intent_id FROM payments", timeout=self.timeout)]
            else:
                changed = [r["payment_intent_id"] for r in await conn.fetch(
                    "SELECT payment_intent_id FROM payments WHERE updated_at >= $1",
                    datetime.fromtimestamp(w.lo, UTC), timeout=self.timeout)]
            candidates = (set(w.intents) | set(w.refunds) | set(w.last_event) | set(changed)
                          | reopened)
            ours = await self._ours(conn, sorted(candidates))
        seen = await self._seen(w, candidates, ours, reopened)
        out = Examination(checkpoint={"since": now})
        suspects: list[str] = []
        for pi in sorted(candidates):
            verdict = self.judge(pi, ours[pi], seen[pi], now)
            if verdict == "in_flight":
                out.in_flight += 1
            elif verdict:
                suspects.append(pi)
            out.examined += seen[pi].intent is not None or ours[pi].status is not None
        if suspects:  # a second, fresh look: Stripe first, then the database
            fresh = {pi: await self._fresh(pi) for pi in suspects}
            for pi in suspects:
                fresh[pi].last_event = seen[pi].last_event
            async with self.pool.acquire() as conn:
                again = await self._ours(conn, suspects)
            for pi in suspects:
                verdict = self.judge(pi, again[pi], fresh[pi], int(time.time()))
                if verdict == "in_flight":
                    out.in_flight += 1
                elif isinstance(verdict, list):
                    out.violations += verdict
        return out

    # -- what each side says --------------------------------------------------------------------
    async def _stripe_side(self, w: Window) -> None:
        for intent in await self.stripe.intents(w.lo):
            w.intents[intent["id"]] = intent
        for refund in await self.stripe.refunds(w.lo):
            pi = await self.stripe.refund_intent(refund)
            if pi is not None:
                w.refunds[pi].append(refund)
        events_lo = w.now - self.grace if w.lo is None else min(w.lo, w.now - self.grace)
        for pi, created in (await self.stripe.event_times(events_lo)).items():
            w.last_event[pi] = max(created, w.last_event.get(pi, 0))

    async def _ours(self, conn: asyncpg.Connection, pis: list[str]) -> dict[str, Ours]:
        out = {pi: Ours() for pi in pis}
        for r in await conn.fetch(OURS, pis, timeout=self.timeout):
            out[r["pi"]] = Ours(r["status"], r["amount"], r["reservation_id"], r["keys"],
                                r["pending_action"])
        return out

    async def _seen(self, w: Window, candidates: set[str], ours: dict[str, Ours],
                    reopened: set[str]) -> dict[str, Seen]:
        """Stripe's view of every candidate: from the lists, else retrieved; refunds from the
        full list in a full pass, else looked up for each PaymentIntent that has any."""
        seen: dict[str, Seen] = {}
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(pi: str) -> None:
            intent = w.intents.get(pi)
            async with limit:
                if intent is None:
                    intent = await self.stripe.intent(pi)
                refunds: list[dict[str, Any]] | None = w.refunds.get(pi, [])
                if w.lo is not None and intent is not None and (
                        pi in w.refunds or ours[pi].status == "refunded" or pi in reopened):
                    refunds = await self.stripe.refunds_of(pi, intent)
            seen[pi] = Seen(intent, refunds, w.last_event.get(pi, 0))

        await asyncio.gather(*(one(pi) for pi in candidates))
        return seen

    async def _fresh(self, pi: str) -> Seen:
        intent = await self.stripe.intent(pi)
        refunds = await self.stripe.refunds_of(pi, intent) if intent is not None else []
        return Seen(intent, refunds)

    # -- the verdict ------------------------------------------------------------------------------
    def judge(self, pi: str, ours: Ours, seen: Seen, now: int) -> list[Violation] | str | None:
        """None when the books agree, "in_flight" when only work in flight separates them, else
        the violations."""
        intent = seen.intent
        if intent is None:
            if ours.status is None:
                return None  # neither ours nor Stripe's: a reopened finding whose row is gone
            return [Violation("payment_unknown_at_stripe", f"PaymentIntent {pi}",
                              {"payment_intent_id": pi, "reservation_id": ours.reservation_id},
                              "a PaymentIntent at Stripe", "Stripe has no such PaymentIntent")]
        if ours.status is None and not (intent.get("metadata") or {}).get("reservation_id"):
            return None  # not ours: another product's PaymentIntent on the same account
        found = ours.compare(pi, intent, seen.refunds)
        if not found:
            return None
        newest = max(int(intent.get("created") or 0), seen.last_event,
                     *(int(r.get("created") or 0) for r in seen.refunds or ()))
        if newest > now - self.grace or ours.pending_action:
            return "in_flight"
        return found
