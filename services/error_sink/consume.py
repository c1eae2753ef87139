"""The sink's consumer lanes: fetch a batch, prepare it, store it in one transaction, ack.

Several lanes share the durable consumer, so while one waits for PostgreSQL another decodes
and scrubs. A batch is acked only after its commit; when the database is unavailable the batch
is nak'ed with a delay (redelivered soon, not after ``ack_wait``) and the lane backs off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import SimpleNamespace
from collections.abc import AsyncIterator, Callable

import asyncpg
import nats.errors
import prometheus_client
from nats.aio.msg import Msg

from boxoffice import db, wire
from boxoffice.bus import Bus
from boxoffice.error_sink import store
from boxoffice.error_sink.pull import Puller
from boxoffice.error_sink.sink import Row, prepare

log = logging.getLogger("boxoffice.error_sink")

STORED = prometheus_client.Counter("boxoffice_error_reports_stored_total",
                                   "Error reports written to error_logs (new ids only)")
RECEIVED = prometheus_client.Counter("boxoffice_error_reports_received_total",
                                     "Error reports taken from ERRORS (redeliveries included)")
FAILED = prometheus_client.Counter("boxoffice_error_batches_failed_total",
                                   "Batches that could not be written and were nak'ed")
BATCH_SECONDS = prometheus_client.Histogram("boxoffice_error_batch_seconds",
                                            "Time to store one batch")
NAK_DELAY = b'-NAK {"delay": 1000000000}'


def _safe_prepare(msg: Msg, now: object) -> Row:
    try:
        return prepare(msg, now)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a bug here must not block the stream
        log.exception("error report could not be prepared; stored as a placeholder")
        body = wire.encode({"message": f"[report could not be processed: {type(exc).__name__}]",
                            "context": {"raw": msg.data[:4096].decode(errors="replace")}})
        return prepare(SimpleNamespace(subject=msg.subject, data=body,  # type: ignore[arg-type]
                                       headers=msg.headers), now)


async def _send_all(bus: Bus, msgs: list[Msg], body: bytes) -> None:
    with contextlib.suppress(nats.errors.Error, OSError):
        for msg in msgs:
            if msg.reply:
                await bus.nc.publish(msg.reply, body)


async def run_lane(bus: Bus, pool: asyncpg.Pool, puller: Puller, policy: store.AlertPolicy,
                   stopping: asyncio.Event, on_alert: Callable[[], None], *,
                   batch: int = 1000) -> None:
    delay = 0.5
    while not stopping.is_set():
        try:
            msgs = await puller.fetch(batch, wait=1.0)
        except (nats.errors.Error, OSError) as exc:
            log.warning("error-sink: bus unavailable (%s)", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if not msgs:
            continue
        RECEIVED.inc(len(msgs))
        now = wire.now()
        rows = [_safe_prepare(m, now) for m in msgs]
        started = time.perf_counter()
        try:
            async with pool.acquire() as conn, conn.transaction():
                outcome = await store.write_batch(conn, rows, policy)
        except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
            FAILED.inc()
            log.warning("error-sink: batch of %d not stored (%s), will be redelivered",
                        len(msgs), type(exc).__name__)
            await _send_all(bus, msgs, NAK_DELAY)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        except Exception:  # noqa: BLE001 - a lane never dies; the batch comes back
            FAILED.inc()
            log.exception("error-sink: batch of %d failed, will be redelivered", len(msgs))
            await _send_all(bus, msgs, NAK_DELAY)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        delay = 0.5
        BATCH_SECONDS.observe(time.perf_counter() - started)
        await _send_all(bus, msgs, b"+ACK")
        STORED.inc(outcome.stored)
        if outcome.alerts:
            on_alert()


@contextlib.asynccontextmanager
async def lanes(bus: Bus, pool: asyncpg.Pool, stream: str, durable: str,
                policy: store.AlertPolicy, on_alert: Callable[[], None], *, count: int = 2,
                batch: int = 1000) -> AsyncIterator[None]:
    """Run ``count`` lanes; on exit let each finish its batch, then nak what is left."""
    stopping = asyncio.Event()
    pullers = [Puller(bus, stream, durable) for _ in range(count)]
    tasks = [asyncio.create_task(run_lane(bus, pool, p, policy, stopping, on_alert, batch=batch),
                                 name=f"error-sink-lane-{i}") for i, p in enumerate(pullers)]
    try:
        yield
    finally:
        stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        for p in pullers:
            await p.close()
