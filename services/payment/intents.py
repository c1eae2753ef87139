"""PaymentIntents with Stripe-like idempotency keys (domain logic; plain async functions).

A request runs in atomic phases, after brandur.org/idempotency-keys, with ``payment_intents_log``
as both the audit trail and the recovery state:

1. **claim** (one transaction): lock the reservation row (so all claims on one reservation take
   turns), then find the client's key. A finished key replays its stored status and body; a key
   with another fingerprint is ``idempotency_key_mismatch``; a key whose lease is live is
   ``idempotency_key_in_use``; a key whose lease lapsed (its worker crashed or gave up) is taken
   over. A new key is validated (the reservation is the client's, active, and has no other live
   PaymentIntent) and inserted with the amount of the reservation; a request rejected here
   stores nothing.
2. **Stripe call**, outside any transaction, with a Stripe idempotency key derived from the
   client's key, so a repeated call after a crash gets the original PaymentIntent back. While it
   runs the lease is renewed in the background.
3. **record** (one transaction): the response, the Stripe id, a ``payments`` row (``created``),
   the reservation's PaymentIntent id and a ``payments.events.created`` outbox row, all at once.
   Definitive Stripe errors (card declined, invalid request) are recorded the same way; transient
   ones release the lease and leave the key at ``started`` for the client's retry.

Recovery points used: ``started`` (Stripe may or may not have been called: resume by calling it
again with the same key) and ``finished``. Stripe's answer and every local effect of it are
committed in one transaction, so there is no state in between to resume from and
``stripe_called`` is never written.

The lease (``locked_at``) lasts ``LEASE_SECONDS`` and is renewed every ``RENEW_EVERY`` while
Stripe is being called, so a crashed worker's key is taken over within seconds. Correctness never
depends on it: two workers calling Stripe with one key get one PaymentIntent, and only the first
to record it wins (the record is conditional on the key not being finished).
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
from typing import TypeVar

import asyncpg

from boxoffice import db, errors, idempotency, wire
from boxoffice.payment.reservations import RETRYABLE, ReservationNotActive, ReservationNotFound
from boxoffice.payment.stripe_client import CreatedIntent, Definitive, StripeGateway, Transient
from boxoffice.wire.payments import (CreateIntentRequest, ListPayments, PaymentEvent,
                                     PaymentIntent, PaymentLog, PaymentLogEntry, StoredResponse)
from boxoffice.wire.subjects import payment_event

log = logging.getLogger("boxoffice.payment.intents")
T = TypeVar("T")

ROUTE = "POST /v1/payment_intents"
LEASE_SECONDS = 5.0
RENEW_EVERY = 1.5
FAILPOINTS = ("before_stripe_call", "after_stripe_call")

PaymentIntentExists = errors.define(
    "PaymentIntentExists", "payment_intent_exists", 409,
    "The reservation already has a PaymentIntent under another Idempotency-Key")


@dataclass(frozen=True)
class Deps:
    pool: asyncpg.Pool
    stripe: StripeGateway
    # Test-only crash points (BOXOFFICE_FAILPOINT): the process SIGKILLs itself there.
    failpoints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Claim:
    log_id: int
    stripe_key: str
    amount: int
    currency: str
    reservation_id: str


async def create_intent(deps: Deps, req: CreateIntentRequest) -> StoredResponse:
    """Create (or replay, or resume) the PaymentIntent of ``req``'s idempotency key."""
    stored = await _finished(deps.pool, req)
    if stored is not None:
        return stored
    claim = await _retrying(lambda: _claim(deps.pool, req))
    if isinstance(claim, StoredResponse):
        return claim
    return await _call_and_record(deps, claim)


async def _retrying(phase: Callable[[], Awaitable[T]]) -> T:
    """Run one transaction, again if PostgreSQL aborted it for a deadlock or serialization."""
    for attempt in range(4):
        try:
            return await phase()
        except RETRYABLE:
            if attempt == 3:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


async def _finished(pool: asyncpg.Pool, req: CreateIntentRequest) -> StoredResponse | None:
    """Fast path for retries: a finished key is immutable, so one indexed read replays it."""
    row = await pool.fetchrow(
        "SELECT request_fingerprint, recovery_point, response_status, response_body "
        "FROM payment_intents_log WHERE client_id = $1 AND idempotency_key = $2",
        req.client_id, req.idempotency_key)
    if row is None:
        return None
    if row["request_fingerprint"] != req.fingerprint:
        raise _mismatch()
    if row["recovery_point"] == "finished":
        return StoredResponse(status=row["response_status"], body=row["response_body"],
                              replayed=True)
    return None


def _mismatch() -> errors.BoxofficeError:
    return idempotency.IdempotencyKeyMismatch(
        "this Idempotency-Key was used with another request; use a new key for a new request")


async def _claim(pool: asyncpg.Pool, req: CreateIntentRequest) -> Claim | StoredResponse:
    rid = uuid.UUID(req.reservation_id)
    async with pool.acquire() as conn, conn.transaction():
        res = await conn.fetchrow(
            "SELECT client_id, status, expires_at <= clock_timestamp() AS overdue, amount, "
            "currency FROM reservations WHERE id = $1 FOR NO KEY UPDATE", rid)
        if res is None or res["client_id"] != req.client_id:
            raise ReservationNotFound(f"no reservation {req.reservation_id}")
        key = await conn.fetchrow(
            "SELECT id, request_fingerprint, recovery_point, response_status, response_body, "
            "       stripe_idempotency_key, amount, currency, "
            "       extract(epoch FROM locked_at - clock_timestamp())::float8 + $3 AS lease_left "
            "FROM payment_intents_log WHERE client_id = $1 AND idempotency_key = $2 FOR UPDATE",
            req.client_id, req.idempotency_key, LEASE_SECONDS)
        if key is not None:
            return await _resume(conn, req, key)
        if res["status"] != "active" or res["overdue"]:
            status = "expired" if res["status"] == "active" else res["status"]
            raise ReservationNotActive(f"the reservation is {status}", reservation_status=status)
        other = await conn.fetchval(
            "SELECT idempotency_key FROM payment_intents_log WHERE reservation_id = $1 "
            "AND (recovery_point <> 'finished' OR response_status BETWEEN 200 AND 299) LIMIT 1",
            rid)
        if other is not None:
            raise PaymentIntentExists("this reservation already has a PaymentIntent (or one in "
                                      "progress): retry with its original Idempotency-Key")
        stripe_key = idempotency.stripe_key(req.client_id, req.idempotency_key)
        log_id = await conn.fetchval(
            """
            INSERT INTO payment_intents_log (client_id, idempotency_key, request_path,
                request_fingerprint, reservation_id, stripe_idempotency_key, amount, currency,
                locked_at, attempts)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp(), 1)
            ON CONFLICT (client_id, idempotency_key) DO NOTHING RETURNING id
            """, req.client_id, req.idempotency_key, ROUTE, req.fingerprint, rid, stripe_key,
            res["amount"], res["currency"])
        if log_id is None:  # the same key, sent for another reservation at the same moment
            raise idempotency.IdempotencyKeyInUse(retry_after=1)
        return Claim(log_id=log_id, stripe_key=stripe_key, amount=res["amount"],
                     currency=res["currency"], reservation_id=req.reservation_id)


async def _resume(conn: asyncpg.Connection, req: CreateIntentRequest, key: asyncpg.Record
                  ) -> Claim | StoredResponse:
    if key["request_fingerprint"] != req.fingerprint:
        raise _mismatch()
    if key["recovery_point"] == "finished":
        return StoredResponse(status=key["response_status"], body=key["response_body"],
                              replayed=True)
    left = key["lease_left"]
    if left is not None and left > 0:
        raise idempotency.IdempotencyKeyInUse(
            "the first request with this Idempotency-Key is still in progress",
            retry_after=max(1, math.ceil(left)))
    # The previous attempt crashed or failed transiently: resume it. The amount is the one
    # recorded at the first attempt, so Stripe sees the very same request under the same key.
    await conn.execute("UPDATE payment_intents_log SET locked_at = clock_timestamp(), "
                       "attempts = attempts + 1, updated_at = clock_timestamp() WHERE id = $1",
                       key["id"])
    return Claim(log_id=key["id"], stripe_key=key["stripe_idempotency_key"],
                 amount=key["amount"], currency=key["currency"],
                 reservation_id=req.reservation_id)


async def _call_and_record(deps: Deps, claim: Claim) -> StoredResponse:
    _failpoint(deps, "before_stripe_call")
    try:
        async with _leased(deps.pool, claim.log_id):
            pi = await deps.stripe.create_payment_intent(
                amount=claim.amount, currency=claim.currency,
                reservation_id=claim.reservation_id, idempotency_key=claim.stripe_key)
    except Definitive as exc:
        body = json.dumps(exc.error.problem())
        return await _retrying(lambda: _record(deps.pool, claim, exc.error.status, body, None))
    except Transient as exc:
        await _release(deps.pool, claim.log_id, str(exc))
        raise errors.UpstreamUnavailable(
            f"the payment provider is unavailable ({exc}); retry with the same Idempotency-Key",
            retry_after=2) from None
    except BaseException as exc:
        await _release(deps.pool, claim.log_id, f"{type(exc).__name__}")
        raise
    _failpoint(deps, "after_stripe_call")
    body = wire.encode(PaymentIntent(id=pi.id, client_secret=pi.client_secret, amount=pi.amount,
                                     currency=pi.currency, status=pi.status,
                                     reservation_id=claim.reservation_id)).decode()
    return await _retrying(lambda: _record(deps.pool, claim, 201, body, pi))


async def _record(pool: asyncpg.Pool, claim: Claim, status: int, body: str,
                  pi: CreatedIntent | None) -> StoredResponse:
    """Phase 3: the answer and all its local effects in one transaction, once per key."""
    rid = uuid.UUID(claim.reservation_id)
    async with pool.acquire() as conn, conn.transaction():
        # lock order everywhere: the reservation, then its keys (as in the claim)
        await conn.execute("SELECT 1 FROM reservations WHERE id = $1 FOR NO KEY UPDATE", rid)
        done = await conn.fetchval(
            """
            UPDATE payment_intents_log
            SET recovery_point = 'finished', locked_at = NULL, response_status = $2,
                response_body = $3, stripe_payment_intent_id = $4, last_error = NULL,
                updated_at = clock_timestamp()
            WHERE id = $1 AND recovery_point <> 'finished' RETURNING id
            """, claim.log_id, status, body, pi.id if pi else None)
        if done is None:  # another worker took over the key and finished it first
            row = await conn.fetchrow("SELECT response_status, response_body "
                                      "FROM payment_intents_log WHERE id = $1", claim.log_id)
            return StoredResponse(status=row["response_status"], body=row["response_body"],
                                  replayed=True)
        if pi is not None:
            await conn.execute(
                "INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, status) "
                "VALUES ($1, $2, $3, $4, 'created') ON CONFLICT (payment_intent_id) DO NOTHING",
                pi.id, rid, claim.amount, claim.currency)
            await conn.execute(
                "UPDATE reservations SET payment_intent_id = $2, updated_at = clock_timestamp() "
                "WHERE id = $1 AND status <> 'completed'", rid, pi.id)
            event = PaymentEvent(payment_intent_id=pi.id, reservation_id=claim.reservation_id,
                                 amount=claim.amount, currency=claim.currency,
                                 occurred_at=wire.now())
            await conn.execute("INSERT INTO outbox (subject, payload) VALUES ($1, ($2::text)::jsonb)",
                               payment_event("created"), wire.encode(event).decode())
    return StoredResponse(status=status, body=body)


async def _release(pool: asyncpg.Pool, log_id: int, error: str) -> None:
    """Give the key back at once (its retry need not wait for the lease to lapse)."""
    try:
        await pool.execute("UPDATE payment_intents_log SET locked_at = NULL, last_error = $2, "
                           "updated_at = clock_timestamp() "
                           "WHERE id = $1 AND recovery_point <> 'finished'", log_id, error[:500])
    except (asyncpg.PostgresError, *db.UNAVAILABLE) as exc:
        log.warning("could not release key %s (%s); its lease will lapse", log_id,
                    type(exc).__name__)


@contextlib.asynccontextmanager
async def _leased(pool: asyncpg.Pool, log_id: int) -> AsyncIterator[None]:
    """Renew the key's lease while the block runs (only slow Stripe calls ever renew)."""

    async def renew() -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await pool.execute("UPDATE payment_intents_log SET locked_at = clock_timestamp() "
                                   "WHERE id = $1 AND recovery_point <> 'finished'", log_id)
            except (asyncpg.PostgresError, *db.UNAVAILABLE) as exc:
                log.warning("lease renewal of key %s failed (%s)", log_id, type(exc).__name__)

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
    return PaymentLog(items=[PaymentLogEntry(
        **{k: (str(v) if k == "reservation_id" and v is not None else v)
           for k, v in dict(r).items()}) for r in rows])
