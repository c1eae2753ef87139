"""The outbox relay: publishes domain events written in the same transaction as a state change.

Each service's relay claims only the rows of the subjects it owns (``bus_access.ACCESS[...]
.relays``), the only ones its NATS user may publish: the reaper's expiries (wherever a hold
expired), payment's holds, cancels and PaymentIntents, the webhook service's sales, returns,
refunds and failures. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (replicas share the
work), published together with the row id as ``Nats-Msg-Id`` (``bus_batch.publish_all``: each
stream's rows as one JetStream atomic batch, or one by one when JetStream refuses the batch) and
deleted in the same transaction once the stream keeps them. A crash after the publish and
before the commit republishes the same ids: the atomic batch is refused for them, and of the
messages then sent one by one JetStream drops the known ids within the stream's duplicate
window: nothing lost, nothing published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import asyncpg
import prometheus_client

from boxoffice import background, bus_batch, errors
from boxoffice import bus as busmod
from boxoffice import db as dbmod

log = logging.getLogger("boxoffice.outbox")

PUBLISHED = prometheus_client.Counter("boxoffice_outbox_published_total",
                                      "Outbox rows published to JetStream")
CHANNEL = "boxoffice_outbox"
# Rows a relay pass publishes at most. A relay that has fallen behind needs fewer passes (each a
# claim, a delete and a commit) with more, but a pass of 1,000 holds its process's event loop
# longer: relaying beside the webhook service's applying (bench.webhooks --apply-only, six runs
# alternated) it got the events to JetStream sooner (1.24-1.43 s against 1.46-1.72) and took less
# of PostgreSQL's and nats-server's CPU, but applied 0.97 of the plain inserts against 1.03 with
# 500. The reaper, whose relay makes way for its sweeps, takes 1,000 (its ``expiry.EVENTS_BATCH``).
BATCH = 500
# The first ``$2`` pending rows of the subjects ``$1`` in id order, locked. Each subject is read
# from its own first row through the index on (subject, id), so that other services' rows (a
# backlog of expiry events, say) are never stepped over (ordered by the index's own key, which the
# planner cannot serve from the primary key), and the subjects' rows are merged by id:
# the n smallest unlocked ids are among the n smallest of their own subject. Rows locked for a
# subject but beyond the pass's n stay for the next pass (locked only until this one commits).
CLAIM = """
SELECT o.id, o.subject, o.payload::text AS payload
FROM unnest($1::text[]) AS s(subject)
CROSS JOIN LATERAL (
    SELECT x.id, x.subject, x.payload FROM outbox x
    WHERE x.subject = s.subject ORDER BY x.subject, x.id LIMIT $2 FOR UPDATE SKIP LOCKED) o
ORDER BY o.id LIMIT $2
"""


async def publish_batch(pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str],
                        limit: int = BATCH) -> int:
    """Publish up to ``limit`` pending rows of ``subjects``; returns how many were published."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(CLAIM, list(subjects), limit)
        if not rows:
            return 0
        # every row's PubAck in before any row is deleted; else ServiceUnavailable, rows kept
        await bus_batch.publish_all(bus, [(r["subject"], r["payload"].encode(), str(r["id"]))
                                          for r in rows])
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
    PUBLISHED.inc(len(rows))
    return len(rows)


async def listen(url: str, stopping: asyncio.Event, channel: str,
                 notified: Callable[[str], object],
                 connected: Callable[[bool], object] = lambda _up: None) -> None:
    """Keep a LISTEN connection on ``channel`` open until ``stopping``, so that new rows wake
    their worker at once: ``notified(payload)`` on each NOTIFY, ``connected(True)`` once
    listening (a worker catches up then on what was written while nobody listened) and
    ``connected(False)`` when the connection is lost. Reconnects with back-off and jitter."""

    async def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        notified(payload)

    while not stopping.is_set():
        conn: asyncpg.Connection | None = None
        async for attempt in background.backoff(Exception, initial=0.5, most=5.0):
            with attempt:
                if stopping.is_set():
                    return
                try:
                    # each server of a failover pair in turn, with a timeout of its own
                    conn = await dbmod.connect(url, timeout=5)
                    await conn.add_listener(channel, on_notify)
                except Exception as exc:
                    log.warning("%s listener cannot connect (%s), retrying", channel,
                                type(exc).__name__)
                    if conn is not None:
                        await _close(conn)
                    conn = None
                    raise
        assert conn is not None
        try:
            connected(True)
            while not conn.is_closed() and not await background.pause(stopping, 1.0):
                await conn.execute("SELECT 1", timeout=5)  # notice a dead connection
        except Exception as exc:  # noqa: BLE001 - keep listening whatever happens
            log.warning("%s listener lost (%s), reconnecting", channel, type(exc).__name__)
        finally:
            connected(False)
            await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close(timeout=2)


class Gate:
    """Work of this process that its relay makes way for: while some runs, a relay pass waits for
    it to end, but never later than ``most`` seconds after it began.

    The reaper expires a backlog of holds (one outbox row each) in a few batches that together
    take about a second for 100,000 holds; a relay publishing and deleting the first rows
    meanwhile takes CPU and database time from the expiry, which is what frees the seats. The
    events wait for the sweep instead, and go out together at its end; a sweep that lasts longer
    than ``most`` no longer holds them back. The relay waits only once it has caught up (its
    last pass was not full): sweeps back to back, each just under ``most``, would otherwise
    let it publish one pass per sweep while they write far more.
    """

    def __init__(self, most: float = 2.0) -> None:
        self.most = most
        self._running = 0
        self._since = 0.0  # loop time the current run of work began
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark work under way for the duration of the block (blocks may overlap)."""
        if self._running == 0:
            self._since = asyncio.get_running_loop().time()
            self._idle.clear()
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def wait(self, stopping: asyncio.Event) -> None:
        """Return once no work runs, or ``most`` seconds after the current work began."""
        if self._idle.is_set():
            return
        left = self._since + self.most - asyncio.get_running_loop().time()
        await background.pause(stopping, left, self._idle)


async def run_relay(pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str],
                    stopping: asyncio.Event, wake: asyncio.Event, *,
                    sweep_interval: float = 1.0, gate: Gate | None = None,
                    batch: int = BATCH) -> None:
    """Publish until ``stopping``, ``batch`` rows a pass at most: at once when ``wake`` is set
    (by the listener or a writer of this process), else every ``sweep_interval`` seconds; an
    outage is waited out. Once caught up, a pass first makes way for the work of ``gate``, if
    given."""
    caught_up = True  # the last pass was not full: nothing is waiting behind it

    async def step() -> int:
        nonlocal caught_up
        n = 0
        if gate is not None and caught_up:
            await gate.wait(stopping)
        async for attempt in background.backoff(
                (errors.ServiceUnavailable, *dbmod.FAILURES), initial=0.1, most=5.0):
            with attempt:
                if stopping.is_set():
                    return 0
                try:
                    n = await publish_batch(pool, bus, subjects, batch)
                except (errors.ServiceUnavailable, *dbmod.FAILURES) as exc:
                    log.warning("outbox relay paused (%s)", type(exc).__name__)
                    raise
        caught_up = n < batch
        return n

    await background.drain(step, stopping, wake, every=sweep_interval, batch=batch)


@contextlib.asynccontextmanager
async def relay(url: str, pool: asyncpg.Pool, bus: busmod.Bus, subjects: Sequence[str],
                gate: Gate | None = None, batch: int = BATCH) -> AsyncIterator[asyncio.Event]:
    """Run the relay of ``subjects`` in the background; on exit, stop it after its current batch.

    Yields the relay's wake-up event: a writer in this process whose transactions skip the
    NOTIFY (``boxoffice.outbox_quiet``, for throughput) sets it after committing outbox rows.
    Passes make way for the work of ``gate`` (see ``Gate``) and take ``batch`` rows at most.
    """
    wake = asyncio.Event()

    async def listening(stopping: asyncio.Event) -> None:
        await listen(url, stopping, CHANNEL, lambda _payload: wake.set(),
                     lambda up: wake.set() if up else None)

    async def relaying(stopping: asyncio.Event) -> None:
        await run_relay(pool, bus, subjects, stopping, wake, gate=gate, batch=batch)

    async with background.running("outbox relay", relaying, listening, grace=10, wake=wake):
        yield wake
