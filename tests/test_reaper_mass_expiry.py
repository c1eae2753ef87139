"""A flash sale's holds all due at once: two reaper replicas, each with several batches in flight,
expire them while payments complete some of the same holds. Each hold ends one way only
(expired with exactly one event, or completed), every expiry is counted once in the replicas'
runs, the inventory adds up, and nobody deadlocks. And the reaper's relay publishes a sweep's
events once the sweep is done."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg

from boxoffice import bus as busmod
from boxoffice import db as dbmod
from boxoffice import outbox
from boxoffice.reaper import expiry
from boxoffice.wire.subjects import reservation_event
from tests.harness import eventually, login_url
from tests.reaper_support import assert_inventory_consistent, bulk_holds, make_event


async def _deadlocks(db: asyncpg.Pool) -> int:
    return await db.fetchval("SELECT deadlocks FROM pg_stat_database "
                             "WHERE datname = current_database()")


async def test_replicas_with_batches_in_flight_expire_each_hold_once(db, database_url):
    n, paid_n = 3200, 400
    event = await make_event(db, capacity=n, buckets=16)
    ev = uuid.UUID(event)
    await bulk_holds(db, event, n, ttl=3600)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM reservations WHERE event_id = $1", ev)]
    paid = random.Random(13).sample(ids, paid_n)
    deadlocks = await _deadlocks(db)
    # small batches, three in flight per replica: many claims overlap, every batch locks the
    # same buckets, and the payments below lock holds and buckets in between
    settings = expiry.Settings(batch=40, sweep_seconds=1, workers=3)
    reaper_url = login_url("reaper", database_url)
    results: dict[uuid.UUID, str] = {}
    loop = asyncio.get_running_loop()

    async with dbmod.pool(reaper_url, max_size=6) as one, \
            dbmod.pool(reaper_url, max_size=6) as two, \
            dbmod.pool(login_url("webhook", database_url), max_size=8) as webhook:

        async def pay(rid: uuid.UUID, at: float) -> None:
            await asyncio.sleep(max(0.0, at - loop.time()))
            results[rid] = await webhook.fetchval("SELECT complete_reservation($1, $2)",
                                                  rid, f"pi_{rid.hex[:8]}")

        async with expiry.run(one, reaper_url, settings), expiry.run(two, reaper_url, settings):
            # every hold due now; both replicas are woken by the NOTIFY and find the backlog
            await db.execute("UPDATE reservations SET expires_at = clock_timestamp() "
                             "WHERE event_id = $1", ev)
            t0 = loop.time()
            await asyncio.gather(*(pay(rid, t0 + random.uniform(0, 1.0)) for rid in paid))
            await eventually(lambda: db.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM reservations WHERE event_id = $1 "
                "AND status = 'active')", ev), timeout=60, what="every hold ended")

        # the runs each replica recorded when it stopped (or went idle)
        recorded = await db.fetchval("SELECT coalesce(sum(expired), 0) FROM reaper_runs "
                                     "WHERE kind = 'expiry'")

    rows = {r["id"]: r for r in await db.fetch("""
        SELECT r.id, r.status,
               (SELECT count(*) FROM outbox o WHERE o.subject = 'reservations.events.expired'
                AND o.payload->>'reservation_id' = r.id::text) AS expired_events
        FROM reservations r WHERE r.event_id = $1""", ev)}
    assert len(rows) == n
    expired = [r for r in rows.values() if r["status"] == "expired"]
    assert all(r["expired_events"] == 1 for r in expired), [dict(r) for r in expired
                                                            if r["expired_events"] != 1][:5]
    for rid, r in rows.items():
        if rid not in paid:
            assert r["status"] == "expired", dict(r)
        elif results[rid] == "completed":  # paid before the reaper took it, or re-took tickets
            assert r["status"] == "completed" and r["expired_events"] <= 1, dict(r)
        else:
            assert results[rid] == "unavailable" and r["status"] == "expired", (results[rid], dict(r))
    # each expiry counted once across the replicas: exactly the expiry events (a paid hold the
    # reaper took first has one too, completed since by taking its tickets anew; the payments
    # themselves expire none here: the tickets they re-take are free)
    assert recorded == sum(r["expired_events"] for r in rows.values())
    completed = sum(1 for r in rows.values() if r["status"] == "completed")
    sold, held = await db.fetchrow("SELECT sum(sold), sum(held) FROM inventory_buckets "
                                   "WHERE event_id = $1", ev)
    assert (sold, held) == (completed, 0)
    await assert_inventory_consistent(db)
    assert await _deadlocks(db) == deadlocks


async def test_expiry_events_wait_for_the_sweep_that_wrote_them(db, database_url, nats_url,
                                                               monkeypatch):
    """The reaper's relay makes way for its sweep (``outbox.Gate``): while the sweep's batches
    run, none of their events is published; once it ends, every hold's event is, once."""
    n = 600
    event = await make_event(db, capacity=n, buckets=4)
    await bulk_holds(db, event, n, ttl=3600)
    settings = expiry.Settings(batch=100, sweep_seconds=60, workers=1)
    reaper_url = login_url("reaper", database_url)
    real = expiry.expire_batches
    seen: list[tuple[int, int]] = []  # (holds expired so far, messages on the stream)
    gate = outbox.Gate(most=30)  # the bound is tested on its own (tests/test_outbox_relay.py)

    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")

        async def slow(conn, batch, event_id=None, stopping=None):  # type: ignore[no-untyped-def]
            async for done in real(conn, batch, event_id, stopping=stopping):
                yield done
                seen.append((done, (await bus.js.stream_info("RESERVATIONS")).state.messages))
                await asyncio.sleep(0.2)

        monkeypatch.setattr(expiry, "expire_batches", slow)
        async with dbmod.pool(reaper_url, max_size=6) as reaper, \
                outbox.relay(reaper_url, reaper, bus, (reservation_event("expired"),), gate), \
                expiry.run(reaper, reaper_url, settings, gate):
            await db.execute("UPDATE reservations SET expires_at = clock_timestamp() "
                             "WHERE event_id = $1", uuid.UUID(event))

            async def published() -> bool:
                return (await bus.js.stream_info("RESERVATIONS")).state.messages == n
            await eventually(published, timeout=20, what="every expiry event published")
        assert sum(done for done, _ in seen) == n and len(seen) == n // 100
        assert [messages for _, messages in seen] == [0] * len(seen)
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        assert await db.fetchval("SELECT count(*) FROM reservations WHERE event_id = $1 "
                                 "AND status = 'expired'", uuid.UUID(event)) == n
