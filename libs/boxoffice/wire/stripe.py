"""Stripe events as boxoffice reads them, and the operator messages about them.

A Stripe event travels on ``stripe.events.<type>`` exactly as Stripe sent it (the raw body, so
nothing is lost or re-encoded); ``StripeEvent`` is the part boxoffice relies on. The object
structs below are tolerant readers of ``data.object``: unknown fields are ignored, since Stripe
adds fields in every API version.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

import msgspec

from boxoffice.wire import Message

# An event id becomes a Nats-Msg-Id and a primary key; a type becomes subject tokens, so both
# are held to what Stripe actually sends (no spaces, no NATS wildcards).
EventId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,255}\Z")]
EventType = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,64}(\.[a-z0-9_]{1,64}){0,6}\Z")]


class StripeEventData(msgspec.Struct):
    object: dict[str, Any]


class StripeEvent(msgspec.Struct):
    """``id``, ``type``, ``created`` (unix seconds) and ``data.object``; the rest is kept raw."""

    id: EventId
    type: EventType
    created: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
    data: StripeEventData
    livemode: bool | None = None  # a live event must never move a test key's books, nor back


def synthesized(intent: dict[str, Any], kind: str, created: int) -> dict[str, Any]:
    """A Stripe event of our own making from a PaymentIntent as Stripe's API returned it
    (reconciliation, a cancel that came too late). Its id is deterministic, so whoever makes it,
    and however often, it is applied once."""
    return {"id": f"evt_reconcile_{intent['id']}_{kind}", "object": "event",
            "type": f"payment_intent.{kind}", "created": created,
            "livemode": bool(intent.get("livemode")), "data": {"object": intent}}


class PaymentIntentObject(msgspec.Struct):
    id: str
    amount: int = 0
    currency: str = ""
    status: str | None = None
    metadata: dict[str, Any] = {}
    last_payment_error: dict[str, Any] | None = None


class ChargeObject(msgspec.Struct):
    id: str
    payment_intent: str | None = None
    amount: int = 0
    amount_refunded: int = 0
    currency: str = ""
    refunded: bool = False
    metadata: dict[str, Any] = {}
    refunds: dict[str, Any] | None = None


class DisputeObject(msgspec.Struct):
    id: str
    charge: str | None = None
    payment_intent: str | None = None
    amount: int = 0
    currency: str = ""
    reason: str | None = None


def read_object(event: StripeEvent, type_: type[Any]) -> Any:
    """``data.object`` as ``type_`` (raises ``msgspec.ValidationError`` if it does not fit)."""
    return msgspec.convert(event.data.object, type=type_, strict=False)


# -- operators: admin.webhooks.* (owned by the webhook service) ------------------------------
EVENTS_LIST = "admin.webhooks.events.list"
EVENTS_REPLAY = "admin.webhooks.events.replay"
EVENTS_GET = "admin.webhooks.events.get"


class WebhookStatus(StrEnum):
    """``webhook_events_log.processing_status``: where a Stripe event is."""

    RECEIVED = "received"  # not applied yet (a failed attempt is retried)
    PROCESSED = "processed"
    FAILED = "failed"  # given up on: an operator replays it
    IGNORED = "ignored"  # a type without effects


# The same values as the wire's type: a Literal keeps the schemas an inline enum (checked
# against the enum below, so the two cannot drift).
ProcessingStatus = Literal["received", "processed", "failed", "ignored"]
# What an operator may replay: the events whose effects are not applied.
REPLAYABLE = (WebhookStatus.FAILED, WebhookStatus.RECEIVED)
ReplayableStatus = Literal["failed", "received"]
assert get_args(ProcessingStatus) == tuple(WebhookStatus)
assert get_args(ReplayableStatus) == REPLAYABLE


class ListEventsRequest(Message):
    status: ProcessingStatus | None = None
    type: EventType | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class ReplayRequest(Message):
    event_id: EventId


class LoggedEvent(msgspec.Struct):
    """One row of ``webhook_events_log`` without its payload."""

    event_id: str
    event_type: str
    event_created: datetime
    processing_status: ProcessingStatus
    attempts: int
    last_error: str | None
    received_at: datetime
    processed_at: datetime | None


class LoggedEvents(msgspec.Struct):
    events: list[LoggedEvent]


class GetEventRequest(Message):
    event_id: EventId


class LoggedEventDetail(msgspec.Struct):
    """One row of ``webhook_events_log`` with its payload, secrets (a PaymentIntent's
    ``client_secret``, ...) replaced by ``[Filtered]``."""

    event: LoggedEvent
    payload: Any


class ReplayManyBody(Message):
    """Body of ``POST /v1/admin/webhooks/replay``: every event with this status (and type),
    oldest first, at most ``limit``."""

    status: ReplayableStatus
    type: EventType | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class ReplayProgress(msgspec.Struct):
    """A line of the bulk replay's answer (NDJSON): one per event as it is replayed, then a last
    one with ``finished`` true and the totals. ``outcome`` is the effect, ``failed``, or
    ``error`` (the replay itself was refused: ``code``)."""

    done: int
    total: int
    event_id: str | None = None
    outcome: str | None = None
    code: str | None = None
    finished: bool = False
    succeeded: int = 0
    failed: int = 0


class ReplayResult(msgspec.Struct):
    """What a replay did: ``outcome`` is the effect applied (or ``failed``), ``event`` the row after."""

    outcome: str
    event: LoggedEvent


# -- operators: reconciliation with Stripe (admin.webhooks.reconciliation) --------------------
RECONCILIATION = "admin.webhooks.reconciliation"

OrphanAction = Literal["fed_succeeded", "fed_processing", "cancel_requested"]


class ReconciliationRequest(Message):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class ReconciledOrphan(msgspec.Struct):
    """A PaymentIntent naming one of our holds that boxoffice never recorded, and what was done:
    its success or processing fed as an event, or its cancel decided (``cancel_status``: the
    ``stripe_actions`` row's status)."""

    payment_intent_id: str
    reservation_id: str
    amount: int | None
    currency: str | None
    stripe_status: str
    action: OrphanAction
    found_at: datetime
    cancel_status: str | None


class ReconcileRun(msgspec.Struct):
    """One run; ``finished_at`` is null while it runs (or if its replica died mid-run)."""

    id: int
    replica: str
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    events_seen: int
    events_recovered: int
    intents_checked: int
    intents_corrected: int
    orphans_found: int
    orphans: list[ReconciledOrphan]


class Reconciliation(msgspec.Struct):
    """How far reconciliation got (events and PaymentIntents created before these instants were
    looked at) and its runs, newest first."""

    events_until: datetime | None
    intents_until: datetime | None
    last_run: ReconcileRun | None
    runs: list[ReconcileRun]
