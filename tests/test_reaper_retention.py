"""Retention purges delete only what is old enough, in small batches, and say so in reaper_runs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from boxoffice.reaper import retention
from tests.reaper_support import as_reaper

NOW = datetime.now(UTC)


async def _key(db: asyncpg.Pool, key: str, age: timedelta) -> None:
    await db.execute(
        "INSERT INTO payment_intents_log (client_id, idempotency_key, request_path, "
        "request_fingerprint, stripe_idempotency_key, created_at) "
        "VALUES ('c_1', $1, '/v1/payment_intents', 'fp', 'sk-' || $1, now() - $2::interval)",
        key, age)


async def _webhook(db: asyncpg.Pool, event_id: str, status: str, received: timedelta,
                   processed: timedelta | None) -> None:
    await db.execute(
        "INSERT INTO webhook_events_log (event_id, event_type, event_created, payload, "
        "processing_status, received_at, processed_at) VALUES ($1, 'payment_intent.succeeded', "
        "now() - $3::interval, '{}', $2, now() - $3::interval, now() - $4::interval)",
        event_id, status, received, processed)


async def _error(db: asyncpg.Pool, occurred: timedelta, received: timedelta) -> uuid.UUID:
    eid = uuid.uuid4()
    await db.execute(
        "INSERT INTO error_logs (id, \"timestamp\", received_at, service, severity, error_message) "
        "VALUES ($1, now() - $2::interval, now() - $3::interval, 'test', 'error', 'boom')",
        eid, occurred, received)
    return eid


async def test_purges_only_what_is_old_enough(db, database_url):
    h, d = timedelta(hours=1), timedelta(days=1)
    for i in range(5):
        await _key(db, f"old-{i}", 25 * h)
    await _key(db, "fresh", 23 * h)
    await _webhook(db, "evt_old", "processed", 40 * d, 31 * d)
    await _webhook(db, "evt_ignored_old", "ignored", 40 * d, 31 * d)
    await _webhook(db, "evt_recent", "processed", 40 * d, 29 * d)
    await _webhook(db, "evt_failed_old", "failed", 40 * d, None)  # kept for replay
    old_error = await _error(db, 91 * d, 91 * d)
    late_error = await _error(db, 91 * d, 1 * h)  # sent late with an old clock: kept
    recent_error = await _error(db, 89 * d, 89 * d)
    ev = await db.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'show', 10, 100, 'eur')")
    holds = {}
    for key, age in (("hold-old", 25 * h), ("hold-fresh", 23 * h)):
        holds[key] = await db.fetchval("SELECT id FROM hold_tickets($1, 1, 'c_1', 900, NULL, $2)",
                                       ev, key)
        await db.execute("UPDATE reservations SET created_at = now() - $2::interval, "
                         "request_fingerprint = 'fp', response_body = '{}' WHERE id = $1",
                         holds[key], age)

    async with as_reaper(database_url) as reaper:
        run = await retention.purge(reaper, retention.Ages(24, 30, 90), batch=2)

    assert run.error is None
    assert run.purged == {"payment_intents_log": 5, "reservation_keys": 1,
                          "webhook_events_log": 2, "error_logs": 1,
                          **{t: 0 for t in retention.SENTRY_TABLES}}
    # a hold's key is forgotten after the same TTL; the hold itself stays
    keys = {r["id"]: tuple(r)[1:] for r in await db.fetch(
        "SELECT id, idempotency_key, request_fingerprint, response_body FROM reservations")}
    assert keys == {holds["hold-old"]: (None, None, None),
                    holds["hold-fresh"]: ("hold-fresh", "fp", "{}")}
    assert {r[0] for r in await db.fetch("SELECT idempotency_key FROM payment_intents_log")} == {"fresh"}
    assert {r[0] for r in await db.fetch("SELECT event_id FROM webhook_events_log")} == {
        "evt_recent", "evt_failed_old"}
    assert {r[0] for r in await db.fetch("SELECT id FROM error_logs")} == {late_error, recent_error}
    assert old_error not in {r[0] for r in await db.fetch("SELECT id FROM error_logs")}
    row = await db.fetchrow("SELECT * FROM reaper_runs WHERE kind = 'retention'")
    assert row["purged"] == run.purged and row["error"] is None and row["finished_at"] >= row["started_at"]

    # a purged key is forgotten: the same key can be used afresh
    await _key(db, "old-0", timedelta(0))
    assert await db.fetchval("SELECT count(*) FROM payment_intents_log WHERE idempotency_key = 'old-0'") == 1

    # nothing left to purge: nothing deleted, and no empty run recorded
    async with as_reaper(database_url) as reaper:
        again = await retention.purge(reaper, retention.Ages(24, 30, 90), batch=2)
    assert again.purged == {"payment_intents_log": 0, "reservation_keys": 0,
                            "webhook_events_log": 0, "error_logs": 0,
                            **{t: 0 for t in retention.SENTRY_TABLES}}
    assert await db.fetchval("SELECT count(*) FROM reaper_runs WHERE kind = 'retention'") == 1


async def test_a_purge_skips_rows_locked_by_a_request_in_flight(db, database_url):
    await _key(db, "busy", timedelta(hours=30))
    await _key(db, "idle", timedelta(hours=30))
    async with db.acquire() as conn, conn.transaction(), as_reaper(database_url) as reaper:
        await conn.execute("SELECT 1 FROM payment_intents_log WHERE idempotency_key = 'busy' FOR UPDATE")
        run = await retention.purge(reaper, retention.Ages(24, 30, 90))
    assert run.purged is not None and run.purged["payment_intents_log"] == 1
    assert [r[0] for r in await db.fetch("SELECT idempotency_key FROM payment_intents_log")] == ["busy"]
