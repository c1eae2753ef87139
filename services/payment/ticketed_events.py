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


def parse_uuid(value: str, what: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise errors.NotFound(f"no such {what}") from None


async def create(pool: asyncpg.Pool, req: CreateEvent) -> TicketedEvent:
    event_id = uuid.uuid4()
    buckets = req.buckets or default_buckets(req.capacity)
    async with pool.acquire() as conn:
        await conn.execute("SELECT create_ticketed_event($1, $2, $3, $4, $5, $6)", event_id,
                           req.name, req.capacity, req.price, req.currency.lower(), buckets)
    return await get(pool, str(event_id))


async def get(pool: asyncpg.Pool, event_id: str) -> TicketedEvent:
    eid = parse_uuid(event_id, "event")
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT e.id, e.name, e.capacity, e.price, e.currency, e.buckets,
                   coalesce(sum(b.held), 0) AS held, coalesce(sum(b.sold), 0) AS sold,
                   (SELECT coalesce(sum(r.quantity), 0) FROM reservations r
                     WHERE r.event_id = e.id AND r.status = 'active'
                       AND r.expires_at <= clock_timestamp()) AS overdue
            FROM ticketed_events e LEFT JOIN inventory_buckets b ON b.event_id = e.id
            WHERE e.id = $1 GROUP BY e.id
            """, eid)
    if row is None:
        raise TicketedEventNotFound(f"no event {event_id}")
    held = row["held"] - row["overdue"]  # an overdue hold never counts, reaped or not
    return TicketedEvent(id=str(row["id"]), name=row["name"], capacity=row["capacity"],
                         price=row["price"], currency=row["currency"], buckets=row["buckets"],
                         held=held, sold=row["sold"], available=row["capacity"] - held - row["sold"])
