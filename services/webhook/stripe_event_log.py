"""``webhook_events_log``: every Stripe event, once per event id, with its processing state.

The claim of an event (its row inserted already marked done, committed only together with its
effects; or the row of an event seen before locked) is the first step of ``apply_stripe_event``
in SQL. Here: ``record_failure`` runs after a failed attempt was rolled back (to the event's
savepoint in a batch, whose transaction then commits it with its neighbours; or in a
transaction of its own), so attempts and the last error survive the failure they describe; and
the operators' reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg

from boxoffice.wire.stripe import LoggedEvent, WebhookStatus

if TYPE_CHECKING:
    from boxoffice.webhook.effects import EventHead

DONE = (WebhookStatus.PROCESSED, WebhookStatus.IGNORED)
MAX_ERROR_CHARS = 2000

# A payload PostgreSQL cannot store as jsonb (a \u0000 escape) is kept as a JSON string instead,
# so that even such an event is recorded, marked failed and visible to operators.
_FAILURE = """
INSERT INTO webhook_events_log AS w (event_id, event_type, event_created, payload,
                                     processing_status, attempts, last_error)
VALUES ($1, $2, $3, {payload}, CASE WHEN $6 OR $7 <= 1 THEN 'failed' ELSE 'received' END, 1, $5)
ON CONFLICT (event_id) DO UPDATE
SET attempts = w.attempts + 1, last_error = EXCLUDED.last_error,
    processing_status = CASE WHEN $6 OR w.attempts + 1 >= $7 OR w.processing_status = 'failed'
                             THEN 'failed' ELSE 'received' END
WHERE w.processing_status NOT IN ('processed', 'ignored')
RETURNING w.attempts, w.processing_status
"""

_COLUMNS = ("event_id, event_type, event_created, processing_status, attempts, last_error, "
            "received_at, processed_at")


def created_at(event: EventHead) -> datetime:
    return datetime.fromtimestamp(event.created, UTC)


async def record_failure(conn: asyncpg.Connection, event: EventHead, raw: str, error: str,
                         max_attempts: int, *, final: bool = False
                         ) -> tuple[int, WebhookStatus] | None:
    """Count a failed attempt; the row turns 'failed' at ``max_attempts`` (or at once if ``final``).

    Returns (attempts, status) after, or None if the event was processed meanwhile.
    """
    args = (event.id, event.type, created_at(event), raw, error[:MAX_ERROR_CHARS], final,
            max_attempts)
    try:
        # in a savepoint when the caller's transaction is open: a payload refused as jsonb
        # leaves that transaction usable for the second try
        async with conn.transaction():
            row = await conn.fetchrow(_FAILURE.format(payload="$4::text::jsonb"), *args)
    except asyncpg.exceptions.DataError:
        row = await conn.fetchrow(_FAILURE.format(payload="to_jsonb($4::text)"), *args)
    return None if row is None else (row["attempts"], WebhookStatus(row["processing_status"]))


def _logged(row: asyncpg.Record) -> LoggedEvent:
    return LoggedEvent(event_id=row["event_id"], event_type=row["event_type"],
                       event_created=row["event_created"],
                       processing_status=row["processing_status"], attempts=row["attempts"],
                       last_error=row["last_error"], received_at=row["received_at"],
                       processed_at=row["processed_at"])


async def list_events(pool: asyncpg.Pool, status: str | None, event_type: str | None,
                      limit: int) -> list[LoggedEvent]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM webhook_events_log "
            "WHERE ($1::text IS NULL OR processing_status = $1) "
            "AND ($2::text IS NULL OR event_type = $2) "
            "ORDER BY received_at DESC, event_id LIMIT $3", status, event_type, limit)
    return [_logged(r) for r in rows]


async def get(pool: asyncpg.Pool, event_id: str) -> tuple[LoggedEvent, str] | None:
    """The row of ``event_id`` and its payload as JSON text, or None."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS}, payload::text AS payload FROM webhook_events_log "
            "WHERE event_id = $1", event_id)
    return None if row is None else (_logged(row), row["payload"])
