"""Helpers of the reaper tests: the reaper's own database role, events and holds through the SQL
functions, the inventory invariant, and counting expiry events in the stream."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from contextlib import AbstractAsyncContextManager

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from boxoffice import db as dbmod
from tests.harness import login_url


def as_reaper(database_url: str) -> AbstractAsyncContextManager[asyncpg.Pool]:
    """A pool logged in as the reaper's own role, as deployed (retention runs as it)."""
    return dbmod.pool(login_url("reaper", database_url), min_size=1, max_size=2)


async def make_event(db: asyncpg.Pool, capacity: int, buckets: int = 1, price: int = 1000) -> str:
    return str(await db.fetchval(
        "SELECT create_ticketed_event(gen_random_uuid(), 'x', $1, $2, 'eur', $3)",
        capacity, price, buckets))


async def hold(db: asyncpg.Pool | asyncpg.Connection, event_id: str, quantity: int, ttl: int,
               client: str = "client") -> asyncpg.Record:
    return await db.fetchrow("SELECT id, expires_at FROM hold_tickets($1, $2, $3, $4)",
                             uuid.UUID(event_id), quantity, client, ttl)


async def hold_many(db: asyncpg.Pool, event_id: str, n: int, ttl: int) -> None:
    """``n`` holds of one ticket each, in one statement (one transaction)."""
    await db.execute("SELECT (hold_tickets($1, 1, 'client', $2)).id FROM generate_series(1, $3)",
                     uuid.UUID(event_id), ttl, n)


async def bulk_holds(db: asyncpg.Pool, event_id: str, n: int, ttl: float) -> None:
    """``n`` one-ticket holds spread evenly over the event's buckets, in one statement: what
    ``n`` calls of hold_tickets leave behind (without their 'held' events), thousands a second.
    ``n`` must be a multiple of the event's buckets."""
    await db.execute("""
        WITH r AS (
            INSERT INTO reservations (event_id, client_id, quantity, amount, currency, expires_at)
            SELECT e.id, 'bulk', 1, e.price, e.currency, clock_timestamp() + make_interval(secs => $3)
            FROM ticketed_events e, generate_series(1, $2) WHERE e.id = $1
            RETURNING id),
        n AS (SELECT r.id, (row_number() OVER () - 1) % e.buckets AS bucket
              FROM r, ticketed_events e WHERE e.id = $1),
        a AS (INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
              SELECT n.id, $1, n.bucket, 1 FROM n RETURNING bucket)
        UPDATE inventory_buckets b SET held = b.held + c.k
        FROM (SELECT bucket, count(*)::integer AS k FROM a GROUP BY bucket) c
        WHERE b.event_id = $1 AND b.bucket = c.bucket""", uuid.UUID(event_id), n, ttl)


async def hold_unannounced(db: asyncpg.Pool, event_id: str, quantity: int, ttl: int) -> asyncpg.Record:
    """A hold whose NOTIFY never fires (triggers off in this session): only a sweep finds it."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        return await hold(conn, event_id, quantity, ttl)


async def assert_inventory_consistent(db: asyncpg.Pool) -> None:
    """For every event: capacity = available + held + sold; held = active holds' tickets;
    sold = completed holds' tickets; and per bucket, held = active allocations in it."""
    rows = await db.fetch("""
        SELECT e.id, e.capacity, sum(b.capacity) AS cap, sum(b.held) AS held, sum(b.sold) AS sold,
               sum(b.capacity - b.held - b.sold) AS available,
               (SELECT coalesce(sum(quantity), 0) FROM reservations r
                WHERE r.event_id = e.id AND r.status = 'active') AS active_q,
               (SELECT coalesce(sum(quantity), 0) FROM reservations r
                WHERE r.event_id = e.id AND r.status = 'completed') AS completed_q
        FROM ticketed_events e JOIN inventory_buckets b ON b.event_id = e.id GROUP BY e.id""")
    for r in rows:
        assert r["cap"] == r["capacity"] == r["available"] + r["held"] + r["sold"], dict(r)
        assert r["held"] == r["active_q"] and r["sold"] == r["completed_q"], dict(r)
    bad = await db.fetch("""
        SELECT b.event_id, b.bucket, b.held, coalesce(sum(a.quantity), 0) AS allocated
        FROM inventory_buckets b
        LEFT JOIN reservation_allocations a ON a.event_id = b.event_id AND a.bucket = b.bucket
             AND EXISTS (SELECT 1 FROM reservations r WHERE r.id = a.reservation_id
                         AND r.status = 'active')
        GROUP BY b.event_id, b.bucket, b.held HAVING b.held <> coalesce(sum(a.quantity), 0)""")
    assert not bad, [dict(r) for r in bad]


def get_json(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


async def expired_events(nats_url: str, expect: int, timeout: float = 20.0) -> Counter[str]:
    """Every ``reservations.events.expired`` message in RESERVATIONS, counted by reservation id.

    Reads the stream from the start with a consumer of its own until ``expect`` messages came,
    then for one more second (so that a duplicate past ``expect`` would be seen)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "reservations.events.expired", durable=None, stream="RESERVATIONS",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
        counts: Counter[str] = Counter()
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1000, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio.TimeoutError, by path
                msgs = []
            for m in msgs:
                counts[json.loads(m.data)["reservation_id"]] += 1
            if sum(counts.values()) >= expect:
                quiet_until = quiet_until or time.monotonic() + 1.0
                if time.monotonic() >= quiet_until:
                    break
        await sub.unsubscribe()
        return counts
    finally:
        await nc.close()
