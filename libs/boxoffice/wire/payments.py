"""PaymentIntents: the create request and the events on PAYMENTS."""

from __future__ import annotations

from datetime import datetime

import msgspec

from boxoffice.wire import Event, Message


class CreateIntentRequest(Message):
    client_id: str
    idempotency_key: str
    reservation_id: str
    fingerprint: str


class StoredResponse(msgspec.Struct):
    """What ingress answers: the stored status and body, byte for byte, and whether replayed."""

    status: int
    body: str
    replayed: bool = False


class PaymentEvent(Event):
    """Body of ``payments.events.<created|succeeded|failed|refunded>``."""

    payment_intent_id: str
    reservation_id: str | None
    amount: int
    currency: str
    occurred_at: datetime
    reason: str | None = None
