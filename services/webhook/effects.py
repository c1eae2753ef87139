"""What each Stripe event does to payments and reservations.

A payment is a state machine that only moves forward (``advance_payment`` in SQL: a status rank,
and the event's ``created`` between states of one rank), and an event's effects run only when it
moved the payment. So however often and in whatever order Stripe delivers, each change happens
once: a ``payment_failed`` older than a ``succeeded`` changes nothing, a ``succeeded`` after the
refund changes nothing, a refund gives tickets back once.

What each event does when it moves the payment:
- ``payment_intent.succeeded``: the reservation completed (tickets sold),
  ``payments.events.succeeded``; tickets gone or the hold paid twice: a refund decided;
- ``payment_intent.payment_failed``: recorded, ``payments.events.failed``; the hold stays until it
  expires;
- ``payment_intent.processing``: recorded;
- ``payment_intent.canceled``: the hold it holds released, ``payments.events.failed`` (reason
  ``canceled``);
- ``charge.refunded`` (in full): the tickets it paid for back to inventory,
  ``payments.events.refunded``;
- ``charge.dispute.created``: recorded (the hold sold if its succeeded event is still to come),
  and a critical error reported;
- anything else: recorded as ``ignored``.

Tickets only ever go back on the refund or cancel of the PaymentIntent that holds them
(``reservations.payment_intent_id``): a refund of a second payment for a hold sold by the first
changes nothing but that payment.

The claim and the effects are one SQL function, ``apply_stripe_event``, run as one statement:
one round trip, and no call to Stripe; a batch of events is one statement too
(``apply_stripe_events``: the successes that complete active holds and touch nothing else of
the batch together, set-based; every other event in a savepoint of its own). Money that must go
back is decided in that transaction as a ``stripe_actions`` row and refunded by the action
worker (actions.py), which resumes from the row after any crash. This module reads the event's
object into the function's arguments and turns outcomes into error reports, which the caller
sends only after the commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Protocol

import asyncpg
import msgspec

from boxoffice.webhook.stripe_event_log import created_at
from boxoffice.wire.stripe import (
    ChargeObject,
    DisputeObject,
    EventId,
    EventType,
    PaymentIntentObject,
    StripeEvent,
    read_object,
)

APPLY = ("SELECT * FROM apply_stripe_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
FIRST_BUCKETS = ("SELECT reservation_id, min(event_id::text) AS event_id, min(bucket) AS bucket "
                 "FROM reservation_allocations WHERE reservation_id = ANY($1::uuid[]) "
                 "GROUP BY reservation_id")
APPLY_MANY = ("SELECT * FROM apply_stripe_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
              "ORDER BY i")



class ApplyOutcome(StrEnum):
    """What ``apply_stripe_event`` did with an event (also a metric label)."""

    DUPLICATE = "duplicate"  # applied before: nothing done
    IGNORED = "ignored"  # a type without effects: recorded only
    NO_PAYMENT_INTENT = "no_payment_intent"  # a refund or dispute of a charge without one
    PARTIAL_REFUND = "partial_refund"  # the sale stands
    DISPUTED = "disputed"
    STALE = "stale"  # it did not move the payment forward
    COMPLETED = "completed"  # the hold sold
    ALREADY_COMPLETED = "already_completed"  # the hold was sold by this PaymentIntent already
    NO_RESERVATION = "no_reservation"  # a success whose PaymentIntent names no hold
    UNKNOWN = "unknown"  # a success for a hold id that is not in the database
    REFUND_DUPLICATE_PAYMENT = "refund_duplicate_payment"
    REFUND_OVERSOLD = "refund_oversold"
    RECORDED = "recorded"
    RELEASED = "released"  # a cancel released the hold
    TICKETS_RETURNED = "tickets_returned"  # a refund gave the tickets back


# outcome -> what is reported (the error-sink alerts on critical)
REPORTS: dict[ApplyOutcome, tuple[int, str]] = {
    ApplyOutcome.NO_RESERVATION: (logging.ERROR, "payment succeeded for no known reservation"),
    ApplyOutcome.REFUND_OVERSOLD: (logging.ERROR, "payment arrived after the hold ended and the "
                                                  "tickets were sold: refund decided"),
    ApplyOutcome.REFUND_DUPLICATE_PAYMENT: (logging.ERROR, "second payment for an already "
                                                           "completed reservation: refund decided"),
    ApplyOutcome.DISPUTED: (logging.CRITICAL, "a charge was disputed"),
    ApplyOutcome.NO_PAYMENT_INTENT: (logging.WARNING, "refund or dispute of a charge without a "
                                                      "PaymentIntent"),
}


@dataclass
class Report:
    level: int
    message: str
    context: dict[str, Any]


@dataclass
class Outcome:
    """What applying an event did (a short word, also a metric label) and what to report."""

    name: ApplyOutcome
    reports: list[Report] = field(default_factory=list)


@dataclass
class Args:
    """The event's object, as ``apply_stripe_event`` takes it."""

    payment_intent_id: str | None = None
    reservation_id: uuid.UUID | None = None
    amount: int | None = None
    currency: str | None = None
    reason: str | None = None
    refund_id: str | None = None
    refunded: bool | None = None


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


def arguments(event: StripeEvent) -> Args:
    """Read ``data.object``; raises ``msgspec.ValidationError`` if it is not what its type says."""
    return _arguments(event.type, lambda type_: read_object(event, type_))


def _arguments(kind: str, read: Callable[[type[Any]], Any]) -> Args:
    """The arguments of an event of type ``kind`` whose object ``read(type)`` reads as ``type``."""
    if kind.startswith("payment_intent."):
        pi: PaymentIntentObject = read(PaymentIntentObject)
        error = pi.last_payment_error or {}
        return Args(payment_intent_id=pi.id, reservation_id=_uuid(pi.metadata.get("reservation_id")),
                    amount=pi.amount, currency=pi.currency,
                    reason=error.get("decline_code") or error.get("code"))
    if kind == "charge.refunded":
        charge: ChargeObject = read(ChargeObject)
        refunds = (charge.refunds or {}).get("data") or []
        first = refunds[0] if refunds and isinstance(refunds[0], dict) else {}
        return Args(payment_intent_id=charge.payment_intent, amount=charge.amount,
                    currency=charge.currency, refunded=charge.refunded,
                    reservation_id=_uuid(charge.metadata.get("reservation_id")),
                    refund_id=first.get("id") if isinstance(first.get("id"), str) else None)
    if kind == "charge.dispute.created":
        dispute: DisputeObject = read(DisputeObject)
        return Args(payment_intent_id=dispute.payment_intent, amount=dispute.amount,
                    currency=dispute.currency, reason=dispute.reason)
    return Args()


class EventHead(Protocol):
    """What applying an event reads of it besides its object (a ``StripeEvent``, a ``Delivery``)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def livemode(self) -> bool | None: ...


class _RawData(msgspec.Struct):
    object: msgspec.Raw


class Delivery(msgspec.Struct):
    """A Stripe event as the consumer takes it off the bus: ``StripeEvent`` (the same fields,
    checked alike), its object kept unread, then read once straight into its type
    (``delivered``) instead of into a dict of the whole object and from that into its type."""

    id: EventId
    type: EventType
    created: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
    data: _RawData
    livemode: bool | None = None


_read_delivery = msgspec.json.Decoder(Delivery, strict=True).decode
# as read_object reads them (strict=False): the tolerant readers of data.object
_read_objects = {t: msgspec.json.Decoder(t, strict=False).decode
                 for t in (PaymentIntentObject, ChargeObject, DisputeObject)}


def delivered(data: bytes) -> tuple[Delivery, Args | msgspec.ValidationError]:
    """The event in a message and its ``parsed`` arguments, read once. Raises
    ``msgspec.DecodeError`` / ``msgspec.ValidationError`` where ``wire.decode(data,
    StripeEvent)`` would: not JSON, not a Stripe event, ``data.object`` not an object."""
    event = _read_delivery(data)
    raw = event.data.object
    if memoryview(raw)[:1] != b"{":
        raise msgspec.ValidationError("Expected `object` - at `$.data.object`")
    try:
        return event, _arguments(event.type, lambda type_: _read_objects[type_](raw))
    except msgspec.ValidationError as exc:
        return event, exc


async def _run(pool: asyncpg.Pool | asyncpg.Connection, event: StripeEvent, raw: str,
               a: Args) -> asyncpg.Record:
    return await pool.fetchrow(APPLY, event.id, event.type, created_at(event), raw,
                               a.payment_intent_id, a.reservation_id, a.amount, a.currency,
                               a.reason, a.refund_id, a.refunded)


async def apply(pool: asyncpg.Pool | asyncpg.Connection, event: StripeEvent, raw: str) -> Outcome:
    """Apply ``event`` once, committed when this returns; raises if nothing was applied."""
    a = arguments(event)
    return _outcome(event, a, await _run(pool, event, raw, a))


def parsed(event: StripeEvent) -> Args | msgspec.ValidationError:
    """``arguments(event)``, or what reading them failed with (read once a delivery: the consumer
    routes by the hold, then applies)."""
    try:
        return arguments(event)
    except msgspec.ValidationError as exc:
        return exc


async def apply_many(conn: asyncpg.Connection, events: Sequence[tuple[EventHead, str]],
                     args: Sequence[Args | msgspec.ValidationError] | None = None
                     ) -> list[Outcome | Exception]:
    """Apply ``events`` in order, in one statement of the caller's transaction, each in a
    savepoint of its own, or with others like it set-based (``apply_stripe_events``): committed
    with that transaction.

    One result an event: its outcome, or what it failed with (``msgspec.ValidationError`` for
    an object that does not fit its type, else the ``asyncpg.PostgresError`` its savepoint was
    rolled back for). Raises, and nothing is applied, if the statement itself fails.
    ``args``: each event's ``parsed``, if read already.
    """
    results: list[Outcome | Exception | None] = [None] * len(events)
    todo: list[tuple[int, EventHead, Args]] = []
    columns: tuple[list[Any], ...] = tuple([] for _ in range(11))
    for n, (event, raw) in enumerate(events):
        a = parsed(_whole(event)) if args is None else args[n]
        if isinstance(a, msgspec.ValidationError):
            results[n] = a
            continue
        todo.append((n, event, a))
        for column, value in zip(columns, (
                event.id, event.type, created_at(event), raw, a.payment_intent_id,
                a.reservation_id, a.amount, a.currency, a.reason, a.refund_id, a.refunded)):
            column.append(value)
    if todo:
        rows = await conn.fetch(APPLY_MANY, *columns)
        for (n, event, a), row in zip(todo, rows, strict=True):
            if row["error_state"] is None:
                results[n] = _outcome(event, a, row)
            else:  # the exception the event's statement raised, as asyncpg would have raised it
                results[n] = asyncpg.PostgresError.new({"C": row["error_state"],
                                                        "M": row["error"]})
    done = [r for r in results if r is not None]
    assert len(done) == len(events)
    return done


def _whole(event: EventHead) -> StripeEvent:
    if not isinstance(event, StripeEvent):  # its object was not kept: read with its arguments
        raise TypeError("a Delivery is applied with the arguments delivered() read")
    return event


def _outcome(event: EventHead, a: Args, row: asyncpg.Record) -> Outcome:
    outcome = Outcome(ApplyOutcome(row["outcome"]))
    if outcome.name in REPORTS:
        level, message = REPORTS[outcome.name]
        context = {"event_id": event.id, "event_type": event.type,
                   "payment_intent_id": a.payment_intent_id, "amount": row["amount"] or a.amount,
                   "currency": row["currency"] or a.currency}
        if row["reservation_id"] is not None:
            context["reservation_id"] = str(row["reservation_id"])
        if a.reason and outcome.name is ApplyOutcome.DISPUTED:
            context["reason"] = a.reason
        outcome.reports.append(Report(level, message, context))
    return outcome



def hold_of(event: StripeEvent | Args | msgspec.ValidationError) -> uuid.UUID | None:
    """The hold ``event`` names (or its ``parsed`` arguments), if it names one (and its object
    fits its type)."""
    a = parsed(event) if isinstance(event, StripeEvent) else event
    return None if isinstance(a, msgspec.ValidationError) else a.reservation_id


async def first_buckets(pool: asyncpg.Pool, holds: Collection[uuid.UUID]
                        ) -> dict[uuid.UUID, tuple[str, int]]:
    """The (ticketed event, bucket) each of ``holds`` first takes tickets from: what applying
    an event of the hold locks first."""
    if not holds:
        return {}
    rows = await pool.fetch(FIRST_BUCKETS, list(holds))
    return {r["reservation_id"]: (r["event_id"], r["bucket"]) for r in rows}
