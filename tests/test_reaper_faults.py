"""Expiry events are announced once per hold whatever happens to the reapers: three replicas
at once, a replica SIGKILLed mid-run and restarted, PostgreSQL stopped and restarted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from boxoffice import migrate
from boxoffice.db import pool as open_pool
from boxoffice.embedded import Postgres
from tests.harness import base_env, eventually, http_ready, metrics
from tests.reaper_support import (
    assert_inventory_consistent,
    bulk_holds,
    expired_events,
    get_json,
    hold,
    make_event,
)


async def _all_expired_and_published(db: asyncpg.Pool, n: int) -> bool:
    expired = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'expired'")
    pending = await db.fetchval("SELECT count(*) FROM outbox")
    return expired == n and pending == 0


async def _expired_ids(db: asyncpg.Pool) -> set[str]:
    return {str(r["id"]) for r in await db.fetch(
        "SELECT id FROM reservations WHERE status = 'expired'")}


async def test_three_replicas_expire_and_announce_each_hold_once(db, start_service, nats_url):
    replicas = [start_service("reaper", REAPER_BATCH_SIZE="100") for _ in range(3)]
    n = 3000
    event = await make_event(db, capacity=n, buckets=8)
    for ttl in (1, 2, 3):  # three waves a second apart, all replicas awake for each
        await bulk_holds(db, event, n // 3, ttl)
    await eventually(lambda: _all_expired_and_published(db, n), timeout=30,
                     what="every hold expired and its event published")
    counts = await expired_events(nats_url, expect=n)
    assert sum(counts.values()) == n and set(counts.values()) == {1}
    assert set(counts) == await _expired_ids(db)
    await assert_inventory_consistent(db)
    # each hold counted once across the replicas' runs and metrics
    await eventually(lambda: db.fetchval(
        "SELECT sum(expired) = $1 FROM reaper_runs WHERE kind = 'expiry'", n), what="runs recorded")
    assert sum(metrics(r)["boxoffice_holds_expired_total"] for r in replicas) == n
    workers = await db.fetchval("SELECT count(DISTINCT replica) FROM reaper_runs")
    print(f"{workers} of 3 replicas expired holds")


async def test_a_reaper_killed_mid_run_and_restarted_announces_each_hold_once(
        db, start_service, nats_url):
    reaper = start_service("reaper", REAPER_BATCH_SIZE="200")
    n = 20000
    event = await make_event(db, capacity=n, buckets=16)
    await bulk_holds(db, event, n, 1)  # a flash sale's holds, all expiring in a second

    async def mid_run() -> bool:
        expired = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'expired'")
        return expired >= n // 4 and (expired < n or await db.fetchval(
            "SELECT count(*) FROM outbox") > 0)

    await eventually(mid_run, timeout=15, interval=0.01, what="the reaper mid-run")
    reaper.kill()  # SIGKILL: an open batch rolls back, a publish may be left unacknowledged
    left = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'active'")
    unpublished = await db.fetchval("SELECT count(*) FROM outbox")
    assert left > 0 or unpublished > 0, "killed too late to test anything"
    reaper.start()
    await eventually(lambda: _all_expired_and_published(db, n), timeout=60,
                     what="every hold expired and its event published after the restart")
    counts = await expired_events(nats_url, expect=n, timeout=30)
    assert sum(counts.values()) == n and set(counts.values()) == {1}
    assert set(counts) == await _expired_ids(db)
    await assert_inventory_consistent(db)
    print(f"killed with {left} holds active and {unpublished} events unpublished")


async def test_postgres_stopped_and_restarted_the_reaper_reports_and_catches_up(
        tmp_path: Path, start_service, nats_url):
    pg = Postgres(tmp_path / "pg" / "data").start(create_db="boxoffice")
    try:
        url = pg.url("boxoffice")
        migrate.run(url, "up")
        reaper = start_service("reaper", env=base_env(nats_url, url))
        async with open_pool(url, min_size=1, max_size=4) as db:
            event = await make_event(db, capacity=10, buckets=2)
            ids = [(await hold(db, event, 2, ttl=2))["id"] for _ in range(4)]
        pg.stop()  # the holds fall due while PostgreSQL is down

        def reports_outage() -> bool:
            m = metrics(reaper)
            status, body = get_json(f"{reaper.url}/readyz")
            return (m.get('boxoffice_reaper_errors_total{kind="expiry"}', 0) > 0
                    and status == 503 and body["checks"]["postgres"] is False)

        await eventually(_async(reports_outage), timeout=15, what="the reaper reporting the outage")
        await asyncio.sleep(2.5)  # let the holds fall due while the database is away
        assert reaper.running
        pg.start(create_db=None)

        async with open_pool(url, min_size=1, max_size=4) as db:
            async def caught_up() -> bool:
                return await db.fetchval("SELECT count(*) FROM reservations WHERE id = ANY($1) "
                                         "AND status = 'expired'", ids) == 4
            await eventually(caught_up, timeout=20, what="the overdue holds expired after restart")
            await assert_inventory_consistent(db)
            outage = await eventually(lambda: db.fetchrow(
                "SELECT * FROM reaper_runs WHERE error IS NOT NULL"), timeout=10,
                what="the outage recorded in reaper_runs")
            assert outage["kind"] == "expiry" and outage["finished_at"] >= outage["started_at"]
            caught = await eventually(lambda: db.fetchval(
                "SELECT sum(expired) FROM reaper_runs WHERE error IS NULL AND kind = 'expiry'"),
                what="the catch-up run recorded")
            assert caught == 4
        await eventually(_async(lambda: http_ready(f"{reaper.url}/readyz")), timeout=10,
                         what="the reaper ready again")
        assert reaper.running and len(reaper.history) == 0  # the same process all along
        assert "expiry failed, retrying" in reaper.logs()
        assert url not in reaper.logs()  # the database URL is never logged
    finally:
        pg.stop()


def _async(fn):  # type: ignore[no-untyped-def]
    async def call():  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn)
    return call
