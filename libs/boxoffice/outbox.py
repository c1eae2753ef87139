"""The outbox relay: publishes domain events written in the same transaction as a state change.

Each service's relay claims only the rows of the subjects it owns (``bus_access.ACCESS[...]
.relays``), the only ones its NATS user may publish: the reaper's expiries (wherever a hold
expired), payment's holds, cancels and PaymentIntents, the webhook service's sales, returns,
refunds and failures. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (replicas share the
work), published with the row id as ``Nats-Msg-Id`` and deleted in the same transaction once
every PubAck is in. A crash after the publish and before the commit republishes the same ids,
which JetStream drops as duplicates within the stream's duplicate window: nothing lost, nothing
published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import prometheus_client

from boxoffice import bus as busmod
from boxoffice import db as dbmod
from boxoffice import errors

log = logging.getLogger("boxoffice.outbox")

PUBLISHED = prometheus_client.Counter("boxoffice_outbox_published_total",
                                      "Outbox rows published to JetStream")
CHANNEL = "boxoffice_outbox"


async def publish_batch(pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str],
                        limit: int = 500) -> int:
    """Publish up to ``limit`` pending rows of ``subjects``; returns how many were published."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, subject, payload::text AS payload FROM outbox "
            "WHERE subject = ANY($1::text[]) ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            list(subjects), limit)
        if not rows:
            return 0
        await asyncio.gather(*(bus.publish(r["subject"], r["payload"].encode(), str(r["id"]))
                               for r in rows))
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
    PUBLISHED.inc(len(rows))
    return len(rows)


async def listen(url: str, wake: asyncio.Event, stopping: asyncio.Event,
                 channel: str = CHANNEL) -> None:
    """Keep a LISTEN connection on ``channel`` open so that new rows wake their worker at once."""
    while not stopping.is_set():
        conn = None
        try:
            conn = await dbmod.connect(url, timeout=5)  # each server of a failover pair in turn
            await conn.add_listener(channel, lambda *_: wake.set())
            wake.set()  # catch up on anything written while we were not listening
            while not stopping.is_set() and not conn.is_closed():
                await asyncio.sleep(1)
                await conn.execute("SELECT 1", timeout=5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep listening whatever happens
            log.warning("%s listener lost (%s), retrying", channel, type(exc).__name__)
            await asyncio.sleep(1)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)


async def run_relay(url: str, pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str],
                    stopping: asyncio.Event, *, sweep_interval: float = 1.0,
                    wake: asyncio.Event | None = None) -> None:
    wake = asyncio.Event() if wake is None else wake
    listener = asyncio.create_task(listen(url, wake, stopping))
    delay = 0.1
    try:
        while not stopping.is_set():
            try:
                n = await publish_batch(pool, bus, subjects)
                delay = 0.1
            except (errors.ServiceUnavailable, *dbmod.UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("outbox relay paused (%s)", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if n:
                continue
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), sweep_interval)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


@contextlib.asynccontextmanager
async def relay(url: str, pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str]
                ) -> AsyncIterator[asyncio.Event]:
    """Run the relay of ``subjects`` in the background; on exit, stop it after its current batch.

    Yields the relay's wake-up event: a writer in this process whose transactions skip the
    NOTIFY (``boxoffice.outbox_quiet``, for throughput) sets it after committing outbox rows.
    """
    stopping = asyncio.Event()
    wake = asyncio.Event()
    task = asyncio.create_task(run_relay(url, pool, bus, subjects, stopping, wake=wake))
    try:
        yield wake
    finally:
        stopping.set()
        try:
            await asyncio.wait_for(task, 10)
        except asyncio.TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
