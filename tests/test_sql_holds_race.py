"""hold_tickets from many connections at once until an event is sold out: the passes (the probe
that skips locked buckets, the wait in bucket order, the gathering across buckets) race each other,
and what they wrote must add up exactly: no ticket held twice, none lost, one allocation set and
one 'held' outbox row per hold, no deadlock and no error but sold out."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import asyncpg

from tests.sql_support import new_event, outbox, sqlstate_of

HELD = "reservations.events.held"


async def test_holds_racing_to_sell_out_add_up_exactly(db: asyncpg.Pool) -> None:
    capacity, n_buckets, workers = 300, 8, 16
    ev = await new_event(db, capacity=capacity, buckets=n_buckets)
    rng = random.Random(13)
    made: list[tuple[str, int]] = []
    sold_out = 0

    async def worker() -> None:
        nonlocal sold_out
        async with db.acquire() as conn:
            while True:
                q = rng.choice((1, 1, 2, 3, 5, 9))
                try:
                    r = await conn.fetchrow("SELECT id, quantity FROM hold_tickets($1, $2, 'race', 900)",
                                            ev, q)
                except asyncpg.PostgresError as exc:
                    assert exc.sqlstate == "BX409", exc  # a deadlock or anything else fails
                    sold_out += 1
                    if q == 1:
                        return
                    continue
                made.append((str(r["id"]), r["quantity"]))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), 60)
    assert sold_out >= workers
    held = sum(q for _, q in made)
    assert held == capacity  # every worker stopped on a one-ticket sold out: nothing left
    rows = await db.fetch("SELECT bucket, capacity, held, sold FROM inventory_buckets "
                          "WHERE event_id = $1 ORDER BY bucket", ev)
    assert [(r["held"], r["sold"]) for r in rows] == [(r["capacity"], 0) for r in rows]
    # each bucket's held is exactly the tickets allocated from it, each hold's allocations its
    # quantity
    per_bucket = await db.fetch(
        "SELECT a.bucket, sum(a.quantity)::integer AS q FROM reservation_allocations a "
        "JOIN reservations r ON r.id = a.reservation_id WHERE r.event_id = $1 "
        "GROUP BY a.bucket ORDER BY a.bucket", ev)
    assert [(r["bucket"], r["q"]) for r in per_bucket] == [(r["bucket"], r["held"]) for r in rows]
    per_hold = dict((str(r["id"]), r["q"]) for r in await db.fetch(
        "SELECT r.id, sum(a.quantity)::integer AS q FROM reservations r "
        "JOIN reservation_allocations a ON a.reservation_id = r.id "
        "WHERE r.event_id = $1 AND r.status = 'active' GROUP BY r.id", ev))
    assert per_hold == dict(made)
    announced = Counter((p["reservation_id"], p["quantity"]) for s, p in await outbox(db)
                        if s == HELD)
    assert announced == Counter(made)
    # and the event says sold out without waiting on anyone
    assert await sqlstate_of(db.fetchrow("SELECT * FROM hold_tickets($1, 1, 'race', 900)",
                                         ev)) == "BX409"
