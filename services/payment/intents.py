"""PaymentIntents with Stripe-like idempotency keys (domain logic; plain async functions).

A request runs in atomic phases, after brandur.org/idempotency-keys, with ``payment_intents_log``
as both the audit trail and the recovery state:

1. **claim** (SQL ``claim_payment_intent``, one round trip): a finished key is read without a
   lock; otherwise lock the reservation row (so all claims on one reservation take turns), then
   find the client's key. A finished key replays its stored status and body; a key
   with another fingerprint is ``idempotency_key_mismatch``; a key whose lease is live is
   ``idempotency_key_in_use``; a key whose lease lapsed (its worker crashed or gave up) is taken
   over. A new key is validated (the reservation is the client's, active, and no other key owns
   its PaymentIntent: ``reservations.payment_idempotency_key``) and inserted with the amount of
   the reservation; a request rejected here stores nothing. The claim is committed durably
   before Stripe is called: a PaymentIntent is never created for a claim a crash could erase.
2. **Stripe call**, outside any transaction, with a Stripe idempotency key derived from the
   client's key, so a repeated call after a crash gets the original PaymentIntent back. While it
   runs the lease is renewed in the background.
3. **record** (SQL ``record_payment_intent``, one round trip): the response, the Stripe id, a
   ``payments`` row (``created``), the reservation's PaymentIntent id and a
   ``payments.events.created`` outbox row, all at once, on the row this worker claimed (same
   client key and Stripe key) or not at all: a claim found missing is ``ClaimLost``, a 503 whose
   retry claims again and gets the same PaymentIntent back from Stripe.
   Definitive Stripe errors (card declined, invalid request) are recorded the same way; transient
   ones release the lease and leave the key at ``started`` for the client's retry.
   The record's commit waits for its WAL flush too, though a record lost in a crash leaves the
   key at ``started`` as a crash before it would: here the client has already been answered and
   acts on the answer (it confirms the PaymentIntent with its client secret), so a lost record
   would leave a PaymentIntent the database never knew of, which reconciliation's orphan pass
   cancels under the buyer, and whose key, replayed after Stripe's 24 h, would answer with
   another PaymentIntent. Its outbox row is written without a NOTIFY (``boxoffice.outbox_quiet``)
   and this process's relay woken after the commit (``Deps.relay_wake``), once the reply is
   written (``_wake_after_reply``): notifying commits queue on one PostgreSQL lock held through
   their WAL flush.

Recovery points (``payment_intents_log.recovery_point``): ``started`` (Stripe may or may not have
been called: resume by calling it again with the same key) and ``finished``. Stripe's answer and
every local effect of it are committed in one transaction, so there is no point in between to
resume from. The outcomes of the two SQL functions are ``ClaimOutcome`` and ``RecordOutcome``.

The lease (``locked_at``, owned through ``lease_token``) lasts ``LEASE_SECONDS`` and is renewed
every ``RENEW_EVERY`` while Stripe is being called (by a task started only when the first renewal
falls due), so a crashed worker's key is taken over within seconds; a worker whose lease was taken
over can neither renew nor release its successor's. Correctness never depends on it: two workers
calling Stripe with one key get one PaymentIntent, and only the first to record it wins (the record
is conditional on the key not being finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg
import prometheus_client

from boxoffice import background, db, errors, idempotency, wire
from boxoffice.payment.reservations import ReservationNotActive, ReservationNotFound
from boxoffice.payment.stripe_client import CreatedIntent, Definitive, StripeGateway, Transient
from boxoffice.wire.payments import (
    CREATE_INTENT_ROUTE,
    CreateIntentRequest,
    ListPayments,
    PaymentEvent,
    PaymentIntent,
    PaymentLog,
    PaymentLogEntry,
    StoredResponse,
)

log = logging.getLogger("boxoffice.payment.intents")
T = TypeVar("T")

LEASE_SECONDS = 5.0
RENEW_EVERY = 1.5
RENEW_GRACE = 2.0  # seconds a renewal in flight may take to finish once the call is over
FAILPOINTS = ("before_stripe_call", "after_stripe_call")

PHASE_SECONDS = prometheus_client.Histogram(
    "boxoffice_payment_intent_phase_seconds", "Time spent per phase of POST /v1/payment_intents",
    ["phase"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 8))
OUTCOMES = prometheus_client.Counter(
    "boxoffice_payment_intent_requests_total", "POST /v1/payment_intents by outcome", ["outcome"])

ClaimLost = errors.define(
    "ClaimLost", "idempotency_key_claim_lost", 503,
    "The request's claim on its Idempotency-Key was lost (the database restarted): retry it")
PaymentIntentExists = errors.define(
    "PaymentIntentExists", "payment_intent_exists", 409,
    "The reservation already has a PaymentIntent under another Idempotency-Key")


class ClaimOutcome(StrEnum):
    """What ``claim_payment_intent`` decided for a key."""

    CLAIMED = "claimed"  # a new key, leased to this worker
    RESUMED = "resumed"  # a started key whose lease lapsed, taken over
    REPLAY = "replay"  # a finished key: its stored answer
    MISMATCH = "mismatch"  # the key was used with another request
    IN_USE = "in_use"  # another worker holds the key's lease
    NOT_FOUND = "not_found"  # no such reservation of this client
    NOT_ACTIVE = "not_active"  # the reservation has ended (``detail`` says how)
    EXISTS = "exists"  # another key owns the reservation's PaymentIntent


class RecordOutcome(StrEnum):
    """What ``record_payment_intent`` did with Stripe's answer."""

    RECORDED = "recorded"
    REPLAYED = "replayed"  # another worker finished the key first: its stored answer
    LOST = "lost"  # the claimed row is gone: nothing written


@dataclass(frozen=True)
class Deps:
    pool: asyncpg.Pool
    stripe: StripeGateway
    # Test-only crash points (BOXOFFICE_FAILPOINT): the process SIGKILLs itself there.
    failpoints: frozenset[str] = frozenset()
    # This process's outbox relay: set after a record commits its outbox row, which is written
    # without the NOTIFY (boxoffice.outbox_quiet), so that it is published at once all the same.
    # Without it (None) the row waits for a relay's sweep: late, never lost.
    relay_wake: asyncio.Event | None = None


@dataclass(frozen=True)
class Claim:
    log_id: int
    client_id: str
    idempotency_key: str
    lease_token: uuid.UUID
    stripe_key: str
    amount: int
    currency: str
    reservation_id: str


async def create_intent(deps: Deps, req: CreateIntentRequest) -> StoredResponse:
    """Create (or replay, or resume) the PaymentIntent of ``req``'s idempotency key."""
    with PHASE_SECONDS.labels("claim").time():
        claim = await _retrying(lambda: _claim(deps.pool, req))
    if isinstance(claim, StoredResponse):
        OUTCOMES.labels("replayed").inc()
        return claim
    return await _call_and_record(deps, claim)


async def _retrying(phase: Callable[[], Awaitable[T]]) -> T:
    """Run one transaction, again if PostgreSQL aborted it for a deadlock or serialization."""
    return await db.retrying(phase, attempts=4, pause=0.01)


async def _claim(pool: asyncpg.Pool, req: CreateIntentRequest) -> Claim | StoredResponse:
    """Phase 1, one round trip (SQL ``claim_payment_intent``): replay, refuse, or lease the key."""
    row = await pool.fetchrow(
        "SELECT * FROM claim_payment_intent($1, $2, $3, $4, $5, $6, $7)", req.client_id,
        req.idempotency_key, req.fingerprint, uuid.UUID(req.reservation_id),
        idempotency.stripe_key(req.client_id, req.idempotency_key, req.fingerprint),
        CREATE_INTENT_ROUTE, LEASE_SECONDS)
    outcome = ClaimOutcome(row["outcome"])
    if outcome not in (ClaimOutcome.REPLAY, ClaimOutcome.CLAIMED):
        OUTCOMES.labels(outcome).inc()
    match outcome:
        case ClaimOutcome.REPLAY:
            return StoredResponse(status=row["response_status"], body=row["response_body"],
                                  replayed=True)
        case ClaimOutcome.CLAIMED | ClaimOutcome.RESUMED:
            return Claim(log_id=row["log_id"], client_id=req.client_id,
                         idempotency_key=req.idempotency_key, lease_token=row["lease_token"],
                         stripe_key=row["stripe_key"], amount=row["amount"],
                         currency=row["currency"], reservation_id=req.reservation_id)
        case ClaimOutcome.MISMATCH:
            raise idempotency.IdempotencyKeyMismatch(
                "this Idempotency-Key was used with another request; use a new key for a new "
                "request")
        case ClaimOutcome.IN_USE:
            raise idempotency.IdempotencyKeyInUse(
                "the first request with this Idempotency-Key is still in progress",
                retry_after=max(1, math.ceil(row["retry_after"])))
        case ClaimOutcome.NOT_FOUND:
            raise ReservationNotFound(f"no reservation {req.reservation_id}")
        case ClaimOutcome.NOT_ACTIVE:
            raise ReservationNotActive(f"the reservation is {row['detail']}",
                                       reservation_status=row["detail"])
        case ClaimOutcome.EXISTS:
            raise PaymentIntentExists("this reservation already has a PaymentIntent (or one "
                                      "in progress): retry with its original Idempotency-Key")
    raise AssertionError(f"unhandled claim outcome {outcome!r}")


async def _call_and_record(deps: Deps, claim: Claim) -> StoredResponse:
    _failpoint(deps, "before_stripe_call")
    try:
        async with _leased(deps.pool, claim):
            with PHASE_SECONDS.labels("stripe").time():
                pi = await deps.stripe.create_payment_intent(
                    amount=claim.amount, currency=claim.currency,
                    reservation_id=claim.reservation_id, idempotency_key=claim.stripe_key)
    except Definitive as exc:
        OUTCOMES.labels(exc.error.code).inc()
        status, body = exc.error.status, json.dumps(exc.error.problem())
        return await _retrying(lambda: _record(deps.pool, claim, status, body, None))
    except Transient as exc:
        OUTCOMES.labels("stripe_unavailable").inc()
        await _release(deps.pool, claim, str(exc))
        raise errors.UpstreamUnavailable(
            f"the payment provider is unavailable ({exc}); retry with the same Idempotency-Key",
            retry_after=2) from None
    except BaseException as exc:
        await _release(deps.pool, claim, f"{type(exc).__name__}")
        raise
    _failpoint(deps, "after_stripe_call")
    body = wire.encode(PaymentIntent(id=pi.id, client_secret=pi.client_secret, amount=pi.amount,
                                     currency=pi.currency, status=pi.status,
                                     reservation_id=claim.reservation_id)).decode()
    with PHASE_SECONDS.labels("record").time():
        stored = await _retrying(lambda: _record(deps.pool, claim, 201, body, pi))
    if deps.relay_wake is not None and not stored.replayed:
        # the record's outbox row was written without a NOTIFY: publish it now all the same,
        # once the reply is on its way (_wake_after_reply)
        _wake_after_reply(deps.relay_wake)
    OUTCOMES.labels("created").inc()
    return stored


def _wake_after_reply(wake: asyncio.Event) -> None:
    """Set ``wake`` two turns of the event loop from now, not at once.

    The caller's reply is queued on the bus in this turn (the handler returns, the bus encodes
    and publishes without waiting) and written to the socket by the NATS client's flusher in the
    next. Woken at once, the relay would run first: its pass starts a transaction (a round trip
    sent to PostgreSQL, with its syscall) before the buyer's answer leaves the process. Deferred,
    the answer goes first and the outbox row is published a fraction of a millisecond later."""
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, wake.set)


async def _record(pool: asyncpg.Pool, claim: Claim, status: int, body: str,
                  pi: CreatedIntent | None) -> StoredResponse:
    """Phase 3, one round trip (SQL ``record_payment_intent``): once per key."""
    event = None
    if pi is not None:
        event = wire.encode(PaymentEvent(
            payment_intent_id=pi.id, reservation_id=claim.reservation_id, amount=claim.amount,
            currency=claim.currency, occurred_at=wire.now())).decode()
    row = await pool.fetchrow(
        "SELECT * FROM record_payment_intent($1, $2, $3, $4, $5, $6, $7, ($8::text)::jsonb)",
        claim.log_id, claim.client_id, claim.idempotency_key, claim.stripe_key, status, body,
        pi.id if pi else None, event)
    outcome = RecordOutcome(row["outcome"])
    if outcome is RecordOutcome.LOST:
        OUTCOMES.labels("claim_lost").inc()
        log.warning("the claim of key row %s was lost before its record (database restarted?)",
                    claim.log_id)
        raise ClaimLost("retry with the same Idempotency-Key", retry_after=1)
    return StoredResponse(status=row["response_status"], body=row["response_body"],
                          replayed=outcome is RecordOutcome.REPLAYED)


async def _release(pool: asyncpg.Pool, claim: Claim, error: str) -> None:
    """Give the key back at once (its retry need not wait for the lease to lapse).

    Only while the lease is still ours: a worker whose lease lapsed and was taken over must not
    clear its successor's."""
    try:
        await pool.execute("UPDATE payment_intents_log SET locked_at = NULL, lease_token = NULL, "
                           "last_error = $3, updated_at = clock_timestamp() "
                           "WHERE id = $1 AND lease_token = $2 AND recovery_point <> 'finished'",
                           claim.log_id, claim.lease_token, error[:500])
    except db.FAILURES as exc:
        log.warning("could not release key %s (%s); its lease will lapse", claim.log_id,
                    type(exc).__name__)


@contextlib.asynccontextmanager
async def _leased(pool: asyncpg.Pool, claim: Claim) -> AsyncIterator[None]:
    """Renew the key's lease every ``RENEW_EVERY`` while the block runs.

    Only slow Stripe calls ever renew, so a request pays for a timer, not for a task: the
    renewing task starts when the first renewal falls due. On exit it is stopped, and an UPDATE
    in flight is let finish (``RENEW_GRACE``) rather than cancelled mid-query."""
    stopping = asyncio.Event()
    renewing: asyncio.Task[None] | None = None

    async def renew() -> None:
        while not stopping.is_set():
            try:
                await pool.execute("UPDATE payment_intents_log SET locked_at = clock_timestamp() "
                                   "WHERE id = $1 AND lease_token = $2 "
                                   "AND recovery_point <> 'finished'",
                                   claim.log_id, claim.lease_token)
            except db.FAILURES as exc:
                log.warning("lease renewal of key %s failed (%s)", claim.log_id,
                            type(exc).__name__)
            await background.pause(stopping, RENEW_EVERY)

    def start() -> None:
        nonlocal renewing
        renewing = asyncio.create_task(renew(), name=f"lease renewal {claim.log_id}")

    timer = asyncio.get_running_loop().call_later(RENEW_EVERY, start)
    try:
        yield
    finally:
        timer.cancel()
        if renewing is not None:
            stopping.set()
            done, _ = await asyncio.wait({renewing}, timeout=RENEW_GRACE)
            if not done:
                renewing.cancel()
            elif not renewing.cancelled() and renewing.exception() is not None:
                log.error("lease renewal of key %s crashed", claim.log_id,
                          exc_info=renewing.exception())


def _failpoint(deps: Deps, name: str) -> None:
    if name in deps.failpoints:
        log.warning("failpoint %s reached: killing this process (test only)", name)
        os.kill(os.getpid(), signal.SIGKILL)


async def list_payments(pool: asyncpg.Pool, req: ListPayments) -> PaymentLog:
    """The audit trail: every key, newest first, optionally of one reservation or key."""
    rid = uuid.UUID(req.reservation_id) if req.reservation_id else None
    rows = await pool.fetch(
        """
        SELECT l.id, l.client_id, l.idempotency_key, l.reservation_id, l.recovery_point,
               l.locked_at, l.stripe_idempotency_key, l.stripe_payment_intent_id, l.amount,
               l.currency, l.response_status, l.attempts, l.last_error, l.created_at,
               l.updated_at, p.status AS payment_status
        FROM payment_intents_log l
        LEFT JOIN payments p ON p.payment_intent_id = l.stripe_payment_intent_id
        WHERE ($1::uuid IS NULL OR l.reservation_id = $1)
          AND ($2::text IS NULL OR l.idempotency_key = $2)
        ORDER BY l.id DESC LIMIT $3
        """, rid, req.idempotency_key, req.limit)
    entries = []
    for r in rows:
        fields: dict[str, Any] = dict(r)
        if fields["reservation_id"] is not None:
            fields["reservation_id"] = str(fields["reservation_id"])
        entries.append(PaymentLogEntry(**fields))
    return PaymentLog(items=entries)
