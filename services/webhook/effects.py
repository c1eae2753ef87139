"""What each Stripe event does to payments and reservations.

A payment is a state machine that only moves forward (``advance_payment`` in SQL: a status rank,
and the event's ``created`` between states of one rank), and an event's effects run only when it
moved the payment. So however often and in whatever order Stripe delivers, each change happens
once: a ``payment_failed`` older than a ``succeeded`` changes nothing, a ``succeeded`` after the
refund changes nothing, a refund gives tickets back once.

Every function here runs inside the event's transaction (the caller's ``conn``); domain events
go to the outbox in that transaction. Error reports are returned, not logged, so they are sent
only once the transaction has committed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from boxoffice import wire
from boxoffice.webhook.eventlog import created_at
from boxoffice.webhook.refunds import Refunds
from boxoffice.wire.payments import PaymentEvent
from boxoffice.wire.stripe import (ChargeObject, DisputeObject, PaymentIntentObject, StripeEvent,
                                   read_object)
from boxoffice.wire.subjects import payment_event


@dataclass
class Report:
    level: int
    message: str
    context: dict[str, Any]


@dataclass
class Outcome:
    """What applying an event did (a short word, also a metric label) and what to report."""

    name: str
    reports: list[Report] = field(default_factory=list)


Effect = Callable[[asyncpg.Connection, StripeEvent, Refunds], Awaitable[Outcome]]
STALE = Outcome("stale")  # the payment is already at or past this state: nothing to do


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


async def _advance(conn: asyncpg.Connection, event: StripeEvent, payment_intent_id: str,
                   status: str, *, reservation_id: Any = None, amount: int | None = None,
                   currency: str | None = None) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM advance_payment($1, $2, $3, $4, $5, $6)",
                               payment_intent_id, _uuid(reservation_id), amount, currency, status,
                               created_at(event))


async def _emit(conn: asyncpg.Connection, kind: str, event: StripeEvent, payment_intent_id: str,
                payment: asyncpg.Record, reason: str | None = None) -> None:
    body = PaymentEvent(payment_intent_id=payment_intent_id,
                        reservation_id=str(payment["reservation_id"]) if payment["reservation_id"] else None,
                        amount=payment["amount"], currency=payment["currency"],
                        occurred_at=created_at(event), reason=reason)
    await conn.execute("INSERT INTO outbox (subject, payload) VALUES ($1, $2::text::jsonb)",
                       payment_event(kind), wire.encode(body).decode())


async def _refund(conn: asyncpg.Connection, refunds: Refunds, event: StripeEvent,
                  pi: PaymentIntentObject, payment: asyncpg.Record, reason: str) -> str:
    reservation = str(payment["reservation_id"])
    refund_id = await refunds.refund(pi.id, payment["amount"], reason, reservation)
    await conn.execute(
        "UPDATE payments SET status = 'refunded', refund_id = $2, refund_reason = $3, "
        "status_event_created = greatest(status_event_created, $4), updated_at = clock_timestamp() "
        "WHERE payment_intent_id = $1", pi.id, refund_id, reason, created_at(event))
    await _emit(conn, "refunded", event, pi.id, payment, reason)
    return refund_id


async def payment_succeeded(conn: asyncpg.Connection, event: StripeEvent,
                            refunds: Refunds) -> Outcome:
    pi = read_object(event, PaymentIntentObject)
    payment = await _advance(conn, event, pi.id, "succeeded", amount=pi.amount,
                             currency=pi.currency, reservation_id=pi.metadata.get("reservation_id"))
    if not payment["moved"]:
        return STALE
    await _emit(conn, "succeeded", event, pi.id, payment)
    ctx = {"payment_intent_id": pi.id, "event_id": event.id, "amount": payment["amount"],
           "currency": payment["currency"]}
    reservation = payment["reservation_id"]
    if reservation is None:
        return Outcome("recorded", [Report(logging.ERROR,
                                           "payment succeeded for no known reservation", ctx)])
    ctx["reservation_id"] = str(reservation)
    result = await conn.fetchval("SELECT complete_reservation($1, $2)", reservation, pi.id)
    if result == "completed":
        return Outcome("completed")
    if result == "already_completed":
        paid_by = await conn.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1",
                                      reservation)
        if paid_by in (None, pi.id):
            return Outcome("already_completed")
        # the buyer paid twice for one hold (two PaymentIntents): give the second payment back
        ctx["refund_id"] = await _refund(conn, refunds, event, pi, payment, "duplicate_payment")
        return Outcome("refunded_duplicate", [Report(
            logging.ERROR, "second payment for an already completed reservation: refunded", ctx)])
    # 'unavailable': the hold ended and its tickets are gone. The buyer paid: give it back.
    ctx["refund_id"] = await _refund(conn, refunds, event, pi, payment, "oversold")
    return Outcome("refunded_oversold", [Report(
        logging.ERROR, "payment arrived after the hold ended and the tickets were sold: refunded",
        ctx)])


async def payment_failed(conn: asyncpg.Connection, event: StripeEvent, _: Refunds) -> Outcome:
    pi = read_object(event, PaymentIntentObject)
    payment = await _advance(conn, event, pi.id, "failed", amount=pi.amount, currency=pi.currency,
                             reservation_id=pi.metadata.get("reservation_id"))
    if not payment["moved"]:
        return STALE
    error = event.data.object.get("last_payment_error") or {}
    reason = (error.get("decline_code") or error.get("code")) if isinstance(error, dict) else None
    await _emit(conn, "failed", event, pi.id, payment, reason)
    return Outcome("recorded")  # the hold stays until it expires: the buyer may try again


async def payment_processing(conn: asyncpg.Connection, event: StripeEvent, _: Refunds) -> Outcome:
    pi = read_object(event, PaymentIntentObject)
    payment = await _advance(conn, event, pi.id, "processing", amount=pi.amount,
                             currency=pi.currency, reservation_id=pi.metadata.get("reservation_id"))
    return Outcome("recorded") if payment["moved"] else STALE


async def payment_canceled(conn: asyncpg.Connection, event: StripeEvent, _: Refunds) -> Outcome:
    pi = read_object(event, PaymentIntentObject)
    payment = await _advance(conn, event, pi.id, "canceled", amount=pi.amount,
                             currency=pi.currency, reservation_id=pi.metadata.get("reservation_id"))
    if not payment["moved"]:
        return STALE
    await _emit(conn, "failed", event, pi.id, payment, "canceled")
    if payment["reservation_id"] is not None and await conn.fetchval(
            "SELECT release_reservation($1, 'cancelled')", payment["reservation_id"]):
        return Outcome("released")
    return Outcome("recorded")


async def charge_refunded(conn: asyncpg.Connection, event: StripeEvent, _: Refunds) -> Outcome:
    charge = read_object(event, ChargeObject)
    ctx = {"charge_id": charge.id, "event_id": event.id, "payment_intent_id": charge.payment_intent}
    if not charge.payment_intent:
        return Outcome("recorded", [Report(logging.WARNING,
                                           "refunded charge has no payment intent", ctx)])
    if not charge.refunded:  # a partial refund: the sale stands
        return Outcome("partial_refund")
    payment = await _advance(conn, event, charge.payment_intent, "refunded", amount=charge.amount,
                             currency=charge.currency,
                             reservation_id=charge.metadata.get("reservation_id"))
    if not payment["moved"]:
        return STALE
    refunds = (event.data.object.get("refunds") or {}).get("data") or []
    refund_id = refunds[0].get("id") if refunds and isinstance(refunds[0], dict) else None
    await conn.execute(
        "UPDATE payments SET refund_id = coalesce(refund_id, $2), "
        "refund_reason = coalesce(refund_reason, 'refunded_in_stripe') WHERE payment_intent_id = $1",
        charge.payment_intent, refund_id)
    await _emit(conn, "refunded", event, charge.payment_intent, payment, "refunded_in_stripe")
    if payment["reservation_id"] is None:
        return Outcome("recorded")
    returned = await conn.fetchval("SELECT return_reservation_tickets($1, $2)",
                                   payment["reservation_id"], charge.payment_intent)
    return Outcome("tickets_returned" if returned in ("returned", "released") else "recorded")


async def dispute_created(conn: asyncpg.Connection, event: StripeEvent, _: Refunds) -> Outcome:
    dispute = read_object(event, DisputeObject)
    ctx = {"dispute_id": dispute.id, "charge_id": dispute.charge, "event_id": event.id,
           "payment_intent_id": dispute.payment_intent, "amount": dispute.amount,
           "currency": dispute.currency, "reason": dispute.reason}
    if dispute.payment_intent:
        await _advance(conn, event, dispute.payment_intent, "disputed", amount=dispute.amount,
                       currency=dispute.currency)
    return Outcome("disputed", [Report(logging.CRITICAL, "a charge was disputed", ctx)])


EFFECTS: dict[str, Effect] = {
    "payment_intent.succeeded": payment_succeeded,
    "payment_intent.payment_failed": payment_failed,
    "payment_intent.processing": payment_processing,
    "payment_intent.canceled": payment_canceled,
    "charge.refunded": charge_refunded,
    "charge.dispute.created": dispute_created,
}


def handles(event_type: str) -> bool:
    return event_type in EFFECTS


async def apply(conn: asyncpg.Connection, event: StripeEvent, refunds: Refunds) -> Outcome:
    """Apply ``event`` within the caller's transaction; other types are only recorded."""
    effect = EFFECTS.get(event.type)
    return Outcome("ignored") if effect is None else await effect(conn, event, refunds)
