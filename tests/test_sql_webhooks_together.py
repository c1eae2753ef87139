"""apply_stripe_events' set-based path (apply_succeeded_events): payment_intent.succeeded events
that complete active holds are applied together, with exactly the rows that applying each
alone, in order, writes; events that touch one another (one hold, one PaymentIntent, one event
id, a hold named only by a payment's row) or that are not first seen keep the one-at-a-time
path and its order.

Which path an event took is read from the xmin of its log row: the events applied together
share one subtransaction, each event applied alone has one of its own."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tests.sql_support import hold_with_intent, inventory, new_event, new_hold, paid_by, pi, status

APPLY = ("SELECT * FROM apply_stripe_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
APPLY_MANY = ("SELECT * FROM apply_stripe_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
              "ORDER BY i")
SUCCEEDED = "payment_intent.succeeded"
# the buckets whose held and sold are not what their holds' allocations add up to
BUCKETS_OFF = """
SELECT count(*) FROM inventory_buckets b
LEFT JOIN (SELECT a.bucket, sum(a.quantity) FILTER (WHERE r.status = 'active') AS held,
                  sum(a.quantity) FILTER (WHERE r.status = 'completed') AS sold
           FROM reservation_allocations a JOIN reservations r ON r.id = a.reservation_id
           WHERE a.event_id = $1 GROUP BY a.bucket) t ON t.bucket = b.bucket
WHERE b.event_id = $1 AND (b.held, b.sold) <> (coalesce(t.held, 0), coalesce(t.sold, 0))"""

Event = tuple[str, str, str | None, uuid.UUID | None]  # (event id, type, intent, hold)


def columns(events: list[Event], created: datetime) -> list[list[Any]]:
    n = len(events)
    return [[e[0] for e in events], [e[1] for e in events], [created] * n,
            [json.dumps({"id": e[0], "type": e[1]}) for e in events], [e[2] for e in events],
            [e[3] for e in events], [5000] * n, ["EUR"] * n, [None] * n, [None] * n, [None] * n]


async def apply_many(db: asyncpg.Pool, events: list[Event], created: datetime
                     ) -> list[asyncpg.Record]:
    async with db.acquire() as conn, conn.transaction():
        return await conn.fetch(APPLY_MANY, *columns(events, created))


async def apply_each(db: asyncpg.Pool, events: list[Event], created: datetime
                     ) -> list[asyncpg.Record]:
    cols = columns(events, created)
    async with db.acquire() as conn, conn.transaction():
        return [await conn.fetchrow(APPLY, *(c[n] for c in cols)) for n in range(len(events))]


async def paths(db: asyncpg.Pool, events: list[Event]) -> list[int]:
    """For each event, a number for the subtransaction its log row was written in (the same
    number for events applied together)."""
    rows = await db.fetch("SELECT event_id, xmin::text::bigint AS x FROM webhook_events_log "
                          "WHERE event_id = ANY($1)", [e[0] for e in events])
    xmin = {r["event_id"]: r["x"] for r in rows}
    first: dict[int, int] = {}
    return [first.setdefault(xmin[e[0]], len(first)) for e in events]


async def effects(db: asyncpg.Pool, ev: uuid.UUID, holds: list[uuid.UUID], intents: list[str],
                  events: list[Event]) -> dict[str, Any]:
    """Every row the events wrote, with the holds, intents and event ids named by their index
    (so that two runs on two ticketed events compare)."""
    names: dict[Any, str] = {h: f"hold{n}" for n, h in enumerate(holds)}
    names.update({str(h): f"hold{n}" for n, h in enumerate(holds)})
    names.update({p: f"pi{n}" for n, p in enumerate(intents)})
    names.update({e[0]: f"evt{n}" for n, e in enumerate(events)})
    names[str(ev)] = "ev"

    def named(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: named(v) for k, v in value.items() if k not in ("occurred_at", "expires_at")}
        return names.get(value, value)

    reservations = await db.fetch(
        "SELECT id, status, payment_intent_id, completed_at IS NOT NULL AS completed, "
        "released_at IS NOT NULL AS released FROM reservations WHERE id = ANY($1)", holds)
    payments = await db.fetch(
        "SELECT payment_intent_id, reservation_id, amount, currency, status, "
        "status_event_created, refund_reason FROM payments WHERE payment_intent_id = ANY($1)",
        intents)
    log = await db.fetch(
        "SELECT event_id, event_type, event_created, payload::text AS payload, "
        "processing_status, attempts, last_error, processed_at IS NOT NULL AS processed "
        "FROM webhook_events_log WHERE event_id = ANY($1)", [e[0] for e in events])
    outbox = await db.fetch(
        "SELECT subject, payload FROM outbox WHERE payload->>'payment_intent_id' = ANY($1) "
        "OR payload->>'reservation_id' = ANY($2) ORDER BY id", intents, [str(h) for h in holds])
    actions = await db.fetch("SELECT kind, payment_intent_id, reservation_id, reason, amount "
                             "FROM stripe_actions WHERE payment_intent_id = ANY($1)", intents)

    def table(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
        return sorted(tuple(named(v) for v in r.values()) for r in rows)

    return {"reservations": table(reservations), "payments": table(payments),
            "log": sorted(tuple(named(v) if k != "payload" else named(json.loads(v)["id"])
                                for k, v in r.items()) for r in log),
            "outbox": [(r["subject"], named(r["payload"])) for r in outbox],
            "actions": table(actions), "inventory": await inventory(db, ev),
            "buckets_off": await db.fetchval(BUCKETS_OFF, ev)}


async def scene(db: asyncpg.Pool) -> tuple[uuid.UUID, list[uuid.UUID], list[str], list[Event]]:
    """Holds on three buckets: two with the checkout's payment row, one whose payment is only
    known from its event, one whose payment failed once; a success event for each, and an
    event without effects in between."""
    ev = await new_event(db, capacity=12, buckets=3)
    holds, intents = [], []
    for _ in range(2):
        res, p = await hold_with_intent(db, ev)
        holds.append(res)
        intents.append(p)
    holds.append(await new_hold(db, ev))
    intents.append(pi())
    res, p = await hold_with_intent(db, ev)
    await db.execute("UPDATE payments SET status = 'failed' WHERE payment_intent_id = $1", p)
    holds.append(res)
    intents.append(p)
    events: list[Event] = [(f"evt_{uuid.uuid4().hex}", SUCCEEDED, p, h)
                           for p, h in zip(intents, holds)]
    events.insert(2, (f"evt_{uuid.uuid4().hex}", "charge.succeeded", None, None))
    return ev, holds, intents, events


async def test_successes_applied_together_write_what_each_alone_writes(db: asyncpg.Pool) -> None:
    created = datetime.fromtimestamp(int(time.time()) - 5, UTC)
    alone = await scene(db)
    together = await scene(db)
    one = await apply_each(db, alone[3], created)
    many = await apply_many(db, together[3], created)
    def results(rows: list[asyncpg.Record], holds: list[uuid.UUID]) -> list[tuple[Any, ...]]:
        return [(r["outcome"], None if r["reservation_id"] is None
                 else holds.index(r["reservation_id"]), r["amount"], r["currency"]) for r in rows]

    assert results(one, alone[1]) == results(many, together[1])
    assert [r["outcome"] for r in many] == ["completed", "completed", "ignored", "completed",
                                            "completed"]
    assert [r["reservation_id"] for r in many] == [*together[1][:2], None, *together[1][2:]]
    assert await paths(db, together[3]) == [0, 0, 1, 0, 0]  # the successes together
    assert await effects(db, *alone) == await effects(db, *together)
    got = await effects(db, *together)
    assert (got["inventory"], got["buckets_off"]) == ((0, 8), 0)


async def test_a_hold_named_only_by_a_payment_keeps_its_events_in_order(db: asyncpg.Pool) -> None:
    """The cancel of the hold's PaymentIntent, its event naming no hold (the payment's row
    does), then a success of another PaymentIntent for the same hold: released, then taken
    again and sold. Applied before the cancel, the success would sell the hold and the cancel
    would find it no longer its own."""
    ev = await new_event(db, capacity=4)
    res, cancelled = await hold_with_intent(db, ev)
    other = pi()
    events: list[Event] = [(f"evt_{uuid.uuid4().hex}", "payment_intent.canceled", cancelled, None),
                           (f"evt_{uuid.uuid4().hex}", SUCCEEDED, other, res)]
    rows = await apply_many(db, events, datetime.now(UTC))
    assert [r["outcome"] for r in rows] == ["released", "completed"]
    assert await paths(db, events) == [0, 1]
    assert await status(db, res) == "completed"
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1",
                             res) == other


async def test_events_sharing_an_id_an_intent_or_a_hold_go_one_at_a_time(
        db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=10, buckets=2)
    shared = await new_hold(db, ev)
    first, second, third = pi(), pi(), pi()
    alone = await new_hold(db, ev)
    again = f"evt_{uuid.uuid4().hex}"
    events: list[Event] = [
        (again, SUCCEEDED, first, shared),
        (again, SUCCEEDED, first, shared),  # the same event delivered twice
        (f"evt_{uuid.uuid4().hex}", SUCCEEDED, first, shared),  # another event of that intent
        (f"evt_{uuid.uuid4().hex}", SUCCEEDED, second, shared),  # the hold paid twice
        (f"evt_{uuid.uuid4().hex}", SUCCEEDED, third, alone),
    ]
    rows = await apply_many(db, events, datetime.now(UTC))
    assert [r["outcome"] for r in rows] == ["completed", "duplicate", "stale",
                                            "refund_duplicate_payment", "completed"]
    got = await paths(db, [events[0], *events[2:]])
    assert got[0] != got[1] != got[2] != got[0] and got[3] not in got[:3]
    assert await db.fetchval("SELECT count(*) FROM stripe_actions WHERE kind = 'refund' "
                             "AND payment_intent_id = $1", second) == 1
    assert await inventory(db, ev) == (0, 4)


async def test_an_event_seen_before_or_a_hold_not_active_goes_alone(db: asyncpg.Pool) -> None:
    """A redelivery of an event whose attempt failed (its row counted), a success for a hold
    that expired (taken again), one for an intent already succeeded (stale), and a plain one."""
    ev = await new_event(db, capacity=10)
    retried, expired, stale, plain = [await new_hold(db, ev) for _ in range(4)]
    await db.execute("SELECT release_reservation($1, 'expired')", expired)
    late = pi()
    await paid_by(db, stale, late)
    await db.execute("UPDATE payments SET status = 'succeeded' WHERE payment_intent_id = $1",
                     late)
    events: list[Event] = [(f"evt_{uuid.uuid4().hex}", SUCCEEDED, pi(), h)
                           for h in (retried, expired)]
    events += [(f"evt_{uuid.uuid4().hex}", SUCCEEDED, late, stale),
               (f"evt_{uuid.uuid4().hex}", SUCCEEDED, pi(), plain)]
    await db.execute("INSERT INTO webhook_events_log (event_id, event_type, event_created, "
                     "payload, processing_status, attempts, last_error) "
                     "VALUES ($1, $2, now(), '{}', 'received', 1, 'boom')", events[0][0], SUCCEEDED)
    rows = await apply_many(db, events, datetime.now(UTC))
    assert [r["outcome"] for r in rows] == ["completed", "completed", "stale", "completed"]
    assert await db.fetchval("SELECT attempts FROM webhook_events_log WHERE event_id = $1",
                             events[0][0]) == 2
    assert len(set(await paths(db, events))) == 4
    assert [await status(db, h) for h in (retried, expired, stale, plain)] == [
        "completed", "completed", "active", "completed"]
