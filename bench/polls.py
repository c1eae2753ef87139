"""Waiting on the database in the benchmarks: a query polled until it holds, or an error."""

from __future__ import annotations

import asyncio
import time

import asyncpg


async def wait_until(db: asyncpg.Connection | asyncpg.Pool, sql: str, *args: object,
                     timeout: float = 60, every: float = 0.05) -> None:
    """Poll ``sql`` (one value) every ``every`` seconds until it is true; ``TimeoutError``
    past ``timeout`` (a figure is never computed from a wait that gave up)."""
    deadline = time.monotonic() + timeout
    while not await db.fetchval(sql, *args):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout:g}s: {sql}")
        await asyncio.sleep(every)
