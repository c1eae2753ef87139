"""Expiry of holds, on time: sleep until the next ``expires_at``, wake early for a nearer one.

- A sweep expires every overdue hold in bounded batches, one transaction each
  (``reap_due_reservations``: SKIP LOCKED, buckets locked in a fixed order, one outbox event per
  hold), then asks the database when the next active hold expires and sleeps until then.
- The timer re-reads the next due time at least every ``ARM_SECONDS`` (one indexed query), so
  a new hold due later than that is armed before it is due without any wake-up. A trigger
  NOTIFYs ``boxoffice_reservations_due`` only for a hold due sooner (2 s: a short TTL, or a
  shortened hold), since notifying transactions cannot group-commit; such a hold, due sooner
  than the current alarm, moves it forward. NOTIFY is lost while nobody listens, so every
  (re)connection of the listener starts a sweep, and a catch-up sweep runs at least every
  ``sweep_seconds`` whatever happens.
- Several replicas run the same loop: SKIP LOCKED gives each hold to one of them, and the outbox
  relay publishes each event once (the outbox row id is the ``Nats-Msg-Id``).
- A failing database is retried with back-off and jitter; the outage is logged once and recorded in
  ``reaper_runs`` as soon as the database answers again, and the sweep then catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import prometheus_client

from boxoffice import background, bus_batch, db, outbox
from boxoffice.reaper import runs
from boxoffice.wire import reaper as wire

log = logging.getLogger("boxoffice.reaper")

CHANNEL = "boxoffice_reservations_due"
# The timer re-reads the next due time at least this often: the reservations_due trigger
# (libs/boxoffice/sql/expiry.sql) NOTIFYs only for holds due within 2 s, one second of margin
# over this period for the hold's commit and the query.
ARM_SECONDS = 1.0
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
# Rows a pass of the reaper's outbox relay publishes at most: one atomic batch. Its relay waits for
# a sweep (``outbox.Gate``) and then has the sweep's events to publish with nothing else of the
# process waiting on it: in bench.reaper, a mass expiry's 100,000 events were all on JetStream in
# 3.07-3.61 s with passes of 1,000 (eight runs) against 3.48-3.77 with the relays' 500 (three).
EVENTS_BATCH = bus_batch.ATOMIC_MAX

EXPIRED = prometheus_client.Counter("boxoffice_holds_expired_total", "Holds expired by the reaper")
LAG = prometheus_client.Histogram(
    "boxoffice_hold_expiry_lag_seconds", "How long past its expires_at a hold was released",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
SWEEP = prometheus_client.Histogram(
    "boxoffice_reaper_sweep_duration_seconds", "Duration of expiry sweeps that expired holds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
LAST_SWEEP = prometheus_client.Gauge("boxoffice_reaper_last_sweep_timestamp_seconds",
                                     "When the last expiry sweep succeeded (unix time)")
ERRORS = prometheus_client.Counter("boxoffice_reaper_errors_total",
                                   "Failed reaper runs", ["kind"])
RETRIED = prometheus_client.Counter("boxoffice_reaper_batch_retries_total",
                                    "Expiry batches retried after a deadlock or lock timeout")
LISTENING = prometheus_client.Gauge("boxoffice_reaper_listening",
                                    "1 while the reaper listens for new holds (NOTIFY)")

# lock conflicts that a retry of the same batch resolves
RETRYABLE = (*db.CONFLICTS, asyncpg.exceptions.LockNotAvailableError)
FAILURES = db.FAILURES
NEXT_DUE = ("SELECT extract(epoch FROM clock_timestamp())::float8 AS now, "
            "extract(epoch FROM (SELECT min(expires_at) FROM reservations "
            "WHERE status = 'active'))::float8 AS due")


async def expire_batches(conn: asyncpg.Connection, batch: int, event_id: str | None = None,
                         stopping: asyncio.Event | None = None) -> AsyncIterator[int]:
    """Expire overdue holds, ``batch`` per transaction, yielding each committed batch's count,
    until none is left (or ``stopping`` is set)."""
    attempts = 0
    while True:
        try:
            async with conn.transaction():
                rows = await conn.fetch("SELECT lag_seconds FROM reap_due_reservations($1, $2)",
                                        batch, event_id)
        except RETRYABLE:
            attempts += 1
            RETRIED.inc()
            if attempts >= 5:
                raise
            await asyncio.sleep(0.01 * attempts)
            continue
        attempts = 0
        for row in rows:
            LAG.observe(max(0.0, row["lag_seconds"]))
        EXPIRED.inc(len(rows))
        if rows:
            yield len(rows)
        if len(rows) < batch or (stopping is not None and stopping.is_set()):
            return


async def expire_now(pool: asyncpg.Pool, batch: int, event_id: str | None = None) -> tuple[int, int]:
    """Expire every overdue hold now (operators); recorded as a 'manual' run, even when 0.

    Returns (holds expired, run id). Raises what the database raised, after recording it when
    the database still answers.
    """
    started = runs.utcnow()
    total = 0
    async with pool.acquire() as conn:
        try:
            async for n in expire_batches(conn, batch, event_id):
                total += n
        except FAILURES as exc:
            ERRORS.labels("manual").inc()
            with contextlib.suppress(*FAILURES):
                await runs.insert(conn, REPLICA, runs.Run("manual", started, runs.utcnow(),
                                                           expired=total, error=runs.describe(exc)))
            raise
        run_id = await runs.insert(conn, REPLICA, runs.Run("manual", started, runs.utcnow(),
                                                            expired=total))
    return total, run_id


async def stats(pool: asyncpg.Pool) -> wire.ReservationStats:
    """``get_reservation_stats()``, plus how many active holds are overdue right now."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT s.*, (SELECT count(*) FROM reservations WHERE status = 'active' "
            "AND expires_at <= (SELECT clock_timestamp())) AS overdue "
            "FROM get_reservation_stats() s")
    return wire.ReservationStats(
        active=row["active_count"], expired=row["expired_count"],
        completed=row["completed_count"], cancelled=row["cancelled_count"],
        overdue=row["overdue"], oldest_active_hold=row["oldest_active_hold"],
        next_expiry=row["next_expiry"])


@dataclass
class Settings:
    batch: int = 5000  # holds per transaction (REAPER_BATCH_SIZE; see config)
    sweep_seconds: float = 1.0
    arm_seconds: float = ARM_SECONDS  # the next due time re-read at least this often
    max_backoff: float = 5.0
    # batches in flight at once while a backlog lasts (a full first batch), each on its own
    # connection: a flash sale's holds are expired by that many PostgreSQL backends (a batch is
    # off the CPU for part of its time: its commit's WAL flush, the round trips, the bucket
    # rows' locks a buyer holds). Two: measured against three, alternated on two cores
    # (bench.reaper, 100,000 holds due at once), two took 1.48-1.57 s and 15-16 us of
    # PostgreSQL CPU per hold, three 1.60-1.66 s and 17.5-18.7 us: backends inserting into
    # the same outbox and bucket pages cost each other more than the third one fills
    workers: int = 2


class Expirer:
    """The timer of one replica: when to sweep, and the sweeps themselves."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, replica: str = REPLICA,
                 gate: outbox.Gate | None = None):
        self.pool = pool
        self.settings = settings
        self.gate = outbox.Gate() if gate is None else gate  # the relay makes way for sweeps
        self.log = runs.ExpiryLog(replica)
        self.wake = asyncio.Event()
        self.deadline = 0.0  # loop time of the next sweep due to an expiry (0: now)
        self.offset = 0.0  # database clock minus this host's clock, seconds
        self.backoff = 0.0
        self.listening_since = math.inf  # loop time the listener last (re)connected
        self.armed = asyncio.Event()  # a sweep has run since the listener connected

    def nudge(self, due_epoch: float) -> None:
        """A hold expiring at ``due_epoch`` (database clock) appeared: wake for it if sooner."""
        loop = asyncio.get_running_loop()
        at = loop.time() + (due_epoch - (time.time() + self.offset))
        if at < self.deadline:
            self.deadline = at
            self.wake.set()

    async def rearm(self) -> None:
        """Move the alarm forward to the next active hold's expiry if it is sooner: new holds
        due later than ``ARM_SECONDS`` from now are not announced. A failure is left to the
        sweeps (which retry and record outages); the next re-read is a period away all the same."""
        async def read() -> asyncpg.Record:
            async with self.pool.acquire() as conn:
                return await self._next_due(conn)
        try:
            row = await asyncio.wait_for(read(), 5)
        except Exception as exc:  # noqa: BLE001 - the sweep's retries report the outage
            log.debug("next due time not read (%s)", type(exc).__name__)
            return
        # an overdue hold while backing off (a failed sweep, or holds another replica has
        # locked) waits for the back-off: only the sweep's own pace retries it
        if row["due"] is not None and (self.backoff == 0.0 or row["due"] > row["now"]):
            self.nudge(row["due"])

    async def _next_due(self, conn: asyncpg.Connection) -> asyncpg.Record:
        """The next active hold's expiry and the database's clock (``due``, ``now``), which
        keeps the offset between this process's clock and the database's up to date."""
        row = await conn.fetchrow(NEXT_DUE)
        self.offset = row["now"] - time.time()
        return row

    def sweep_soon(self) -> None:
        self.deadline = 0.0
        self.wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = last_armed = -math.inf
        while not stopping.is_set():
            wake_at = min(self.deadline, last_sweep + self.settings.sweep_seconds)
            now = loop.time()
            if wake_at > now:
                if now >= last_armed + self.settings.arm_seconds:
                    last_armed = now
                    await self.rearm()
                    continue
                self.wake.clear()
                await background.pause(stopping, min(wake_at, last_armed + self.settings.arm_seconds) - now,
                                       self.wake)
                continue
            last_armed = now  # a sweep reads the next due time too
            last_sweep = now
            self.deadline = math.inf  # nudges arriving during the sweep bring it back
            try:
                due_in = await self.sweep(stopping)
            except Exception as exc:  # noqa: BLE001 - nothing stops the timer; retried, recorded
                self._failed(exc)
                self.backoff = min(max(self.backoff * 2, 0.25), self.settings.max_backoff)
                # its own back-off, not stamina's: this wait is also the alarm that a new hold
                # moves forward. Jittered, so replicas do not all retry a returning PostgreSQL
                # at once.
                retry_in = self.backoff * random.uniform(0.5, 1.0)
                self.deadline = min(self.deadline, loop.time() + retry_in)
                last_sweep = loop.time()  # the back-off, not the catch-up period, paces retries
                continue
            self.deadline = min(self.deadline, loop.time() + due_in)
        await self._flush_on_exit()

    async def _flush_on_exit(self) -> None:
        """Record the work (or outage) still pending, if the database answers in time."""
        if self.log.work is None and self.log.outage is None:
            return

        async def flush() -> None:
            async with self.pool.acquire() as conn:
                await self.log.flush(conn, idle=True)
        with contextlib.suppress(*FAILURES):
            await asyncio.wait_for(flush(), 5)

    async def sweep(self, stopping: asyncio.Event) -> float:
        """Expire what is due; returns seconds until the next sweep is due."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        started = runs.utcnow()
        total = 0
        backlog = asyncio.Event()  # the first batch was full: more workers join

        async def worker(first: bool) -> None:
            nonlocal total
            try:
                async with self.pool.acquire() as conn:
                    async for n in expire_batches(conn, self.settings.batch, stopping=stopping):
                        total += n
                        if first and n >= self.settings.batch:
                            backlog.set()
            finally:
                if first:
                    backlog.set()  # done (or failed): nobody waits for a backlog any more

        async def helper() -> None:
            await backlog.wait()
            if total >= self.settings.batch:
                await worker(False)

        try:
            # every worker finishes its batch in hand (committed or rolled back) before the
            # first failure, if any, is raised; this process's relay publishes the expiry
            # events once the batches are done (or ``gate.most`` seconds into them)
            with self.gate.busy():
                results = await asyncio.gather(
                    worker(True), *(helper() for _ in range(self.settings.workers - 1)),
                    return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        finally:
            finished = runs.utcnow()
            if total:  # batches already committed count, even if a later one failed
                SWEEP.observe(loop.time() - t0)
                self.log.worked(started, finished, total)
        async with self.pool.acquire() as conn:
            row = await self._next_due(conn)
            due_in = math.inf if row["due"] is None else row["due"] - row["now"]
            if total == 0 and due_in <= 0:
                # overdue holds that another replica (or a completion) has locked: do not spin
                self.backoff = min(max(self.backoff * 2, 0.05), 1.0)
                due_in = self.backoff
            else:
                self.backoff = 0.0
            if self.log.outage is not None:
                log.info("expiry recovered after %d failed attempts", self.log.outage.failures)
            await self.log.flush(conn, idle=due_in > 0.5)
        LAST_SWEEP.set_to_current_time()
        if t0 >= self.listening_since:
            self.armed.set()
        return max(due_in, 0.0)

    def _failed(self, exc: BaseException) -> None:
        ERRORS.labels("expiry").inc()
        at = runs.utcnow()
        if self.log.failed(at, at, exc):
            if isinstance(exc, FAILURES):
                log.error("expiry failed, retrying: %s", runs.describe(exc))
            else:  # a bug, not an outage: keep the stack
                log.exception("expiry failed, retrying: %s", runs.describe(exc))


def _on_listening(expirer: Expirer, up: bool) -> None:
    LISTENING.set(1 if up else 0)
    if up:
        expirer.listening_since = asyncio.get_running_loop().time()
        expirer.sweep_soon()  # holds inserted while nobody listened


def _on_notify(expirer: Expirer, payload: str) -> None:
    with contextlib.suppress(ValueError):
        expirer.nudge(float(payload))


@contextlib.asynccontextmanager
async def run(pool: asyncpg.Pool, url: str, settings: Settings,
              gate: outbox.Gate | None = None) -> AsyncIterator[Expirer]:
    """Run the timer and its listener for new holds (each (re)connection starts a catch-up
    sweep); on exit, finish the batch in hand and stop. Sweeps keep ``gate`` busy: the
    outbox relay given the same gate makes way for them."""
    expirer = Expirer(pool, settings, gate=gate)

    async def listening(stopping: asyncio.Event) -> None:
        await outbox.listen(url, stopping, CHANNEL, lambda payload: _on_notify(expirer, payload),
                            lambda up: _on_listening(expirer, up))

    async with background.running("expiry", expirer.run, listening, grace=15,
                                  wake=expirer.wake):
        # ready once armed: listening for new holds and swept since (bounded: the database may
        # be slow; the timer keeps trying either way)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(expirer.armed.wait(), 10)
        yield expirer
