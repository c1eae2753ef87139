"""Applies Stripe events from STRIPE_EVENTS exactly once, in batches.

A worker takes up to ``WEBHOOK_BATCH_SIZE`` queued messages and applies them in one
transaction, each event in a savepoint of its own (or, for the successes that complete active
holds and touch nothing else of the batch, all together set-based, rolled back whole and taken
one at a time if that fails): claim the event's row in ``webhook_events_log``, apply its
effects. An event that fails is rolled back to its savepoint alone and its failed attempt
counted in the same transaction, so its neighbours still commit.
Only after the commit are the messages settled (acked, or nak'ed / terminated for the failed
ones) and the reports logged. A crash before the commit leaves nothing and the whole batch is
redelivered and applied from scratch; a crash after it finds each row done on redelivery and
acks without effect. A batch is applied in delivery order, so events of one PaymentIntent keep
their order within it.

Failures, and how often they are retried:
- PostgreSQL unreachable (or the commit fails): nothing can be recorded, so the batch is nak'ed
  with a delay and the consumer pauses until the database answers. These retries are not
  counted: the JetStream consumer has no ``max_deliver``, so an outage of any length loses no
  event.
- the event's own failure (an effect raised): the attempt is counted in
  the event's row and the message nak'ed with the next delay of ``WEBHOOK_RETRY_DELAYS``; after
  the last attempt the row is marked ``failed`` (replayable by an operator), an error reported,
  and the message terminated.
- a deadlock or serialization failure rolls back the event's savepoint, which is run again at
  once, a few times, before it counts.
- an event that fails the batch's statement itself (an argument PostgreSQL cannot take): the
  batch, of which nothing was committed, is applied again one event at a time, so that only
  that event's attempt is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
import nats.errors
import prometheus_client
from nats.aio.msg import Msg

from boxoffice import background, db
from boxoffice import bus as busmod
from boxoffice.consumer import settle
from boxoffice.webhook import effects, stripe_event_log
from boxoffice.webhook.effects import ApplyOutcome, EventHead, Outcome
from boxoffice.wire.stripe import StripeEvent, WebhookStatus

log = logging.getLogger("boxoffice.webhook")

ACK_WAIT = 10.0  # seconds; work that takes longer is kept alive with in_progress()
DB_RETRY_DELAY = 2.0  # PostgreSQL away (db.UNAVAILABLE): waited for, never counted against an event
QUIET_OUTCOMES = frozenset({ApplyOutcome.DUPLICATE, ApplyOutcome.IGNORED, ApplyOutcome.STALE,
                            ApplyOutcome.PARTIAL_REFUND, ApplyOutcome.NO_PAYMENT_INTENT})


# a delivery: its message, its event, the event's text and its arguments (effects.delivered)
Item = tuple[Msg, effects.Delivery, str, effects.Args | msgspec.ValidationError]


class LivemodeMismatch(Exception):
    """A live event for a test key, or a test event for a live key: refused, never applied."""


PERMANENT = (msgspec.ValidationError, LivemodeMismatch)  # the event itself does not fit

APPLIED = prometheus_client.Counter("boxoffice_webhook_events_total",
                                    "Stripe events handled, by type and outcome",
                                    ["event_type", "outcome"])
FAILED_ATTEMPTS = prometheus_client.Counter("boxoffice_webhook_failed_attempts_total",
                                            "Failed attempts to apply a Stripe event")
DB_WAITS = prometheus_client.Counter("boxoffice_webhook_database_waits_total",
                                     "Deliveries put back because PostgreSQL was unreachable")


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Failure:
    """An event whose attempt failed: why, and its row after the count (``record_failure``)."""

    exc: BaseException
    # (attempts, status) after the count; None: the event was applied meanwhile
    result: tuple[int, WebhookStatus] | None


class Processor:
    """Applies events: one in a transaction of its own (``process``, also for operator
    replays), or a batch in one transaction (``apply_batch``)."""

    def __init__(self, pool: asyncpg.Pool, retry_delays: Sequence[float],
                 relay_wake: asyncio.Event | None = None, *, live: bool = False):
        self.pool = pool
        self.live = live  # the mode of our Stripe key: events of the other mode are refused
        self.retry_delays = tuple(retry_delays)
        # apply_stripe_event skips the outbox NOTIFY (see the migration): wake our relay instead
        self.relay_wake = relay_wake

    @property
    def max_attempts(self) -> int:
        return len(self.retry_delays) + 1

    def delay(self, attempts: int) -> float:
        return self.retry_delays[min(attempts, len(self.retry_delays)) - 1] if self.retry_delays else 0

    def _refuse_other_mode(self, event: EventHead) -> None:
        if event.livemode is not None and event.livemode != self.live:
            raise LivemodeMismatch(
                f"a {'live' if event.livemode else 'test'}-mode event for a "
                f"{'live' if self.live else 'test'}-mode key: refused")

    async def process(self, event: StripeEvent, raw: str,
                      conn: asyncpg.Connection | None = None) -> Outcome:
        """Apply ``event`` once (on ``conn``, else a pooled connection); raises if not applied."""
        self._refuse_other_mode(event)
        outcome = await db.retrying(lambda: effects.apply(conn or self.pool, event, raw),
                                    attempts=3)
        self.applied(event, outcome)
        return outcome

    async def apply_batch(self, events: Sequence[tuple[EventHead, str]],
                          conn: asyncpg.Connection,
                          args: Sequence[effects.Args | msgspec.ValidationError] | None = None
                          ) -> list[Outcome | Failure]:
        """Apply ``events`` in order in one transaction on ``conn``, each in a savepoint
        (``effects.apply_many``); an event that fails is rolled back alone and its attempt
        counted in the same transaction.

        Raises (and nothing is committed, nothing counted) if the transaction itself fails.
        Once this returns, the caller tells each result (``applied``, ``failed``). ``args``:
        each event's ``effects.parsed`` (or ``effects.delivered``), if read already.
        """
        results: list[Outcome | Failure | None] = [None] * len(events)
        todo: list[int] = []
        for n, (event, _) in enumerate(events):
            try:
                self._refuse_other_mode(event)
                todo.append(n)
            except LivemodeMismatch as exc:
                results[n] = Failure(exc, None)
        async with conn.transaction():
            applied = await effects.apply_many(conn, [events[n] for n in todo],
                                               None if args is None else [args[n] for n in todo])
            for n, result in zip(todo, applied, strict=True):
                results[n] = Failure(result, None) if isinstance(result, Exception) else result
            for n, result in enumerate(results):
                if isinstance(result, Failure):
                    event, raw = events[n]
                    result.result = await self.record(event, raw, result.exc, conn)
        done = [r for r in results if r is not None]
        assert len(done) == len(events)
        return done

    def applied(self, event: EventHead, outcome: Outcome) -> None:
        """Count and report an applied event; only once it is committed."""
        APPLIED.labels(event.type, outcome.name).inc()
        if self.relay_wake is not None and outcome.name not in QUIET_OUTCOMES:
            self.relay_wake.set()
        for report in outcome.reports:  # committed: now it may be told
            log.log(report.level, report.message, extra=report.context)

    async def fail(self, event: EventHead, raw: str, exc: BaseException,
                   conn: asyncpg.Connection | None = None) -> tuple[int, WebhookStatus] | None:
        """Count a failed attempt (``stripe_event_log.record_failure``); report a final failure."""
        async with contextlib.AsyncExitStack() as stack:
            if conn is None:
                conn = await stack.enter_async_context(self.pool.acquire())
            failure = Failure(exc, await self.record(event, raw, exc, conn))
        self.failed(event, failure)
        return failure.result

    async def record(self, event: EventHead, raw: str, exc: BaseException,
                     conn: asyncpg.Connection) -> tuple[int, WebhookStatus] | None:
        """Count a failed attempt on ``conn`` (in its transaction, if one is open); tell it with
        ``failed`` once that is committed."""
        return await stripe_event_log.record_failure(conn, event, raw, describe(exc),
                                                     self.max_attempts,
                                                     final=isinstance(exc, PERMANENT))

    def failed(self, event: EventHead, failure: Failure) -> None:
        """Count and report a failed attempt; only once its count is committed."""
        FAILED_ATTEMPTS.inc()
        result, exc = failure.result, failure.exc
        if result is not None and result[1] is WebhookStatus.FAILED:
            log.error("stripe event %s (%s) failed after %d attempts: %s", event.id, event.type,
                      result[0], describe(exc),
                      extra={"event_id": event.id, "event_type": event.type,
                             "attempts": result[0]})
        else:
            log.warning("stripe event %s (%s) failed, will retry: %s", event.id, event.type,
                        describe(exc))


class Consumer:
    """The JetStream handler: messages applied concurrently in batches, acked after the commit.

    ``concurrency`` lanes, each a queue and a worker on a connection of its own (no pool round
    per batch), which takes up to ``batch_size`` messages from its queue (what is there: it does
    not wait to fill a batch). An event goes to the lane of the inventory bucket its hold takes
    tickets from, so that the batches of two lanes, each holding its buckets until its commit,
    do not wait on each other. A fetch is not waited for to its end: once fewer than ``backlog``
    messages are left, the next one is fetched, so the database always has work in hand.
    """

    def __init__(self, processor: Processor, *, concurrency: int = 16, backlog: int = 256,
                 batch_size: int = 128):
        self.processor = processor
        self.concurrency = concurrency
        self.backlog = backlog
        self.batch_size = batch_size
        self._lanes: list[asyncio.Queue[Item]] = [
            asyncio.Queue() for _ in range(concurrency)]
        self._workers: list[asyncio.Task[None]] = []
        self._pending = 0  # queued or being applied
        self._room = asyncio.Event()
        self._inflight: dict[int, tuple[Msg, float]] = {}  # by id(): Msg is unhashable
        self._db_down = False

    async def __call__(self, msgs: list[Msg]) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(lane)) for lane in self._lanes]
        decoded: list[Item] = []
        for msg in msgs:
            try:
                event, args = effects.delivered(msg.data)
                decoded.append((msg, event, msg.data.decode(), args))
            except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
                # ingress checks every event before publishing: this did not come from Stripe
                log.error("message on %s is not a Stripe event: dropped", msg.subject)
                await settle(msg, "term")
        lanes = await self._route(decoded)
        for item, lane in zip(decoded, lanes, strict=True):
            self._inflight[id(item[0])] = (item[0], time.monotonic())
            self._pending += 1
            self._lanes[lane].put_nowait(item)
        while self._pending > self.backlog:
            self._room.clear()
            await self._room.wait()
        if self._db_down:
            await self._wait_for_database()

    async def _route(self, items: list[Item]) -> list[int]:
        """A lane for each event: that of its hold's first bucket; else (no hold, or the
        buckets could not be read) that of its hold, or of its own id."""
        events = [event for _, event, _, _ in items]
        holds = [effects.hold_of(args) for _, _, _, args in items]
        buckets: dict[uuid.UUID, tuple[str, int]] = {}
        if not self._db_down:
            with contextlib.suppress(*db.UNAVAILABLE, asyncpg.PostgresError):
                buckets = await effects.first_buckets(self.processor.pool,
                                                      {h for h in holds if h is not None})
        lanes = []
        for event, hold in zip(events, holds):
            if hold in buckets:  # the buckets of one ticketed event on consecutive lanes
                ticketed, bucket = buckets[hold]
                lanes.append((hash(ticketed) + bucket) % self.concurrency)
            else:
                lanes.append(hash(str(hold) if hold is not None else event.id) % self.concurrency)
        return lanes

    async def _take(self, lane: asyncio.Queue[Item]
                    ) -> list[Item]:
        batch = [await lane.get()]
        while len(batch) < self.batch_size and not lane.empty():
            batch.append(lane.get_nowait())
        return batch

    async def _work(self, lane: asyncio.Queue[Item]) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                batch = await self._take(lane)
                try:
                    if self._db_down:
                        await _put_back(batch, DB_RETRY_DELAY)
                        continue
                    if conn is None:
                        conn = await self.processor.pool.acquire()
                    if not await self._apply(batch, conn):
                        await self.processor.pool.release(conn)  # broken: take a fresh one
                        conn = None
                except db.UNAVAILABLE:
                    self._database_lost(batch[0][0])
                    await _put_back(batch, DB_RETRY_DELAY)
                except Exception:  # a worker never dies; the messages come back
                    log.exception("applying %d stripe events crashed", len(batch))
                    await _put_back(batch, DB_RETRY_DELAY)
                finally:
                    for msg, _, _, _ in batch:
                        self._inflight.pop(id(msg), None)
                        lane.task_done()
                    self._pending -= len(batch)
                    if self._pending <= self.backlog:
                        self._room.set()
        finally:
            if conn is not None:
                await self.processor.pool.release(conn)

    async def drain(self, timeout: float = 30.0) -> None:
        """Finish what was fetched (on shutdown, once fetching has stopped), then stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in self._lanes)),
                                   timeout)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def _apply(self, batch: list[Item],
                     conn: asyncpg.Connection) -> bool:
        """Apply, commit, then ack / nak / term each; False if the connection is broken."""
        events = [(event, raw) for _, event, raw, _ in batch]
        try:
            results = await self.processor.apply_batch(events, conn,
                                                       [args for _, _, _, args in batch])
        except db.UNAVAILABLE:  # the commit too: nothing applied, nothing counted
            self._database_lost(batch[0][0])
            await _put_back(batch, DB_RETRY_DELAY)
            return False
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole: nothing committed
            if len(batch) > 1:  # an event fails the batch's statement itself: each alone
                log.warning("%d stripe events failed together (%s): applied one at a time",
                            len(batch), describe(exc))
                for n in range(len(batch)):
                    if not await self._apply(batch[n:n + 1], conn):
                        await _put_back(batch[n + 1:], DB_RETRY_DELAY)
                        return False
                return True
            try:  # an argument PostgreSQL cannot take, say: the event's own failure, counted
                results = [Failure(exc, await self.processor.record(*events[0], exc, conn))]
            except db.UNAVAILABLE:
                self._database_lost(batch[0][0])
                await _put_back(batch, DB_RETRY_DELAY)
                return False
        for (msg, event, _, _), result in zip(batch, results, strict=True):
            busmod.adopt_request_id(msg)
            if not isinstance(result, Failure):
                self.processor.applied(event, result)
                await settle(msg, "ack")
                continue
            self.processor.failed(event, result)
            if result.result is None:  # applied meanwhile (a concurrent delivery)
                await settle(msg, "ack")
            elif result.result[1] is WebhookStatus.FAILED:
                await settle(msg, "term")
            else:
                await settle(msg, "nak", self.processor.delay(result.result[0]))
        return not conn.is_closed()

    def _database_lost(self, msg: Msg) -> None:
        DB_WAITS.inc()
        if not self._db_down:
            log.warning("postgres unreachable: deliveries wait (event on %s put back)", msg.subject)
        self._db_down = True

    async def _wait_for_database(self, most: float = 10.0) -> None:
        with contextlib.suppress(_StillDown):  # then the next batch is put back, and we wait again
            async for attempt in background.backoff(_StillDown, initial=0.5, most=2.0,
                                                    timeout=most):
                with attempt:
                    if not await db.ping(self.processor.pool):
                        raise _StillDown
            log.info("postgres reachable again: resuming")
            self._db_down = False

    async def keep_alive(self, stopping: asyncio.Event) -> None:
        """Tell JetStream that long-running deliveries (a slow refund) are still being worked on."""
        every = ACK_WAIT / 3
        while not await background.pause(stopping, every):
            now = time.monotonic()
            for msg, started in list(self._inflight.values()):
                if now - started >= every:
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await msg.in_progress()


async def _put_back(batch: list[Item], delay: float) -> None:
    """Nothing of ``batch`` was committed: redeliver each message after ``delay``, uncounted."""
    for msg, _, _, _ in batch:
        await settle(msg, "nak", delay)


class _StillDown(Exception):
    """PostgreSQL does not answer yet."""


@contextlib.asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[Consumer]:
    """Keep long deliveries alive while running; on exit, finish what was fetched."""
    async with background.running("webhook keep-alive", consumer.keep_alive, grace=5):
        try:
            yield consumer
        finally:
            await consumer.drain()  # (the keep-alive goes on meanwhile)
