"""PaymentIntents: the HTTP body, the create request, the audit query and PAYMENTS events."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from boxoffice.wire import Event, Message
from boxoffice.wire.reservations import Uuid

ADMIN_PAYMENTS_LIST = "admin.payment.payments.list"
# the request an Idempotency-Key is fingerprinted with and recorded for
CREATE_INTENT_ROUTE = "POST /v1/payment_intents"


class IntentBody(Message):
    """Body of ``POST /v1/payment_intents``: the amount always comes from the reservation."""

    reservation_id: Uuid


class CreateIntentRequest(Message):
    """``payments.intents.create``: ingress validated key and body and computed the fingerprint."""

    client_id: str
    idempotency_key: str
    reservation_id: Uuid
    fingerprint: str


class StoredResponse(msgspec.Struct):
    """What ingress answers: the stored status and body, byte for byte, and whether replayed."""

    status: int
    body: str
    replayed: bool = False


class PaymentIntent(msgspec.Struct):
    """The 201 body of ``POST /v1/payment_intents`` (stored and replayed as is)."""

    id: str
    client_secret: str
    amount: int
    currency: str
    status: str
    reservation_id: str


class ListPayments(Message):
    """``admin.payment.payments.list``: the audit trail of ``payment_intents_log``."""

    reservation_id: Uuid | None = None
    idempotency_key: Annotated[str, msgspec.Meta(pattern=r"^[\x20-\x7e]{1,255}\Z")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class PaymentLogEntry(msgspec.Struct):
    """One idempotency key. The stored response body is not shown: it holds the client secret."""

    id: int
    client_id: str
    idempotency_key: str
    reservation_id: str | None
    recovery_point: str
    locked_at: datetime | None
    stripe_idempotency_key: str
    stripe_payment_intent_id: str | None
    amount: int | None
    currency: str | None
    response_status: int | None
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    payment_status: str | None = None


class PaymentLog(msgspec.Struct):
    items: list[PaymentLogEntry]


class PaymentEvent(Event):
    """Body of ``payments.events.<created|succeeded|failed|refunded>``."""

    payment_intent_id: str
    reservation_id: str | None
    amount: int
    currency: str
    occurred_at: datetime
    reason: str | None = None
