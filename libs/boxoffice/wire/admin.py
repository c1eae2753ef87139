"""Operator queries, routed by ingress to the owning service over ``admin.<owner>.<verb>``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from boxoffice.wire import Message
from boxoffice.wire.reservations import TEXT

EVENTS_CREATE = "admin.payment.events.create"
EVENTS_GET = "admin.payment.events.get"
EVENTS_LIST = "admin.payment.events.list"


class CreateEvent(Message):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=TEXT)]
    capacity: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]
    price: Annotated[int, msgspec.Meta(ge=0, le=100_000_000_00)]
    currency: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z]{3}\Z")]
    buckets: Annotated[int, msgspec.Meta(ge=1, le=256)] | None = None


class GetEvent(Message):
    event_id: str


class TicketedEvent(msgspec.Struct):
    id: str
    name: str
    capacity: int
    price: int
    currency: str
    buckets: int
    held: int
    sold: int
    available: int


class ListEvents(Message):
    """``admin.payment.events.list``: ticketed events, newest first."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class TicketedEvents(msgspec.Struct):
    events: list[TicketedEvent]
