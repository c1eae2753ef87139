"""Ticketed events and their inventory (domain logic; plain async functions)."""

from __future__ import annotations

import uuid

import asyncpg

from boxoffice import errors
from boxoffice.wire.admin import CreateEvent, TicketedEvent

TicketedEventNotFound = errors.define("TicketedEventNotFound", "event_not_found", 404,
                                      "Event not found")

# A bucket per ~50 tickets, at most 64: small events keep one row, hot ones spread their holds.
TICKETS_PER_BUCKET = 50
MAX_BUCKETS = 64


def default_buckets(capacity: int) -> int:
    return max(1, min(MAX_BUCKETS, capacity // TICKETS_PER_BUCKET))


def parse_event_id(value: str) -> uuid.UUID:
    """An event id that is not a UUID names no event: the same 404, code and words as an
    unknown one."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise TicketedEventNotFound(f"no event {value[:64]!r}") from None


async def create(pool: asyncpg.Pool, req: CreateEvent) -> TicketedEvent:
    event_id = uuid.uuid4()
    buckets = req.buckets or default_buckets(req.capacity)
    async with pool.acquire() as conn:
        await conn.execute("SELECT create_ticketed_event($1, $2, $3, $4, $5, $6)", event_id,
                           req.name, req.capacity, req.price, req.currency.lower(), buckets)
    return await get(pool, str(event_id))


_EVENTS = """
SELECT e.id, e.name, e.capacity, e.price, e.currency, e.buckets,
       coalesce(b.held, 0) AS held, coalesce(b.sold, 0) AS sold,
       (SELECT coalesce(sum(r.quantity), 0) FROM reservations r
         WHERE r.event_id = e.id AND r.status = 'active'
           AND r.expires_at <= (SELECT clock_timestamp())) AS overdue
FROM ticketed_events e
LEFT JOIN LATERAL (SELECT sum(held) AS held, sum(sold) AS sold FROM inventory_buckets
                   WHERE event_id = e.id) b ON TRUE
"""


def _event(row: asyncpg.Record) -> TicketedEvent:
    held = row["held"] - row["overdue"]  # an overdue hold never counts, reaped or not
    return TicketedEvent(id=str(row["id"]), name=row["name"], capacity=row["capacity"],
                         price=row["price"], currency=row["currency"], buckets=row["buckets"],
                         held=held, sold=row["sold"],
                         available=row["capacity"] - held - row["sold"])


async def newest(pool: asyncpg.Pool, limit: int) -> list[TicketedEvent]:
    """Ticketed events with their inventory, newest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_EVENTS + "ORDER BY e.created_at DESC, e.id LIMIT $1", limit)
    return [_event(r) for r in rows]


async def get(pool: asyncpg.Pool, event_id: str) -> TicketedEvent:
    eid = parse_event_id(event_id)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_EVENTS + "WHERE e.id = $1", eid)
    if row is None:
        raise TicketedEventNotFound(f"no event {event_id[:64]!r}")
    return _event(row)
