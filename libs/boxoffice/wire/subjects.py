"""Subject and stream names of the contract (listed in the README)."""

# request/reply (core NATS, queue group per service)
RESERVATIONS_HOLD = "reservations.hold"
RESERVATIONS_GET = "reservations.get"
RESERVATIONS_CANCEL = "reservations.cancel"
PAYMENTS_INTENTS_CREATE = "payments.intents.create"
ADMIN = "admin"  # admin.<owner>.<verb>, routed by ingress to the owning service

# JetStream streams: name -> subjects
STREAMS: dict[str, list[str]] = {
    "STRIPE_EVENTS": ["stripe.events.>"],
    "ERRORS": ["errors.>"],
    "RESERVATIONS": ["reservations.events.>"],
    "PAYMENTS": ["payments.events.>"],
    "ALERTS": ["alerts.>"],
    "AUDIT": ["audit.actions.>"],  # operators' actions, published by ingress (wire.admin_actions)
    "SENTRY_ITEMS": ["sentry.items.>"],  # feedback, attachments, discards (wire.sentry_items)
}

# durable consumers: (stream, durable name)
WEBHOOK_CONSUMER = ("STRIPE_EVENTS", "webhook")
ERROR_SINK_CONSUMER = ("ERRORS", "error-sink")
ADMIN_ACTIONS_CONSUMER = ("AUDIT", "reaper")


def stripe_event(event_type: str) -> str:
    return f"stripe.events.{event_type}"


def error_report(service: str, level: str, seal: str | None = None) -> str:
    """``errors.<service>.<level>``; with ``seal`` (``boxoffice.scrub.SEAL``), the subject of a
    report its publisher scrubbed as the error-sink would: only ingress may publish those."""
    return f"errors.{service}.{level}.{seal}" if seal else f"errors.{service}.{level}"


def reservation_event(kind: str) -> str:
    return f"reservations.events.{kind}"


def payment_event(kind: str) -> str:
    return f"payments.events.{kind}"


def alert(level: str) -> str:
    return f"alerts.{level}"
