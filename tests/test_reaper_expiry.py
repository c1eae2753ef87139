"""The reaper expires holds on time: within a second of expires_at, woken by new holds,
caught up by its sweep, and never both completed and expired at the boundary."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import asyncpg

from boxoffice import config
from boxoffice import db as dbmod
from boxoffice.reaper import expiry
from tests.harness import eventually, login_url, metrics
from tests.reaper_support import (
    assert_inventory_consistent,
    expired_events,
    hold,
    hold_unannounced,
    make_event,
)


async def _status(db: asyncpg.Pool, ids: list) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM reservations WHERE id = ANY($1) "
                          "GROUP BY status", ids)
    return {r["status"]: r["n"] for r in rows}


async def _lags(db: asyncpg.Pool, ids: list) -> list[float]:
    rows = await db.fetch("SELECT extract(epoch FROM released_at - expires_at)::float8 AS lag "
                          "FROM reservations WHERE id = ANY($1) AND status = 'expired'", ids)
    return [r["lag"] for r in rows]


async def test_holds_expire_within_a_second_and_tickets_return(db, start_service, nats_url):
    reaper = start_service("reaper")
    event = await make_event(db, capacity=20, buckets=4)
    short = [(await hold(db, event, 2, ttl=1 + i % 2))["id"] for i in range(8)]
    long = (await hold(db, event, 2, ttl=600))["id"]
    assert await db.fetchval("SELECT sum(capacity - held - sold) FROM inventory_buckets") == 2

    await eventually(lambda: _expired_all(db, short), timeout=10, what="8 holds expired")
    lags = await _lags(db, short)
    assert len(lags) == 8 and all(0 <= lag < 1.0 for lag in lags), lags
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", long) == "active"
    assert await db.fetchval("SELECT sum(capacity - held - sold) FROM inventory_buckets") == 18
    await assert_inventory_consistent(db)

    # every expiry announced once, counted in the metrics and in reaper_runs
    counts = await expired_events(nats_url, expect=8)
    assert counts == {str(i): 1 for i in short}
    m = metrics(reaper)
    assert m["boxoffice_holds_expired_total"] == 8
    assert m["boxoffice_hold_expiry_lag_seconds_count"] == 8
    assert m["boxoffice_hold_expiry_lag_seconds_bucket{le=\"1.0\"}"] == 8
    assert m["boxoffice_reaper_listening"] == 1
    total = await eventually(lambda: db.fetchval(
        "SELECT sum(expired) FROM reaper_runs WHERE kind = 'expiry' HAVING sum(expired) = 8"),
        what="runs recorded")
    assert total == 8
    assert await db.fetchval("SELECT count(*) FROM reaper_runs WHERE error IS NOT NULL "
                             "OR expired = 0") == 0  # idle sweeps write nothing


async def _expired_all(db: asyncpg.Pool, ids: list) -> bool:
    return (await _status(db, ids)).get("expired") == len(ids)


async def test_a_nearer_hold_wakes_the_reaper(db, start_service):
    # the catch-up sweep and the re-read of the next due time are an hour away: only the
    # wake-up can expire the short hold on time
    start_service("reaper", REAPER_SWEEP_SECONDS="3600", REAPER_ARM_SECONDS="3600")
    event = await make_event(db, capacity=10)
    far = (await hold(db, event, 1, ttl=30))["id"]  # the reaper now sleeps until this one
    await asyncio.sleep(0.3)
    near = (await hold(db, event, 1, ttl=1))["id"]
    await eventually(lambda: _expired_all(db, [near]), timeout=5, what="the near hold expired")
    [lag] = await _lags(db, [near])
    assert 0 <= lag < 1.0, lag
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", far) == "active"
    await assert_inventory_consistent(db)


async def test_a_fresh_hold_is_armed_on_time_without_a_wake_up(db, start_service):
    """A hold due a few seconds ahead fires no NOTIFY (only holds due within 2 s do): the
    reaper re-reads its next due time every second, so it still expires on time, although the
    catch-up sweep is an hour away and the reaper sleeps until a later hold."""
    start_service("reaper", REAPER_SWEEP_SECONDS="3600")
    event = await make_event(db, capacity=10)
    far = (await hold(db, event, 1, ttl=30))["id"]  # the reaper now sleeps until this one
    await asyncio.sleep(0.3)
    fresh = [(await hold_unannounced(db, event, 1, ttl=ttl))["id"] for ttl in (3, 4)]
    await eventually(lambda: _expired_all(db, fresh), timeout=8, what="the fresh holds expired")
    lags = await _lags(db, fresh)
    assert len(lags) == 2 and all(0 <= lag < 1.0 for lag in lags), lags
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", far) == "active"
    await assert_inventory_consistent(db)


async def test_the_catch_up_sweep_finds_a_hold_nobody_announced(db, start_service):
    start_service("reaper", REAPER_SWEEP_SECONDS="1")
    event = await make_event(db, capacity=10)
    silent = (await hold_unannounced(db, event, 3, ttl=1))["id"]
    await eventually(lambda: _expired_all(db, [silent]), timeout=5, what="the silent hold expired")
    [lag] = await _lags(db, [silent])
    assert 0 <= lag < 1.5, lag  # at most one sweep period late
    await assert_inventory_consistent(db)


async def test_payment_at_the_boundary_is_completed_or_expired_never_both(db, database_url):
    """Payments fired around each hold's expires_at race the reaper while other buyers snap up
    every ticket released. Each hold ends exactly one way: completed (paid before the reaper
    took it, or after, by taking tickets anew) or expired with its payment refused
    ('unavailable': its tickets went to another buyer); never sold twice nor both. Each side
    runs as its service's own role: the reaper expires, the webhook service completes (its
    re-hold path included), payment holds."""
    n = 120
    event = await make_event(db, capacity=n, buckets=8)
    settings = expiry.Settings(batch=20, sweep_seconds=1)
    results: dict[uuid.UUID, str] = {}
    paying = asyncio.Event()

    async def pay_at(reservation_id: uuid.UUID, at_loop_time: float) -> None:
        await asyncio.sleep(max(0.0, at_loop_time - loop.time()))
        results[reservation_id] = await webhook.fetchval(
            "SELECT complete_reservation($1, $2)", reservation_id, f"pi_{reservation_id.hex[:8]}")

    async def other_buyer() -> int:
        got = 0
        while paying.is_set():
            try:
                await hold(payment, event, 1, ttl=600, client="other")
                got += 1
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "BX409", exc  # sold out: try again
                await asyncio.sleep(0.002)
        return got

    loop = asyncio.get_running_loop()
    reaper_url = login_url("reaper", database_url)
    async with dbmod.pool(reaper_url) as reaper, \
            dbmod.pool(login_url("webhook", database_url)) as webhook, \
            dbmod.pool(login_url("payment", database_url)) as payment, \
            expiry.run(reaper, reaper_url, settings):
        now_db = await db.fetchval("SELECT clock_timestamp()")
        t0 = loop.time()
        holds = [await hold(payment, event, 1, ttl=2) for _ in range(n)]
        paying.set()
        buyers = [asyncio.create_task(other_buyer()) for _ in range(3)]
        # pay from 30 ms before to 60 ms after each hold's expiry
        await asyncio.gather(*(pay_at(h["id"], t0 + (h["expires_at"] - now_db)
                                      / timedelta(seconds=1) + random.uniform(-0.03, 0.06))
                               for h in holds))
        paying.clear()
        taken = sum(await asyncio.gather(*buyers))

    rows = {r["id"]: r for r in await db.fetch("""
        SELECT r.id, r.status, r.released_at,
               (SELECT count(*) FROM outbox o WHERE o.subject = 'reservations.events.expired'
                AND o.payload->>'reservation_id' = r.id::text) AS expired_events,
               (SELECT count(*) FROM outbox o WHERE o.subject = 'reservations.events.completed'
                AND o.payload->>'reservation_id' = r.id::text) AS completed_events
        FROM reservations r WHERE r.event_id = $1 AND r.client_id = 'client'""",
        uuid.UUID(event))}
    assert set(rows) == set(results) and len(rows) == n
    for rid, outcome in results.items():
        r = rows[rid]
        if outcome == "completed":
            assert r["status"] == "completed" and r["released_at"] is None, dict(r)
            assert r["completed_events"] == 1 and r["expired_events"] <= 1, dict(r)
        else:
            assert outcome == "unavailable", outcome
            assert r["status"] == "expired" and r["completed_events"] == 0, dict(r)
            assert r["expired_events"] == 1, dict(r)
    completed = sum(1 for o in results.values() if o == "completed")
    sold, held = await db.fetchrow("SELECT sum(sold), sum(held) FROM inventory_buckets "
                                   "WHERE event_id = $1", uuid.UUID(event))
    assert (sold, held) == (completed, taken) and completed + taken <= n
    await assert_inventory_consistent(db)
    first = sum(1 for r in rows.values() if r["status"] == "completed" and not r["expired_events"])
    print(f"boundary: {first} paid before expiry, {completed - first} re-took tickets after, "
          f"{n - completed} refused ({taken} tickets went to other buyers)")


def test_holds_are_expired_5000_per_transaction_by_default() -> None:
    # the measured default (fewer, larger batches cost PostgreSQL less per hold: each claim steps
    # over the entries of holds earlier batches expired), and the one the timer falls back to
    cfg = config.load("reaper", {"NATS_URL": "nats://127.0.0.1:4222",
                                 "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/boxoffice"})
    assert cfg.reaper_batch_size == 5000
    assert expiry.Settings().batch == cfg.reaper_batch_size


def test_a_backlog_is_expired_with_two_batches_in_flight_by_default() -> None:
    # measured faster than three on the bench's two cores, at less CPU per hold
    assert expiry.Settings().workers == 2
