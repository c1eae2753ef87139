"""Helpers of the tests that call the SQL functions directly: seed events, holds and their
PaymentIntents, read back the rows a function changed (inventory, reservations, outbox), hear
NOTIFY on a connection of its own, and wait for another session to block on a lock."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from typing import Any

import asyncpg

from tests.harness import eventually


async def new_event(db: asyncpg.Pool | asyncpg.Connection, capacity: int = 10, buckets: int = 1,
                    price: int = 2500) -> uuid.UUID:
    return await db.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'show', $1, $2, "
                             "'eur', $3)", capacity, price, buckets)


async def hold(db: asyncpg.Pool | asyncpg.Connection, ev: uuid.UUID, quantity: int = 2,
               ttl: int = 900, client: str = "client", customer_ref: str | None = None,
               key: str | None = None) -> asyncpg.Record:
    """hold_tickets: the new reservation's row."""
    return await db.fetchrow("SELECT * FROM hold_tickets($1, $2, $3, $4, $5, $6)", ev, quantity,
                             client, ttl, customer_ref, key)


async def new_hold(db: asyncpg.Pool | asyncpg.Connection, ev: uuid.UUID, quantity: int = 2,
                   ttl: int = 900, client: str = "client") -> uuid.UUID:
    """hold_tickets: the new reservation's id."""
    return (await hold(db, ev, quantity, ttl, client))["id"]


async def paid_by(db: asyncpg.Pool, res: uuid.UUID, pi_id: str) -> None:
    """The checkout's record: the hold's PaymentIntent is ``pi_id``."""
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, 5000, 'eur', 'created')", pi_id, res)
    await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2", pi_id, res)


async def hold_with_intent(db: asyncpg.Pool, ev: uuid.UUID) -> tuple[uuid.UUID, str]:
    """A hold of two tickets and the PaymentIntent checkout recorded for it: (hold, intent)."""
    res, pi_id = await new_hold(db, ev), pi()
    await paid_by(db, res, pi_id)
    return res, pi_id


async def inventory(db: asyncpg.Pool, ev: uuid.UUID) -> tuple[int, int]:
    """(held, sold) of the event, over all its buckets."""
    row = await db.fetchrow("SELECT sum(held)::int AS held, sum(sold)::int AS sold "
                            "FROM inventory_buckets WHERE event_id = $1", ev)
    return row["held"], row["sold"]


async def buckets(db: asyncpg.Pool, ev: uuid.UUID) -> list[tuple[int, int, int]]:
    """(capacity, held, sold) of each bucket, in bucket order."""
    rows = await db.fetch("SELECT capacity, held, sold FROM inventory_buckets WHERE event_id = $1 "
                          "ORDER BY bucket", ev)
    return [tuple(r) for r in rows]


async def allocations(db: asyncpg.Pool, res: uuid.UUID) -> list[tuple[int, int]]:
    """(bucket, quantity) the hold took, in bucket order."""
    rows = await db.fetch("SELECT bucket, quantity FROM reservation_allocations "
                          "WHERE reservation_id = $1 ORDER BY bucket", res)
    return [tuple(r) for r in rows]


async def status(db: asyncpg.Pool, res: uuid.UUID) -> str:
    return await db.fetchval("SELECT status FROM reservations WHERE id = $1", res)


async def outbox(db: asyncpg.Pool, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(subject, payload) of the outbox rows whose subject starts with ``prefix``, in order."""
    rows = await db.fetch("SELECT subject, payload FROM outbox WHERE starts_with(subject, $1) "
                          "ORDER BY id", prefix)
    return [(r["subject"], r["payload"]) for r in rows]


async def rows_read(conn: asyncpg.Connection, table: str) -> int:
    """Rows of ``table`` this connection's transaction has read so far: fetched through an index,
    or read by a sequential scan (``pg_stat_xact_user_tables``)."""
    return await conn.fetchval("SELECT coalesce(idx_tup_fetch, 0) + seq_tup_read "
                               "FROM pg_stat_xact_user_tables WHERE relname = $1", table)


def pi() -> str:
    return f"pi_{uuid.uuid4().hex[:24]}"


def ts(text: str) -> datetime:
    """A timestamp as jsonb renders it."""
    return datetime.fromisoformat(text)


async def sqlstate_of(call: Awaitable[Any]) -> str:
    """The SQLSTATE ``call`` fails with (hold_tickets' own codes have no asyncpg class)."""
    try:
        await call
    except asyncpg.PostgresError as exc:
        return exc.sqlstate
    raise AssertionError("no error raised")


async def no_wait(conn: asyncpg.Connection) -> None:
    """Make ``conn`` fail fast instead of waiting for a lock (for checks that nothing waits)."""
    await conn.execute("SET lock_timeout = '2s'")


async def waiting_for_lock(db: asyncpg.Pool) -> None:
    """Return once some session of this test's database waits for a lock."""
    async def waits() -> bool:
        return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                 "current_database() AND wait_event_type = 'Lock'") > 0
    await eventually(waits, 5, "a session waiting for a lock", interval=0.02)


class Heard:
    """The payloads a LISTEN connection received on one channel, in order."""

    def __init__(self, db: asyncpg.Pool, channel: str) -> None:
        self.db, self.channel = db, channel
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def on(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    async def next(self) -> str:
        return await asyncio.wait_for(self.queue.get(), 5)

    async def nothing_more(self) -> None:
        """Nothing arrived since the last ``next``: a marker sent now is the next payload
        (notifications arrive in commit order)."""
        marker = f"marker-{uuid.uuid4().hex}"
        await self.db.execute("SELECT pg_notify($1, $2)", self.channel, marker)
        assert await self.next() == marker


@contextlib.asynccontextmanager
async def listening(db: asyncpg.Pool, channel: str) -> AsyncIterator[Heard]:
    heard = Heard(db, channel)
    async with db.acquire() as conn:
        await conn.add_listener(channel, heard.on)
        try:
            yield heard
        finally:
            await conn.remove_listener(channel, heard.on)
