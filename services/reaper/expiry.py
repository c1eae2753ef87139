"""Expires overdue holds in bounded batches, recording each run in ``reaper_runs``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

import asyncpg
import prometheus_client

from boxoffice import db

log = logging.getLogger("boxoffice.reaper")

EXPIRED = prometheus_client.Counter("boxoffice_holds_expired_total", "Holds expired by the reaper")
BATCH = 1000
REPLICA = f"{socket.gethostname()}:{os.getpid()}"


async def expire_once(pool: asyncpg.Pool, batch: int = BATCH) -> int:
    """Expire every overdue hold, a batch per transaction; returns how many."""
    total = 0
    async with pool.acquire() as conn:
        run_id = await conn.fetchval("INSERT INTO reaper_runs (kind, replica) VALUES ('expiry', $1) "
                                     "RETURNING id", REPLICA)
        try:
            while True:
                async with conn.transaction():
                    n = await conn.fetchval("SELECT expire_due_reservations($1)", batch)
                total += n
                if n < batch:
                    break
        except Exception as exc:
            with contextlib.suppress(Exception):
                await conn.execute("UPDATE reaper_runs SET finished_at = clock_timestamp(), "
                                   "expired = $2, error = $3 WHERE id = $1", run_id, total,
                                   f"{type(exc).__name__}: {exc}"[:500])
            raise
        await conn.execute("UPDATE reaper_runs SET finished_at = clock_timestamp(), expired = $2 "
                           "WHERE id = $1", run_id, total)
    EXPIRED.inc(total)
    return total


async def loop(pool: asyncpg.Pool, stopping: asyncio.Event, period: float = 1.0) -> None:
    while not stopping.is_set():
        try:
            await expire_once(pool)
        except (asyncpg.PostgresError, *db.UNAVAILABLE) as exc:
            log.error("expiry run failed: %s", type(exc).__name__)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), period)


@contextlib.asynccontextmanager
async def run(pool: asyncpg.Pool) -> AsyncIterator[None]:
    stopping = asyncio.Event()
    task = asyncio.create_task(loop(pool, stopping))
    try:
        yield
    finally:
        stopping.set()
        await task
