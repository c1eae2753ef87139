"""The consumer reads a message once (``effects.delivered``): the same event, arguments and
refusals as decoding a ``StripeEvent`` and reading its object (``effects.parsed``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
import pytest

from boxoffice import wire
from boxoffice.webhook import effects
from boxoffice.wire.stripe import StripeEvent

HOLD = str(uuid.uuid4())


def event(kind: str, obj: Any, **top: Any) -> bytes:
    return json.dumps({"id": "evt_1", "object": "event", "type": kind, "created": 1_700_000_000,
                       "livemode": False, "data": {"object": obj}, **top}).encode()


PI = {"id": "pi_1", "object": "payment_intent", "amount": 2500, "currency": "eur",
      "metadata": {"reservation_id": HOLD}, "status": "succeeded", "unknown": [1, {"x": None}],
      "last_payment_error": {"decline_code": "insufficient_funds"}}
CHARGE = {"id": "ch_1", "payment_intent": "pi_1", "amount": 2500, "currency": "eur",
          "refunded": True, "metadata": {"reservation_id": HOLD},
          "refunds": {"data": [{"id": "re_1"}]}}
DISPUTE = {"id": "dp_1", "charge": "ch_1", "payment_intent": "pi_1", "amount": "2500",
           "currency": "eur", "reason": "fraudulent"}

SAME = [
    event("payment_intent.succeeded", PI),
    event("payment_intent.payment_failed", {**PI, "metadata": {"reservation_id": "not a uuid"}}),
    event("charge.refunded", CHARGE),
    event("charge.dispute.created", DISPUTE),  # an amount as a string: read leniently, as before
    event("customer.created", {"id": "cus_1"}),
    event("payment_intent.succeeded", {**PI, "amount": "lots"}),  # the object does not fit
    event("charge.refunded", {"payment_intent": "pi_1"}),  # no id: does not fit
    event("payment_intent.succeeded", PI, livemode=None),
]
REFUSED = [
    b"not json",
    event("payment_intent.succeeded", [PI]),  # data.object not an object
    event("payment_intent.succeeded", "pi_1"),
    event("Payment Intent", PI),  # a type that cannot be a subject
    event("payment_intent.succeeded", PI, created=-1),
    json.dumps({"id": "evt_1", "type": "payment_intent.succeeded", "created": 1}).encode(),
]


@pytest.mark.parametrize("body", SAME)
def test_the_same_event_and_arguments(body: bytes) -> None:
    whole = wire.decode(body, StripeEvent)
    got, args = effects.delivered(body)
    assert (got.id, got.type, got.created, got.livemode) == (
        whole.id, whole.type, whole.created, whole.livemode)
    expected = effects.parsed(whole)
    if isinstance(expected, msgspec.ValidationError):
        assert isinstance(args, msgspec.ValidationError)
    else:
        assert args == expected


@pytest.mark.parametrize("body", REFUSED)
def test_refused_where_a_stripe_event_is(body: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        wire.decode(body, StripeEvent)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        effects.delivered(body)


def test_the_fields_checked_alike() -> None:
    """Delivery is StripeEvent but for its object: a check added to one is added to both."""
    ours = {f.name: (f.type, f.default) for f in msgspec.structs.fields(effects.Delivery)}
    theirs = {f.name: (f.type, f.default) for f in msgspec.structs.fields(StripeEvent)}
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != "data"} == \
        {k: v for k, v in theirs.items() if k != "data"}
