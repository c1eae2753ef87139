"""Holds: the HTTP body, the requests to the payment service and the events on RESERVATIONS."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from boxoffice.wire import Event, Message

Status = Literal["active", "expired", "completed", "cancelled"]
Uuid = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")]
MAX_QUANTITY = 100  # tickets per hold
HOLD_ROUTE = "POST /v1/reservations"  # the request a hold's Idempotency-Key is fingerprinted with

Quantity = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUANTITY)]
# Free text that PostgreSQL stores: no NUL (text cannot hold it) nor other control characters.
TEXT = r"^[^\x00-\x1f\x7f]*\Z"
CustomerRef = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=TEXT)]


class HoldBody(Message):
    """Body of ``POST /v1/reservations``."""

    event_id: Uuid
    quantity: Quantity
    customer_ref: CustomerRef | None = None


class HoldRequest(Message):
    """``reservations.hold``: ingress validated the body and computed the fingerprint."""

    client_id: str
    event_id: Uuid
    quantity: Quantity
    customer_ref: CustomerRef | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None


class GetRequest(Message):
    client_id: str
    reservation_id: str


class CancelRequest(Message):
    client_id: str
    reservation_id: str


class Reservation(msgspec.Struct):
    """A hold as clients see it. ``status`` is ``expired`` as soon as ``expires_at`` has passed,
    whether or not the reaper has run."""

    id: str
    event_id: str
    quantity: int
    status: Status
    expires_at: datetime
    amount: int
    currency: str
    customer_ref: str | None = None
    created_at: datetime | None = None
    payment_intent_id: str | None = None


class ReservationEvent(Event):
    """Body of ``reservations.events.<held|expired|completed|cancelled>``."""

    reservation_id: str
    event_id: str
    quantity: int
    occurred_at: datetime
    expires_at: datetime | None = None
    payment_intent_id: str | None = None
    # why a sold hold was cancelled: ``refunded`` (its tickets went back: return_reservation_tickets)
    reason: str | None = None
