"""Stripe side effects, decided durably before they are made: refunds and cancels.

Whoever decides that money must go back or that a PaymentIntent must die (a Stripe event applied
in SQL, a hold that ends, a PaymentIntent recorded for a hold that ended meanwhile) writes a
``stripe_actions`` row in the transaction that decides it: what, for which PaymentIntent, why,
and the Stripe idempotency key (``refund-<pi>``, ``cancel-<pi>``). This worker then

1. leases due rows (``claim_stripe_actions``: the attempt is counted, the row is due again when
   the lease lapses, so a worker that dies mid-call is replaced by the next sweep);
2. makes the call at Stripe with the row's idempotency key (a repeat after a crash gets the same
   refund or cancel back, never a second one);
3. confirms it (``finish_stripe_action``): the payment moves to refunded or canceled, with the
   reason the action was decided for, in one transaction.

Failures are classified by where they happened, never by exception class alone:
- PostgreSQL unreachable while leasing or confirming: the sweep pauses; the lease lapses and
  the row is taken again (Stripe, asked with the same key, answers the same).
- Stripe unreachable, slow, cut mid-answer, rate limiting or 5xx: ``retry``, with back-off.
- Stripe refusing for good: a cancel of a PaymentIntent that already succeeded or is processing
  is ``moot``; anything else ``failed``, reported as an error for an operator.

A cancel found moot because the PaymentIntent succeeded (the buyer paid just as the hold ended)
applies that success at once, as the event reconciliation would feed for it
(``wire.stripe.synthesized``: the same id, so the two never apply it twice), instead of waiting for
Stripe's event, which may be late: the hold is sold again if its tickets
are still free, or its refund decided. Stripe's own event then finds the payment applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import aiohttp
import asyncpg
import prometheus_client
import stripe

from boxoffice import background, db, outbox, wire
from boxoffice.webhook import effects
from boxoffice.webhook.refunds import Refunds
from boxoffice.wire.stripe import StripeEvent, synthesized

log = logging.getLogger("boxoffice.webhook.actions")
T = TypeVar("T")

CHANNEL = "boxoffice_stripe_actions"
LEASE_SECONDS = 60.0       # longer than any one Stripe call (Refunds' timeout is 20 s)
SWEEP_SECONDS = 2.0        # due retries and lapsed leases are found by this sweep
BATCH = 16
MAX_BACKOFF = 60.0         # a refund owed is retried at least every minute
REPORT_AFTER = 5           # attempts before a still-transient failure is reported as an error
CANCELLABLE = ("requires_payment_method", "requires_capture", "requires_confirmation",
               "requires_action")

ACTIONS = prometheus_client.Counter("boxoffice_stripe_actions_total",
                                    "Attempts at Stripe side effects, by kind and outcome",
                                    ["kind", "outcome"])


class StripeTransient(Exception):
    """No final answer from Stripe: the same call, with the same key, is made again later."""


class StripeRefused(Exception):
    """Stripe answered with a final refusal."""


class ActionOutcome(StrEnum):
    """How an attempt at Stripe ended (passed to ``finish_stripe_action``)."""

    DONE = "done"
    MOOT = "moot"  # a cancel of a PaymentIntent that succeeded or is processing
    FAILED = "failed"  # Stripe refused for good: an operator looks
    RETRY = "retry"  # no final answer: the same call again later


class ActionStatus(StrEnum):
    """A ``stripe_actions`` row's status after ``finish_stripe_action``."""

    PENDING = "pending"  # due again (after a retry)
    DONE = "done"
    MOOT = "moot"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    outcome: ActionOutcome
    result_id: str | None = None
    detail: str | None = None
    succeeded: dict[str, Any] | None = None  # a cancel too late: the PaymentIntent, as Stripe has it


def backoff(attempts: int) -> float:
    return min(2.0 ** attempts, MAX_BACKOFF)


async def _stripe(call: Awaitable[T]) -> T:
    """Await a Stripe SDK call, turning every way it can fail into one of two classes."""
    try:
        return await call
    except (stripe.InvalidRequestError, stripe.CardError, stripe.IdempotencyError) as exc:
        raise StripeRefused(f"{type(exc).__name__}: {exc.user_message or exc.code}") from None
    except stripe.StripeError as exc:  # connection, rate limit, 5xx, our credentials
        raise StripeTransient(f"{type(exc).__name__} (HTTP {exc.http_status})") from None
    except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        raise StripeTransient(f"Stripe's answer did not arrive ({type(exc).__name__})") from None


async def perform(refunds: Refunds, row: asyncpg.Record) -> Result:
    """Make one action at Stripe; never raises for a Stripe failure (it is a Result)."""
    pi, key = row["payment_intent_id"], row["idempotency_key"]
    try:
        if row["kind"] == "refund":
            refund_id = await _stripe(refunds.refund(
                pi, row["amount"] or 0, row["reason"],
                str(row["reservation_id"]) if row["reservation_id"] else None))
            return Result(ActionOutcome.DONE, str(refund_id))
        try:
            await _stripe(refunds.client.v1.payment_intents.cancel_async(
                pi, options={"idempotency_key": key}))
            return Result(ActionOutcome.DONE, pi)
        except StripeRefused as refused:
            # not cancellable: find out why (already succeeded, processing, or canceled)
            intent = await _stripe(refunds.client.v1.payment_intents.retrieve_async(pi))
            status = getattr(intent, "status", None)
            if status == "canceled":
                return Result(ActionOutcome.DONE, pi, "canceled already")
            if status in CANCELLABLE:
                return Result(ActionOutcome.FAILED, None, str(refused))
            return Result(ActionOutcome.MOOT, None, f"PaymentIntent is {status}",
                          intent.to_dict() if status == "succeeded" else None)
    except StripeTransient as exc:
        return Result(ActionOutcome.RETRY, None, str(exc))
    except StripeRefused as exc:
        return Result(ActionOutcome.FAILED, None, str(exc))


async def run_once(pool: asyncpg.Pool, refunds: Refunds, limit: int = BATCH) -> int:
    """Lease, perform and confirm up to ``limit`` due actions; returns how many were tried."""
    rows = await pool.fetch("SELECT * FROM claim_stripe_actions($1, $2)", limit, LEASE_SECONDS)
    results = await asyncio.gather(*(perform(refunds, r) for r in rows))
    for row, res in zip(rows, results):
        ACTIONS.labels(row["kind"], res.outcome).inc()
        finished = await pool.fetchval("SELECT finish_stripe_action($1, $2, $3, $4, $5)",
                                       row["id"], res.outcome, res.result_id, res.detail,
                                       backoff(row["attempts"]))
        status = None if finished is None else ActionStatus(finished)  # None: not ours now
        context = {"payment_intent_id": row["payment_intent_id"], "kind": row["kind"],
                   "reason": row["reason"], "attempts": row["attempts"]}
        if res.outcome is ActionOutcome.FAILED:
            log.error("Stripe refused to %s %s: %s", row["kind"], row["payment_intent_id"],
                      res.detail, extra=context)
        elif res.outcome is ActionOutcome.RETRY:
            level = logging.ERROR if row["attempts"] == REPORT_AFTER else logging.WARNING
            log.log(level, "%s of %s not made yet (attempt %d): %s", row["kind"],
                    row["payment_intent_id"], row["attempts"], res.detail, extra=context)
        elif status is not None:
            log.info("%s of %s: %s", row["kind"], row["payment_intent_id"], res.outcome,
                     extra=context)
        if status is ActionStatus.MOOT and res.succeeded is not None:
            await apply_success(pool, res.succeeded)
    return len(rows)


async def apply_success(pool: asyncpg.Pool, intent: dict[str, Any]) -> str:
    """Apply a PaymentIntent's success as Stripe reported it to us (see the module's doc)."""
    body = json.dumps(synthesized(intent, "succeeded", int(time.time())))
    outcome = await effects.apply(pool, wire.decode(body.encode(), StripeEvent), body)
    for report in outcome.reports:
        log.log(report.level, report.message, extra=report.context)
    return outcome.name


async def run_worker(pool: asyncpg.Pool, refunds: Refunds, stopping: asyncio.Event,
                     wake: asyncio.Event, *, sweep: float = SWEEP_SECONDS) -> None:
    """Until ``stopping``: perform actions as they are decided (``wake``) and on every sweep."""
    async def step() -> int:
        n = 0
        try:
            async for attempt in background.backoff(db.FAILURES, initial=0.1, most=5.0):
                with attempt:
                    if stopping.is_set():
                        return 0
                    try:
                        n = await run_once(pool, refunds)  # (at most BATCH)
                    except db.FAILURES as exc:
                        log.warning("stripe actions paused: PostgreSQL (%s)", type(exc).__name__)
                        raise
        except Exception:  # the worker never dies; leased rows come back
            log.exception("stripe actions: sweep failed")
            await background.pause(stopping, sweep)
        return n

    await background.drain(step, stopping, wake, every=sweep, batch=BATCH)


@contextlib.asynccontextmanager
async def worker(url: str, pool: asyncpg.Pool, refunds: Refunds) -> AsyncIterator[None]:
    """Run the worker in the background; on exit, let its batch in hand finish (bounded)."""
    wake = asyncio.Event()

    async def listening(stopping: asyncio.Event) -> None:
        await outbox.listen(url, stopping, CHANNEL, lambda _payload: wake.set(),
                            lambda up: wake.set() if up else None)

    async def working(stopping: asyncio.Event) -> None:
        await run_worker(pool, refunds, stopping, wake)

    async with background.running("stripe actions", working, listening, grace=25, wake=wake):
        yield
