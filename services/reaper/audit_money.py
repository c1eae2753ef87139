"""The money check: money taken always matches tickets given.

- Every completed hold has exactly one succeeded, unrefunded payment: the PaymentIntent that
  holds it (``reservations.payment_intent_id``), succeeded (or disputed: a dispute means the
  charge succeeded) and with no refund decided.
- Every succeeded payment has its completed hold or a refund: a payment that is not the one
  holding a completed hold must have a refund decided (``stripe_actions``, pending or done);
  a second payment for a hold paid by another is ``paid_twice``, any other ``paid_without_tickets``.
  A refund that Stripe refused for good (``failed``) is no refund.

A payment and its hold change in one transaction (applying a Stripe event, confirming a refund),
so nothing here is ever legitimately in flight. Read in one snapshot. An incremental run looks at
the payments and refund decisions changed since its checkpoint (``updated_at``, less
``OVERLAP`` for transactions that committed after the last snapshot was taken) and at their
holds; a full pass at every payment and every completed hold.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from boxoffice.audit import Checkpoint, Examination, Violation

OVERLAP = timedelta(seconds=60)  # longer than any transaction that changes a payment

CHANGED = """
SELECT payment_intent_id, reservation_id FROM payments WHERE updated_at >= $1
UNION
SELECT payment_intent_id, reservation_id FROM stripe_actions
WHERE kind = 'refund' AND updated_at >= $1
"""

# Completed holds whose holder is not a succeeded, unrefunded payment. One row: how many holds
# were examined, and the bad ones.
_HOLDS = """
WITH h AS (
    SELECT r.id, r.payment_intent_id AS holder, p.status AS pay_status, s.status AS refund,
           p.payment_intent_id IS NULL OR p.status NOT IN ('succeeded', 'disputed')
           OR coalesce(s.status IN ('pending', 'done'), false) AS bad
    FROM reservations r
    LEFT JOIN payments p ON p.payment_intent_id = r.payment_intent_id
    LEFT JOIN stripe_actions s ON s.kind = 'refund' AND s.payment_intent_id = r.payment_intent_id
    WHERE r.status = 'completed' {where}
)
SELECT count(*) AS examined,
       coalesce(jsonb_agg(jsonb_build_object('id', id, 'holder', holder, 'pay_status', pay_status,
                                             'refund', refund)) FILTER (WHERE bad), '[]') AS bad
FROM h
"""
HOLDS_ALL = _HOLDS.format(where="")
HOLDS_OF = _HOLDS.format(where="AND r.id = ANY($1::uuid[])")

# Succeeded payments with no refund decided that do not hold a completed hold.
_PAYMENTS = """
WITH p AS (
    SELECT p.payment_intent_id AS pi, p.reservation_id, p.status, r.status AS hold_status,
           r.payment_intent_id AS holder, s.status AS refund,
           NOT coalesce(s.status IN ('pending', 'done'), false)
           AND NOT coalesce(r.status = 'completed' AND r.payment_intent_id = p.payment_intent_id,
                            false) AS bad
    FROM payments p
    LEFT JOIN reservations r ON r.id = p.reservation_id
    LEFT JOIN stripe_actions s ON s.kind = 'refund' AND s.payment_intent_id = p.payment_intent_id
    WHERE p.status IN ('succeeded', 'disputed') {where}
)
SELECT count(*) AS examined,
       coalesce(jsonb_agg(jsonb_build_object('pi', pi, 'reservation_id', reservation_id,
                                             'status', status, 'hold_status', hold_status,
                                             'holder', holder, 'refund', refund))
                FILTER (WHERE bad), '[]') AS bad
FROM p
"""
PAYMENTS_ALL = _PAYMENTS.format(where="")
PAYMENTS_OF = _PAYMENTS.format(
    where="AND (p.payment_intent_id = ANY($1::text[]) OR p.reservation_id = ANY($2::uuid[]))")


def hold_violation(r: dict[str, Any]) -> Violation:
    holder, status, refund = r["holder"], r["pay_status"], r["refund"]
    if holder is None:
        found = "no PaymentIntent holds it"
    elif status is None:
        found = f"PaymentIntent {holder} unknown to us"
    elif status not in ("succeeded", "disputed"):
        found = f"PaymentIntent {holder} {status}"
    else:
        found = f"PaymentIntent {holder} {status} with a refund {refund}"
    return Violation("hold_not_paid", f"hold {r['id']}",
                     {"reservation_id": r["id"], "payment_intent_id": holder},
                     "one succeeded, unrefunded payment: the PaymentIntent that holds it", found)


def payment_violation(r: dict[str, Any]) -> Violation:
    pi, hold = r["pi"], r["reservation_id"]
    refund = f"refund {r['refund']}" if r["refund"] else "no refund decided"
    ids = {"payment_intent_id": pi, "reservation_id": hold}
    if r["hold_status"] == "completed":
        return Violation("paid_twice", f"payment {pi}", ids,
                         f"a refund (hold {hold} is paid by {r['holder']})",
                         f"{r['status']}, {refund}")
    where = f"hold {hold} {r['hold_status']}" if hold else "no hold of ours"
    return Violation("paid_without_tickets", f"payment {pi}", ids,
                     "its completed hold, or a refund", f"{r['status']}, {where}, {refund}")


class Money:
    name = "money"

    def __init__(self, pool: asyncpg.Pool, *, overlap: timedelta = OVERLAP,
                 timeout: float = 600.0):
        self.pool = pool
        self.overlap = overlap
        self.timeout = timeout

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        out = Examination()
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            now: datetime = await conn.fetchval("SELECT clock_timestamp()")  # the snapshot's time
            out.checkpoint = {"since": now.isoformat()}
            if since is None:
                holds = await conn.fetchrow(HOLDS_ALL, timeout=self.timeout)
                payments = await conn.fetchrow(PAYMENTS_ALL, timeout=self.timeout)
            else:
                start = datetime.fromisoformat(since["since"]) - self.overlap
                pis: set[str] = set()
                res: set[uuid.UUID] = set()
                for r in await conn.fetch(CHANGED, start, timeout=self.timeout):
                    pis.add(r["payment_intent_id"])
                    if r["reservation_id"] is not None:
                        res.add(r["reservation_id"])
                for i in reopen:
                    if i.get("payment_intent_id"):
                        pis.add(i["payment_intent_id"])
                    if i.get("reservation_id"):
                        res.add(uuid.UUID(i["reservation_id"]))
                holds = await conn.fetchrow(HOLDS_OF, sorted(res), timeout=self.timeout)
                payments = await conn.fetchrow(PAYMENTS_OF, sorted(pis), sorted(res),
                                               timeout=self.timeout)
        out.examined = holds["examined"] + payments["examined"]
        out.violations += [hold_violation(r) for r in holds["bad"]]
        out.violations += [payment_violation(r) for r in payments["bad"]]
        return out
