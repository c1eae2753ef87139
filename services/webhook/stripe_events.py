"""Applies Stripe events from STRIPE_EVENTS exactly once.

For each message, one transaction: claim the event's row in ``webhook_events_log``, apply its
effects, commit; only then ack. A crash before the commit leaves nothing and the message is
redelivered; a crash after it finds the row done on redelivery and acks without effect.

Failures, and how often they are retried:
- PostgreSQL unreachable: nothing can be recorded, so the message is nak'ed with a delay and
  the consumer pauses until the database answers. These retries are not counted: the JetStream
  consumer has no ``max_deliver``, so an outage of any length loses no event.
- the event's own failure (an effect raised): the attempt is counted in
  the event's row and the message nak'ed with the next delay of ``WEBHOOK_RETRY_DELAYS``; after
  the last attempt the row is marked ``failed`` (replayable by an operator), an error reported,
  and the message terminated.
- a deadlock or serialization failure is retried at once, a few times, before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

import asyncpg
import msgspec
import nats.errors
import prometheus_client
from nats.aio.msg import Msg

from boxoffice import bus as busmod
from boxoffice import background, db, wire
from boxoffice.consumer import settle
from boxoffice.webhook import effects, stripe_event_log
from boxoffice.webhook.effects import ApplyOutcome, Outcome
from boxoffice.wire.stripe import StripeEvent, WebhookStatus

log = logging.getLogger("boxoffice.webhook")

ACK_WAIT = 10.0  # seconds; work that takes longer is kept alive with in_progress()
DB_RETRY_DELAY = 2.0  # PostgreSQL away (db.UNAVAILABLE): waited for, never counted against an event
QUIET_OUTCOMES = frozenset({ApplyOutcome.DUPLICATE, ApplyOutcome.IGNORED, ApplyOutcome.STALE,
                            ApplyOutcome.PARTIAL_REFUND, ApplyOutcome.NO_PAYMENT_INTENT})


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


class Processor:
    """Applies one event in one transaction (used by the consumer and by operator replays)."""

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

    async def process(self, event: StripeEvent, raw: str,
                      conn: asyncpg.Connection | None = None) -> Outcome:
        """Apply ``event`` once (on ``conn``, else a pooled connection); raises if not applied."""
        if event.livemode is not None and event.livemode != self.live:
            raise LivemodeMismatch(
                f"a {'live' if event.livemode else 'test'}-mode event for a "
                f"{'live' if self.live else 'test'}-mode key: refused")
        outcome = await db.retrying(lambda: effects.apply(conn or self.pool, event, raw),
                                    attempts=3)
        APPLIED.labels(event.type, outcome.name).inc()
        if self.relay_wake is not None and outcome.name not in QUIET_OUTCOMES:
            self.relay_wake.set()
        for report in outcome.reports:  # committed: now it may be told
            log.log(report.level, report.message, extra=report.context)
        return outcome

    async def fail(self, event: StripeEvent, raw: str, exc: BaseException,
                   conn: asyncpg.Connection | None = None) -> tuple[int, WebhookStatus] | None:
        """Count a failed attempt (``stripe_event_log.record_failure``); report a final failure."""
        FAILED_ATTEMPTS.inc()
        async with contextlib.AsyncExitStack() as stack:
            if conn is None:
                conn = await stack.enter_async_context(self.pool.acquire())
            result = await stripe_event_log.record_failure(conn, event, raw, describe(exc),
                                                           self.max_attempts,
                                                           final=isinstance(exc, PERMANENT))
        if result is not None and result[1] is WebhookStatus.FAILED:
            log.error("stripe event %s (%s) failed after %d attempts: %s", event.id, event.type,
                      result[0], describe(exc),
                      extra={"event_id": event.id, "event_type": event.type,
                             "attempts": result[0]})
        else:
            log.warning("stripe event %s (%s) failed, will retry: %s", event.id, event.type,
                        describe(exc))
        return result


class Consumer:
    """The JetStream handler: messages applied concurrently, each acked after its commit.

    ``concurrency`` workers, each on a connection of its own (no pool round per event), take
    messages from a queue. A batch is not waited for to its end: once fewer than ``backlog``
    messages are left, the next batch is fetched, so the database always has work in hand.
    """

    def __init__(self, processor: Processor, *, concurrency: int = 16, backlog: int = 256):
        self.processor = processor
        self.concurrency = concurrency
        self.backlog = backlog
        self._queue: asyncio.Queue[tuple[Msg, StripeEvent, str]] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._pending = 0  # queued or being applied
        self._room = asyncio.Event()
        self._inflight: dict[int, tuple[Msg, float]] = {}  # by id(): Msg is unhashable
        self._db_down = False

    async def __call__(self, msgs: list[Msg]) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        for msg in msgs:
            try:
                event = wire.decode(msg.data, StripeEvent)
                raw = msg.data.decode()
            except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
                # ingress checks every event before publishing: this did not come from Stripe
                log.error("message on %s is not a Stripe event: dropped", msg.subject)
                await settle(msg, "term")
                continue
            self._inflight[id(msg)] = (msg, time.monotonic())
            self._pending += 1
            self._queue.put_nowait((msg, event, raw))
        while self._pending > self.backlog:
            self._room.clear()
            await self._room.wait()
        if self._db_down:
            await self._wait_for_database()

    async def _work(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                msg, event, raw = await self._queue.get()
                busmod.adopt_request_id(msg)
                try:
                    if self._db_down:
                        await settle(msg, "nak", DB_RETRY_DELAY)
                        continue
                    if conn is None:
                        conn = await self.processor.pool.acquire()
                    if not await self._apply(msg, event, raw, conn):
                        await self.processor.pool.release(conn)  # broken: take a fresh one
                        conn = None
                except db.UNAVAILABLE:
                    self._database_lost(msg)
                    await settle(msg, "nak", DB_RETRY_DELAY)
                except Exception:  # a worker never dies; the message comes back
                    log.exception("applying stripe event %s crashed", event.id)
                    await settle(msg, "nak", DB_RETRY_DELAY)
                finally:
                    self._inflight.pop(id(msg), None)
                    self._pending -= 1
                    if self._pending <= self.backlog:
                        self._room.set()
                    self._queue.task_done()
        finally:
            if conn is not None:
                await self.processor.pool.release(conn)

    async def drain(self, timeout: float = 30.0) -> None:
        """Finish what was fetched (on shutdown, once fetching has stopped), then stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def _apply(self, msg: Msg, event: StripeEvent, raw: str,
                     conn: asyncpg.Connection) -> bool:
        """Apply, then ack / nak / term; False if the connection turned out to be broken."""
        try:
            await self.processor.process(event, raw, conn)
        except db.UNAVAILABLE:
            self._database_lost(msg)
            await settle(msg, "nak", DB_RETRY_DELAY)
            return False
        except Exception as exc:  # any failure of the event is counted and retried
            try:
                result = await self.processor.fail(event, raw, exc, conn)
            except db.UNAVAILABLE:
                self._database_lost(msg)
                await settle(msg, "nak", DB_RETRY_DELAY)
                return False
            if result is None:  # applied meanwhile (a concurrent delivery)
                await settle(msg, "ack")
            elif result[1] is WebhookStatus.FAILED:
                await settle(msg, "term")
            else:
                await settle(msg, "nak", self.processor.delay(result[0]))
            return not conn.is_closed()
        await settle(msg, "ack")
        return True

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
