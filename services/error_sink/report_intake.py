"""Error reports taken from ERRORS: consumer lanes fetch a batch, turn it into rows, store it in one
transaction, ack.

Several lanes share the durable consumer, so while one waits for PostgreSQL another decodes
and scrubs. A batch is acked only after its commit; when the database is unavailable the batch
is nak'ed with a delay (redelivered soon, not after ``ack_wait``) and the lane backs off
(``boxoffice.consumer.PullConsumer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import asyncpg
import prometheus_client
from nats.aio.msg import Msg

from boxoffice import wire
from boxoffice.bus import Bus
from boxoffice.consumer import ack_all, pull_consumer
from boxoffice.error_sink import store
from boxoffice.error_sink.report_rows import Row, prepare

log = logging.getLogger("boxoffice.error_sink")

STORED = prometheus_client.Counter("boxoffice_error_reports_stored_total",
                                   "Error reports written to error_logs (new ids only)")
RECEIVED = prometheus_client.Counter("boxoffice_error_reports_received_total",
                                     "Error reports taken from ERRORS (redeliveries included)")
FAILED = prometheus_client.Counter("boxoffice_error_batches_failed_total",
                                   "Batches that could not be written and were nak'ed")
BATCH_SECONDS = prometheus_client.Histogram("boxoffice_error_batch_seconds",
                                            "Time to store one batch")
NAK_DELAY = 1.0  # seconds before a batch that was not stored comes back
# Messages converted between two turns of the event loop: a whole batch at once would hold up
# the other lanes' round trips to PostgreSQL (and the bus) for its whole conversion.
PREPARE_CHUNK = 100


def _safe_prepare(msg: Msg, now: object) -> Row:
    try:
        return prepare(msg, now)
    except Exception as exc:  # a bug here must not block the stream
        log.exception("error report could not be prepared; stored as a placeholder")
        body = wire.encode({"message": f"[report could not be processed: {type(exc).__name__}]",
                            "context": {"raw": msg.data[:4096].decode(errors="replace")}})
        return prepare(SimpleNamespace(subject=msg.subject, data=body,
                                       headers=msg.headers), now)


async def store_batch(bus: Bus, pool: asyncpg.Pool, policy: store.AlertPolicy,
                      on_alert: Callable[[], None], msgs: list[Msg]) -> None:
    """Prepare and store ``msgs`` in one transaction, then ack them; raises when not stored (the
    lane naks them with a delay and backs off)."""
    RECEIVED.inc(len(msgs))
    now = wire.now()
    rows: list[Row] = []
    for i in range(0, len(msgs), PREPARE_CHUNK):
        if i:
            await asyncio.sleep(0)
        rows += [_safe_prepare(m, now) for m in msgs[i:i + PREPARE_CHUNK]]
    started = time.perf_counter()
    try:
        outcome = await store.write(pool, rows, policy)
    except Exception:
        FAILED.inc()
        raise
    BATCH_SECONDS.observe(time.perf_counter() - started)
    await ack_all(bus, msgs)
    STORED.inc(outcome.stored)
    if outcome.alerts:
        on_alert()


@contextlib.asynccontextmanager
async def lanes(bus: Bus, pool: asyncpg.Pool, stream: str, durable: str,
                policy: store.AlertPolicy, on_alert: Callable[[], None], *, count: int = 2,
                batch: int = 1000) -> AsyncIterator[None]:
    """Run ``count`` lanes; on exit let each finish its batch, then nak what is left."""

    async def handle(msgs: list[Msg]) -> None:
        await store_batch(bus, pool, policy, on_alert, msgs)

    async with pull_consumer(bus, stream, durable, handle, lanes=count, batch=batch,
                             nak_delay=NAK_DELAY, grace=30):
        yield
