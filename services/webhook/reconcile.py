"""Reconciliation with Stripe: what webhooks missed is recovered from Stripe's own records.

Stripe stops redelivering an event after three days, so an endpoint misconfigured or an outage
longer than that would lose events for good. Every ``STRIPE_RECONCILE_INTERVAL_SECONDS`` one
replica (the lease in ``stripe_reconciliation``, see reconcile_runs.py) runs three passes. Each
looks only at what is older than ``STRIPE_RECONCILE_GRACE_SECONDS``: younger events are still
being delivered, younger PaymentIntents still being recorded by their checkout.

1. Events. Stripe's events since the last reconciled point (less ``OVERLAP``, for events that
   show up in Stripe's list a little late), an hour at a time, oldest first: each one missing
   from ``webhook_events_log`` is published on ``stripe.events.<type>`` with its id as
   ``Nats-Msg-Id``, exactly as ingress publishes a delivered one, and applied by the consumer
   like any other (once, whatever else delivers it). The point moves past an event only once it
   was fed; a failure leaves it there for the next run. The PaymentIntents of events younger
   than the grace are noted as in flight: the next two passes leave them to their events.
2. Payments. Payments still created, processing or failed after the grace are compared with
   their PaymentIntent at Stripe (a bounded batch per run, those compared longest ago first).
   Where Stripe is further along, its state is fed as an event of our own making,
   ``evt_reconcile_<pi>_<kind>``, carrying the PaymentIntent as retrieved: the apply path moves a
   payment only forward, so such an event can never undo what a real one did.
3. Orphans. PaymentIntents created at Stripe whose ``metadata.reservation_id`` names one of our
   holds but that we never recorded (a checkout that died between Stripe's answer and its
   commit): a succeeded or processing one is fed the same way (the apply path sells the hold or
   decides a refund); a cancellable one has its cancel decided (``request_stripe_action``,
   reason ``orphan``; the action worker makes it). Each is recorded in ``stripe_orphans``.

A failure of Stripe, NATS or PostgreSQL ends the run: it is recorded on the run, logged (an
error once it happened ``REPORT_AFTER`` times in a row) and the next interval tries again. The
service never stops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgspec
import prometheus_client
import stripe

from boxoffice import background, db, errors
from boxoffice.bus import Bus
from boxoffice.webhook import reconcile_runs as runs
from boxoffice.webhook.actions import CANCELLABLE
from boxoffice.wire.stripe import OrphanAction, StripeEvent, synthesized
from boxoffice.wire.subjects import stripe_event

log = logging.getLogger("boxoffice.webhook.reconcile")
T = TypeVar("T")

REPLICA = f"{socket.gethostname()}:{os.getpid()}"
OVERLAP = 60                 # seconds re-listed before a point: Stripe's lists are not instant
WINDOW = 3600                # seconds of Stripe's history listed (and kept in memory) at a time
FIRST_LOOKBACK = 30 * 86400  # with no point yet: as far back as Stripe keeps events
LEASE_SECONDS = 300.0        # renewed at every checkpoint; lapses if the replica dies
CALL_TIMEOUT = 30.0
PAGE = 100
CHECK_BATCH = 200            # payments compared with Stripe per run
CHECK_CONCURRENCY = 8
REPORT_AFTER = 3             # failed runs in a row before the failure is logged as an error

RECONCILED = prometheus_client.Counter(
    "boxoffice_stripe_reconciled_total",
    "What reconciliation with Stripe fed or decided: event (a missed event recovered), "
    "payment_intent (a payment corrected), orphan_fed, orphan_cancel", ["kind"])
RUNS = prometheus_client.Counter("boxoffice_stripe_reconcile_runs_total",
                                 "Reconciliation runs, by outcome (ok, failed)", ["outcome"])
LAST_SUCCESS = prometheus_client.Gauge("boxoffice_stripe_reconcile_last_success_timestamp_seconds",
                                       "When a reconciliation run last finished without error")


class StripeUnavailable(Exception):
    """Stripe did not answer, or refused a read: the run stops, the next one tries again."""


class StripeNotFound(StripeUnavailable):
    """Stripe has no such object (404)."""


@dataclass(frozen=True)
class Settings:
    interval: float
    grace: float


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:500]


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def spans(point: datetime | None, limit: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) windows of Stripe's ``created`` from a point (less the overlap) up to ``limit``."""
    lo = int(point.timestamp()) - OVERLAP if point is not None else limit - FIRST_LOOKBACK
    while lo < limit:
        hi = min(lo + WINDOW, limit)
        yield lo, hi
        lo = hi


def _reservation(intent: dict[str, Any]) -> uuid.UUID | None:
    value = (intent.get("metadata") or {}).get("reservation_id")
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


def stripe_says(intent: dict[str, Any]) -> tuple[str, str] | None:
    """(event kind, payment status) that a PaymentIntent's state at Stripe amounts to, if any:
    one waiting for its buyer says nothing."""
    status = intent.get("status")
    if status in ("succeeded", "processing", "canceled"):
        return status, status
    if status == "requires_payment_method" and intent.get("last_payment_error"):
        return "payment_failed", "failed"
    return None


def orphan_action(status: str | None) -> OrphanAction | None:
    if status == "succeeded":
        return "fed_succeeded"
    if status == "processing":
        return "fed_processing"
    if status in CANCELLABLE:
        return "cancel_requested"
    return None  # canceled already: nothing is left to do


def _payment_intent_of(event: dict[str, Any]) -> str | None:
    obj = (event.get("data") or {}).get("object") or {}
    kind = str(event.get("type", ""))
    value = obj.get("id") if kind.startswith("payment_intent.") else obj.get("payment_intent")
    return value if isinstance(value, str) else None


class Reconciler:
    """One replica's reconciliation: ``run_once`` when due, ``loop`` until stopped."""

    def __init__(self, pool: asyncpg.Pool, bus: Bus, client: stripe.StripeClient,
                 settings: Settings, replica: str = REPLICA):
        self.pool = pool
        self.bus = bus
        self.client = client
        self.settings = settings
        self.replica = replica
        self.stopping = asyncio.Event()
        self.failures = 0  # runs failed in a row

    # -- Stripe ------------------------------------------------------------------------------
    async def _stripe(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await call
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise StripeNotFound(f"Stripe: no such object ({exc.code})") from None
            raise StripeUnavailable(
                f"Stripe refused: {exc.code} (HTTP {exc.http_status})") from None
        except stripe.StripeError as exc:  # connection, rate limit, 5xx, our credentials
            status = f" (HTTP {exc.http_status})" if exc.http_status else ""
            raise StripeUnavailable(f"Stripe: {type(exc).__name__}{status}") from None
        except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise StripeUnavailable(
                f"Stripe's answer did not arrive ({type(exc).__name__})") from None

    async def _list(self, resource: Any, lo: int, hi: int | None, lease: runs.Lease,
                    tally: runs.Tally) -> list[dict[str, Any]]:
        """Every object created in [lo, hi), in whatever order Stripe pages them."""
        out: list[dict[str, Any]] = []
        created = {"gte": lo} if hi is None else {"gte": lo, "lt": hi}
        params: dict[str, Any] = {"created": created, "limit": PAGE}
        while True:
            page = await self._stripe(resource.list_async(params=params))
            items = [obj.to_dict() for obj in page.data]
            out += items
            await self._checkpoint(lease, tally)  # long lists keep the lease alive
            if not page.has_more or not items:
                return out
            params["starting_after"] = items[-1]["id"]

    # -- feeding -----------------------------------------------------------------------------
    async def feed(self, event: dict[str, Any]) -> bool:
        """Publish an event as ingress does; False if JetStream had it already (a duplicate)."""
        body = json.dumps(event, default=str).encode()
        try:
            checked = msgspec.json.decode(body, type=StripeEvent)
        except msgspec.ValidationError as exc:  # ingress would refuse it too: nothing to apply
            log.warning("stripe event %s not fed: not a Stripe event (%s)", event.get("id"), exc)
            return False
        return await self.bus.publish(stripe_event(checked.type), body, checked.id, timeout=5.0)

    async def _checkpoint(self, lease: runs.Lease, tally: runs.Tally, **points: datetime) -> None:
        await runs.checkpoint(self.pool, lease, tally, lease_seconds=LEASE_SECONDS, **points)

    # -- the three passes ----------------------------------------------------------------------
    async def events(self, lease: runs.Lease, tally: runs.Tally, limit: int,
                     touched: set[str]) -> None:
        for lo, hi in spans(lease.events_until, limit):
            if self.stopping.is_set():
                return
            found = await self._list(self.client.v1.events, lo, hi, lease, tally)
            found.sort(key=lambda e: (e["created"], e["id"]))
            tally.events_seen += len(found)
            missing = await runs.unknown_events(self.pool, [e["id"] for e in found])
            for event in found:
                if event["id"] not in missing:
                    continue
                try:
                    fresh = await self.feed(event)
                except errors.ServiceUnavailable:
                    # everything created before this event was fed (or known): keep that much
                    await self._checkpoint(lease, tally, events_until=_at(event["created"]))
                    raise
                if pi := _payment_intent_of(event):
                    touched.add(pi)
                if fresh:
                    tally.events_recovered += 1
                    RECONCILED.labels("event").inc()
                    log.info("recovered stripe event %s (%s)", event["id"], event["type"],
                             extra={"event_id": event["id"], "event_type": event["type"]})
            await self._checkpoint(lease, tally, events_until=_at(hi))
        # PaymentIntents with events younger than the grace are being delivered right now:
        # the other passes leave them to their events
        for event in await self._list(self.client.v1.events, limit, None, lease, tally):
            if pi := _payment_intent_of(event):
                touched.add(pi)

    async def payments(self, lease: runs.Lease, tally: runs.Tally, touched: set[str]) -> None:
        rows = await runs.unsettled_payments(self.pool, self.settings.grace, CHECK_BATCH,
                                             sorted(touched))

        async def retrieve(pi: str) -> dict[str, Any] | None:
            try:
                return (await self._stripe(
                    self.client.v1.payment_intents.retrieve_async(pi))).to_dict()
            except StripeNotFound:  # not this account's (or mode's) PaymentIntent: skip it
                log.warning("payment %s: no such PaymentIntent at Stripe", pi,
                            extra={"payment_intent_id": pi})
                return None

        got: list[dict[str, Any] | None] = []
        for i in range(0, len(rows), CHECK_CONCURRENCY):  # a few at a time; stop at a failure
            got += await asyncio.gather(*(retrieve(r["payment_intent_id"])
                                          for r in rows[i:i + CHECK_CONCURRENCY]))
        now = int(time.time())
        for row, intent in zip(rows, got):
            tally.intents_checked += 1
            says = stripe_says(intent) if intent is not None else None
            if intent is None or says is None or says[1] == row["status"]:
                continue
            # created < processing = failed < canceled < succeeded: any difference here is
            # Stripe being further along (equal ranks are decided by the newer event: this one)
            await self.feed(synthesized(intent, says[0], now))
            tally.intents_corrected += 1
            RECONCILED.labels("payment_intent").inc()
            log.info("payment %s was %s, Stripe says %s: fed", row["payment_intent_id"],
                     row["status"], intent.get("status"),
                     extra={"payment_intent_id": row["payment_intent_id"]})
        await runs.mark_checked(self.pool, [r["payment_intent_id"] for r in rows])
        await self._checkpoint(lease, tally)

    async def orphans(self, lease: runs.Lease, tally: runs.Tally, limit: int,
                      touched: set[str]) -> None:
        for lo, hi in spans(lease.intents_until, limit):
            if self.stopping.is_set():
                return
            ours: dict[str, tuple[dict[str, Any], uuid.UUID]] = {}
            for intent in await self._list(self.client.v1.payment_intents, lo, hi, lease, tally):
                reservation = _reservation(intent)
                if (reservation is not None and intent["id"] not in touched
                        and orphan_action(intent.get("status")) is not None):
                    ours[intent["id"]] = (intent, reservation)
            unknown = await runs.orphans(self.pool, [(pi, r) for pi, (_, r) in ours.items()])
            now = int(time.time())
            for pi in sorted(unknown, key=lambda k: (ours[k][0].get("created", 0), k)):
                intent, reservation = ours[pi]
                action = orphan_action(intent.get("status"))
                assert action is not None
                if action != "cancel_requested":
                    await self.feed(synthesized(intent, str(intent["status"]), now))
                if await runs.record_orphan(self.pool, lease.run_id, intent, reservation, action):
                    tally.orphans_found += 1
                    RECONCILED.labels("orphan_cancel" if action == "cancel_requested"
                                      else "orphan_fed").inc()
                    log.warning("orphan PaymentIntent %s (hold %s, %s at Stripe): %s", pi,
                                reservation, intent.get("status"), action,
                                extra={"payment_intent_id": pi, "reservation_id": str(reservation)})
            await self._checkpoint(lease, tally, intents_until=_at(hi))

    # -- a run -------------------------------------------------------------------------------
    async def run_once(self) -> runs.Tally | None:
        """One run if it is due and no other replica runs; None if not. Never raises for Stripe,
        NATS or PostgreSQL: a failure is recorded on the run and logged."""
        try:
            lease = await runs.acquire(self.pool, self.replica, interval=self.settings.interval,
                                       lease_seconds=LEASE_SECONDS)
        except db.FAILURES as exc:
            self._failed(f"PostgreSQL: {describe(exc)}")
            return None
        if lease is None:
            return None
        tally = runs.Tally()
        error: str | None = None
        limit = int(time.time() - self.settings.grace)
        touched: set[str] = set()
        try:
            await self.events(lease, tally, limit, touched)
            if not self.stopping.is_set():
                await self.payments(lease, tally, touched)
                await self.orphans(lease, tally, limit, touched)
            if self.stopping.is_set():
                error = "stopped early: the service is shutting down"
        except runs.LeaseLost as exc:
            log.warning("stripe reconciliation stopped: %s", exc)
            return tally
        except StripeUnavailable as exc:
            error = str(exc)
        except errors.ServiceUnavailable as exc:
            error = f"NATS: {exc.detail}"
        except db.FAILURES as exc:
            error = f"PostgreSQL: {describe(exc)}"
        except Exception as exc:  # a bug: recorded on the run, which is closed
            log.exception("stripe reconciliation: run crashed")
            error = f"crashed: {describe(exc)}"
        try:
            await runs.finish(self.pool, lease, tally, error)
        except db.FAILURES as exc:
            # the lease lapses; the next run closes this one as interrupted
            error = error or f"PostgreSQL: {describe(exc)}"
        if error is None or error.startswith("stopped early"):
            if self.failures:
                log.info("stripe reconciliation succeeded after %d failed runs", self.failures)
            self.failures = 0
            RUNS.labels("ok").inc()
            LAST_SUCCESS.set_to_current_time()
            if tally.events_recovered or tally.intents_corrected or tally.orphans_found:
                log.info("stripe reconciliation: %s", tally, extra=vars(tally))
        else:
            self._failed(error)
        return tally

    def _failed(self, error: str) -> None:
        self.failures += 1
        RUNS.labels("failed").inc()
        level = logging.ERROR if self.failures == REPORT_AFTER else logging.WARNING
        log.log(level, "stripe reconciliation failed (%d in a row), retried in %gs: %s",
                self.failures, self.settings.interval, error)

    async def loop(self, stopping: asyncio.Event) -> None:
        """Until stopped: wait an interval, run if due. Nothing that goes wrong ends the loop."""
        await background.repeat("stripe reconciliation", self._run, stopping,
                                every=self.settings.interval, logger=log)

    async def _run(self) -> None:
        await self.run_once()


@contextlib.asynccontextmanager
async def running(reconciler: Reconciler) -> AsyncIterator[Reconciler]:
    """Reconcile in the background; on exit, let a run in hand stop at its next checkpoint."""
    async with background.running("stripe reconciliation", reconciler.loop, grace=20,
                                  stopping=reconciler.stopping):
        yield reconciler
