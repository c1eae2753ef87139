"""Retention: delete what is older than its configured age, in small batches.

- Idempotency keys (``payment_intents_log``) created more than ``IDEMPOTENCY_KEY_TTL_HOURS``
  ago (24 h by default, as Stripe keeps them). A purged key is forgotten: the same key sent
  again starts a new request, as with Stripe after 24 h. What a purge must never forget, the
  one PaymentIntent a hold may have, lives on the reservation row
  (``payment_idempotency_key``), which is not purged.
- The keys of holds (``reservations.idempotency_key`` with its fingerprint and stored answer)
  after the same ``IDEMPOTENCY_KEY_TTL_HOURS``: the reservation stays, its key is forgotten
  (``reservation_keys``), so the same key later makes a new hold as documented.
- Stripe events (``webhook_events_log``) processed more than ``WEBHOOK_LOG_RETENTION_DAYS``
  ago; events never processed (received or failed) are kept for operators to replay. Stripe
  stops redelivering an event after 3 days, far inside the default of 30.
- Error reports (``error_logs``) that both occurred and were received more than
  ``ERROR_RETENTION_DAYS`` ago: a report sent late with an old client clock is still kept for
  the full period after it arrived. The same age for what Sentry SDKs send besides errors:
  attachments, feedback, dropped counts, cron check-ins (monitors stay), sessions.

Each batch is one short transaction (rows claimed with SKIP LOCKED, so replicas share the work
and a row being updated is left for the next run); a run that purged something or failed is
recorded in ``reaper_runs`` with kind 'retention' and ``purged`` per table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import prometheus_client

from boxoffice import background, db
from boxoffice.reaper import runs
from boxoffice.reaper.expiry import ERRORS, REPLICA

log = logging.getLogger("boxoffice.reaper")

PURGED = prometheus_client.Counter("boxoffice_retention_purged_total",
                                   "Rows deleted by retention", ["table"])
BATCH = 1000

# table -> one batch: $1 = the age (hours or days), $2 = the batch size
PURGES: dict[str, str] = {
    "payment_intents_log": """
        DELETE FROM payment_intents_log WHERE id IN (
            SELECT id FROM payment_intents_log
            WHERE created_at < now() - make_interval(hours => $1)
            ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    "reservation_keys": """
        UPDATE reservations SET idempotency_key = NULL, request_fingerprint = NULL,
                                response_body = NULL
        WHERE id IN (
            SELECT id FROM reservations
            WHERE idempotency_key IS NOT NULL AND created_at < now() - make_interval(hours => $1)
            ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    "webhook_events_log": """
        DELETE FROM webhook_events_log WHERE event_id IN (
            SELECT event_id FROM webhook_events_log
            WHERE processed_at < now() - make_interval(days => $1)
            ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    "error_logs": """
        DELETE FROM error_logs WHERE id IN (
            SELECT id FROM error_logs
            WHERE received_at < now() - make_interval(days => $1)
              AND "timestamp" < now() - make_interval(days => $1)
            ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    # what Sentry SDKs send besides errors, after the same ERROR_RETENTION_DAYS (by key: the
    # reaper may read a row's key and age, never its content)
    **{table: f"""
        DELETE FROM {table} WHERE ({key}) IN (
            SELECT {key} FROM {table} WHERE {column} < now() - make_interval(days => $1)
            ORDER BY {column} LIMIT $2 FOR UPDATE SKIP LOCKED)"""
       for table, key, column in (
           ("error_attachments", "id", "received_at"), ("error_feedback", "id", "received_at"),
           ("error_discards", "report_id, origin, reason, category", "received_at"),
           ("monitor_checkins", "id", "updated_at"), ("release_sessions", "service, sid", "updated_at"),
           ("release_session_buckets", "message_id, idx", "started"))},
}
SENTRY_TABLES = ("error_attachments", "error_feedback", "error_discards", "monitor_checkins",
                 "release_sessions", "release_session_buckets")


@dataclass(frozen=True)
class Ages:
    idempotency_key_hours: int = 24
    webhook_log_days: int = 30
    error_days: int = 90

    def of(self, table: str) -> int:
        return {"payment_intents_log": self.idempotency_key_hours,
                "reservation_keys": self.idempotency_key_hours,
                "webhook_events_log": self.webhook_log_days,
                "error_logs": self.error_days,
                **{t: self.error_days for t in SENTRY_TABLES}}[table]


async def purge_table(conn: asyncpg.Connection, table: str, age: int, batch: int = BATCH,
                      stopping: asyncio.Event | None = None) -> int:
    """Delete ``table``'s rows older than ``age``, a batch per transaction; returns how many."""
    total = 0
    while True:
        async with conn.transaction():
            status = await conn.execute(PURGES[table], age, batch)
        n = int(status.split()[-1])
        total += n
        PURGED.labels(table).inc(n)
        if n < batch or (stopping is not None and stopping.is_set()):
            return total
        await asyncio.sleep(0)  # let the expiry timer and the handlers in between batches


async def purge(pool: asyncpg.Pool, ages: Ages, *, batch: int = BATCH,
                stopping: asyncio.Event | None = None) -> runs.Run:
    """One retention run over every table; recorded when it purged something or failed."""
    run = runs.Run("retention", runs.utcnow(), runs.utcnow(), purged={t: 0 for t in PURGES})
    assert run.purged is not None
    async with pool.acquire() as conn:
        try:
            for table in PURGES:
                run.purged[table] = await purge_table(conn, table, ages.of(table), batch, stopping)
        except db.FAILURES as exc:
            run.error = runs.describe(exc)
        run.finished_at = runs.utcnow()
        if run.error is not None or any(run.purged.values()):
            with contextlib.suppress(*db.FAILURES):
                await runs.insert(conn, REPLICA, run)
    return run


async def loop(pool: asyncpg.Pool, ages: Ages, interval: float, stopping: asyncio.Event) -> None:
    async def once() -> float:
        try:
            run = await purge(pool, ages, stopping=stopping)
        except Exception as exc:  # noqa: BLE001 - retention must not die with its first failure
            run = runs.Run("retention", runs.utcnow(), runs.utcnow(), error=runs.describe(exc))
        if run.error is not None:
            ERRORS.labels("retention").inc()
            log.error("retention run failed: %s", run.error)
        elif any((run.purged or {}).values()):
            log.info("retention purged %s", run.purged)
        return interval if run.error is None else min(interval, 30)

    await background.repeat("retention", once, stopping, every=interval, first_wait=False,
                            logger=log)


@contextlib.asynccontextmanager
async def run(pool: asyncpg.Pool, ages: Ages, interval: float) -> AsyncIterator[None]:
    async def purging(stopping: asyncio.Event) -> None:
        await loop(pool, ages, interval, stopping)

    async with background.running("retention", purging, grace=15):
        yield
