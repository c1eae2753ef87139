"""Holds: requests to the payment service and the events on RESERVATIONS."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from boxoffice.wire import Event, Message

Status = Literal["active", "expired", "completed", "cancelled"]
Uuid = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F-]{36}$")]


class HoldRequest(Message):
    client_id: str
    event_id: str
    quantity: int
    customer_ref: str | None = None
    idempotency_key: str | None = None


class GetRequest(Message):
    client_id: str
    reservation_id: str


class CancelRequest(Message):
    client_id: str
    reservation_id: str


class Reservation(msgspec.Struct):
    id: str
    event_id: str
    quantity: int
    status: Status
    expires_at: datetime
    amount: int
    currency: str
    customer_ref: str | None = None
    created_at: datetime | None = None


class ReservationEvent(Event):
    """Body of ``reservations.events.<held|expired|completed|cancelled>``."""

    reservation_id: str
    event_id: str
    quantity: int
    occurred_at: datetime
    expires_at: datetime | None = None
    payment_intent_id: str | None = None
