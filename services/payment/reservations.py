"""Holds (reservations): take, read and release tickets (domain logic; plain async functions).

The ticket accounting itself is in SQL (``hold_tickets``, ``release_reservation``): each hold
takes its tickets from one inventory bucket row under a row lock, and a CHECK constraint on
every bucket (``held + sold <= capacity``) makes overselling impossible even for a buggy caller.

Holds normally arrive through ``hold_batch`` (concurrent holds of one event share a
transaction); ``hold`` here is the full path, for a hold the batch's fast path could not serve.

A hold sent with an ``Idempotency-Key`` is taken at most once per client and key: the key is
locked for the transaction (``try_lock_hold_key``, the lock the batch takes too; a concurrent
duplicate gets ``idempotency_key_in_use``), the reservation row keeps the request's fingerprint
and the exact body answered, and a retry replays that body. A sold-out or unknown-event answer
creates nothing and is not stored, so the client may retry the same key later.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import asyncpg

from boxoffice import db, errors, idempotency, wire
from boxoffice.payment.ticketed_events import TicketedEventNotFound
from boxoffice.wire.payments import StoredResponse
from boxoffice.wire.reservations import HoldRequest, Reservation, Status

SoldOut = errors.define("SoldOut", "sold_out", 409, "Not enough tickets left")
ReservationNotFound = errors.define("ReservationNotFound", "reservation_not_found", 404,
                                    "Reservation not found")
ReservationNotActive = errors.define("ReservationNotActive", "reservation_not_active", 409,
                                     "Reservation is not active")

# transient conflicts between concurrent releases of multi-bucket holds: retried here
ATTEMPTS = 5

# The client's view: an active hold past its expires_at is shown (and treated) as expired.
VIEW_COLUMNS = """
    id, event_id, quantity, amount, currency, customer_ref, created_at, expires_at,
    payment_intent_id, client_id,
    CASE WHEN status = 'active' AND expires_at <= clock_timestamp() THEN 'expired'
         ELSE status END AS status
"""


def parse_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ReservationNotFound(f"no reservation {value[:64]!r}") from None


def view(row: asyncpg.Record | dict[str, Any], status: str | None = None) -> Reservation:
    return Reservation(id=str(row["id"]), event_id=str(row["event_id"]), quantity=row["quantity"],
                       status=cast(Status, status or row["status"]),
                       expires_at=row["expires_at"],
                       amount=row["amount"], currency=row["currency"],
                       customer_ref=row["customer_ref"], created_at=row["created_at"],
                       payment_intent_id=row["payment_intent_id"])


async def _take(conn: asyncpg.Connection, req: HoldRequest, ttl_seconds: int) -> asyncpg.Record:
    try:
        return await conn.fetchrow(
            "SELECT * FROM hold_tickets($1, $2, $3, $4, $5, $6)", uuid.UUID(req.event_id),
            req.quantity, req.client_id, ttl_seconds, req.customer_ref, req.idempotency_key)
    except asyncpg.PostgresError as exc:
        # hold_tickets' own SQLSTATEs (user-defined codes have no asyncpg class of their own)
        if exc.sqlstate == "BX409":
            raise SoldOut(f"fewer than {req.quantity} tickets are available") from None
        if exc.sqlstate == "BX404":
            raise TicketedEventNotFound(f"no event {req.event_id}") from None
        raise


async def hold(pool: asyncpg.Pool, req: HoldRequest, ttl_seconds: int,
               wake: asyncio.Event | None = None) -> StoredResponse:
    """Hold ``req.quantity`` tickets for ``ttl_seconds``; the 201 answer, stored when keyed.

    ``hold_tickets`` writes the 'held' outbox row without a NOTIFY: ``wake`` (this process's
    relay) is set once the hold is committed."""
    async def attempt() -> StoredResponse:
        try:
            async with pool.acquire() as conn:
                if req.idempotency_key is None:
                    # one statement is one transaction: a single round trip on the hot path
                    row = await _take(conn, req, ttl_seconds)
                    return StoredResponse(status=201,
                                          body=wire.encode(view(row, "active")).decode())
                async with conn.transaction():
                    return await _hold_keyed(conn, req, ttl_seconds)
        except asyncpg.UniqueViolationError:
            # only reachable if two requests with one key raced past the advisory lock
            raise idempotency.IdempotencyKeyInUse(retry_after=1) from None

    answer = await db.retrying(attempt, attempts=ATTEMPTS)
    if wake is not None and not answer.replayed:
        wake.set()
    return answer


async def _hold_keyed(conn: asyncpg.Connection, req: HoldRequest, ttl_seconds: int
                      ) -> StoredResponse:
    assert req.idempotency_key is not None and req.fingerprint is not None
    if not await conn.fetchval("SELECT try_lock_hold_key($1, $2)", req.client_id,
                               req.idempotency_key):
        raise idempotency.IdempotencyKeyInUse("a hold with this Idempotency-Key is in progress",
                                              retry_after=1)
    prior = await conn.fetchrow(
        "SELECT request_fingerprint, response_body FROM reservations "
        "WHERE client_id = $1 AND idempotency_key = $2", req.client_id, req.idempotency_key)
    if prior is not None:
        if prior["request_fingerprint"] != req.fingerprint:
            raise idempotency.IdempotencyKeyMismatch(
                "this Idempotency-Key was used for another hold; use a new key")
        return StoredResponse(status=201, body=prior["response_body"], replayed=True)
    row = await _take(conn, req, ttl_seconds)
    body = wire.encode(view(row, "active")).decode()
    await conn.execute("UPDATE reservations SET request_fingerprint = $2, response_body = $3 "
                       "WHERE id = $1", row["id"], req.fingerprint, body)
    return StoredResponse(status=201, body=body)


async def get(pool: asyncpg.Pool, client_id: str, reservation_id: str) -> Reservation:
    rid = parse_id(reservation_id)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {VIEW_COLUMNS} FROM reservations WHERE id = $1", rid)
    if row is None or row["client_id"] != client_id:  # another client's hold does not exist
        raise ReservationNotFound(f"no reservation {reservation_id}")
    return view(row)


async def cancel(pool: asyncpg.Pool, client_id: str, reservation_id: str,
                 wake: asyncio.Event | None = None) -> Reservation:
    """Release an active hold's tickets, once; cancelling a cancelled hold changes nothing.

    With ``wake`` (this process's relay, which publishes 'cancelled'), the transaction skips the
    outbox NOTIFY (``boxoffice.outbox_quiet``) and sets ``wake`` after the commit instead."""
    rid = parse_id(reservation_id)

    async def attempt() -> Reservation:
        async with pool.acquire() as conn, conn.transaction():
            if wake is not None:
                await conn.execute("SELECT set_config('boxoffice.outbox_quiet', 'on', true)")
            return await _cancel(conn, client_id, rid, reservation_id)

    cancelled = await db.retrying(attempt, attempts=ATTEMPTS)
    if wake is not None:
        wake.set()
    return cancelled


async def _cancel(conn: asyncpg.Connection, client_id: str, rid: uuid.UUID, reservation_id: str
                  ) -> Reservation:
    row = await conn.fetchrow(f"SELECT {VIEW_COLUMNS} FROM reservations WHERE id = $1 FOR UPDATE",
                              rid)
    if row is None or row["client_id"] != client_id:
        raise ReservationNotFound(f"no reservation {reservation_id}")
    if row["status"] == "cancelled":
        return view(row)
    if row["status"] != "active":
        raise ReservationNotActive(f"the reservation is {row['status']}",
                                   reservation_status=row["status"])
    await conn.fetchval("SELECT release_reservation($1, 'cancelled')", rid)
    row = await conn.fetchrow(f"SELECT {VIEW_COLUMNS} FROM reservations WHERE id = $1", rid)
    return view(row)
