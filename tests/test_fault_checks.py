"""The fault run's invariants (tests/fault_checks.py) on planted evidence: quiet on a consistent
outcome, and each one loud on the violation it promises to find. Without this, a check that
can never fail would pass every fault run."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.checkout_support import Resp
from tests.fault_checks import Evidence, Invariant, check_all
from tests.fault_stripe import WebhookRelay
from tests.fault_workload import Ledger

EVENT = str(uuid.uuid4())
SOLD, EXPIRED = str(uuid.uuid4()), str(uuid.uuid4())
PI = "pi_sold"


def consistent() -> tuple[Evidence, Ledger, WebhookRelay]:
    """One event: a hold paid and sold, a hold that expired (announced once), one Stripe event
    applied, one error report stored."""
    ev = Evidence(
        reservations={
            SOLD: {"id": SOLD, "event_id": EVENT, "status": "completed", "quantity": 2,
                   "payment_intent_id": PI, "expires_at": None},
            EXPIRED: {"id": EXPIRED, "event_id": EVENT, "status": "expired", "quantity": 1,
                      "payment_intent_id": None, "expires_at": None}},
        inventory=[{"id": EVENT, "capacity": 10, "bucket_capacity": 10, "held": 0, "sold": 2,
                    "active_q": 0, "completed_q": 2}],
        log=[{"client_id": "c", "idempotency_key": "k1", "reservation_id": uuid.UUID(SOLD),
              "recovery_point": "finished", "stripe_payment_intent_id": PI,
              "response_status": 201}],
        payments={PI: {"payment_intent_id": PI, "reservation_id": uuid.UUID(SOLD),
                       "status": "succeeded", "refund_id": None, "refund_reason": None}},
        webhook_log={"evt_1": "processed"},
        errors_stored=Counter({"e-1": 1}),
        overdue=[],
        stripe_intents=[{"id": PI, "status": "succeeded", "amount": 5000,
                         "metadata": {"reservation_id": SOLD},
                         "latest_charge": {"amount_refunded": 0}}],
        stripe_events=[{"id": "evt_1", "type": "payment_intent.succeeded",
                        "data": {"object": {"id": PI}}}],
        expired_messages=Counter({EXPIRED: 1}))
    ledger = Ledger()
    ledger.holds = {SOLD: 2, EXPIRED: 1}
    ledger.intent_made("token", "k1", PI, SOLD)
    ledger.errors_acked = {"e-1"}
    relay = WebhookRelay("http://127.0.0.1:9/", "whsec_x", random.Random(0))
    relay.received = {"evt_1": "payment_intent.succeeded"}
    relay.accepted = {"evt_1"}
    return ev, ledger, relay


def violated(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> dict[str, list[str]]:
    invariants: list[Invariant] = check_all(ev, ledger, relay)
    return {i.name: i.violations for i in invariants if i.violations}


def test_a_consistent_outcome_violates_nothing() -> None:
    assert violated(*consistent()) == {}


def _oversold(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.inventory[0].update(held=9, active_q=9)


def _paid_not_sold(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.reservations[SOLD]["status"] = "expired"
    ev.inventory[0].update(sold=0, completed_q=0)


def _sold_and_refunded(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.stripe_intents[0]["latest_charge"]["amount_refunded"] = 5000


def _orphan_intent(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.stripe_intents.append({"id": "pi_orphan", "status": "requires_payment_method",
                              "amount": 5000, "metadata": {"reservation_id": SOLD}})


def _event_stuck(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.webhook_log["evt_1"] = "received"


def _expired_twice(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.expired_messages[EXPIRED] = 2


def _expired_silently(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    del ev.expired_messages[EXPIRED]


def _report_lost(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ev.errors_stored.clear()


def _hold_lost(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ledger.holds[str(uuid.uuid4())] = 1


def _http_500(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ledger.answer("hold", Resp(500, {}, b'{"code": "internal_error"}'))


def _key_two_intents(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> None:
    ledger.intent_made("token", "k1", "pi_other", SOLD)


@pytest.mark.parametrize(("plant", "caught_by"), [
    (_oversold, "no event oversold"),
    (_paid_not_sold, "sold exactly once or refunded"),
    (_sold_and_refunded, "sold exactly once or refunded"),
    (_orphan_intent, "none at Stripe that boxoffice does not know"),
    (_event_stuck, "every Stripe event is in webhook_events_log"),
    (_expired_twice, "one reservations.events.expired per expired hold"),
    (_expired_silently, "one reservations.events.expired per expired hold"),
    (_report_lost, "every acknowledged error report"),
    (_hold_lost, "every 201 is durable"),
    (_http_500, "no HTTP 500"),
    (_key_two_intents, "no HTTP 500"),
])
def test_each_planted_violation_is_found(plant: Callable[..., Any], caught_by: str) -> None:
    ev, ledger, relay = consistent()
    plant(ev, ledger, relay)
    found = violated(ev, ledger, relay)
    assert [name for name in found if caught_by in name], found
