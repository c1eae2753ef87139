"""POST /v1/webhooks/stripe: only correctly signed, well-formed events reach the bus."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
import stripe

from boxoffice import bus as busmod
from boxoffice.ingress.webhooks import InvalidSignature, verify_signature
from tests.harness import WEBHOOK_SECRET, WEBHOOK_SECRET_OLD
from tests.webhooks_support import event, new_pi, payment_intent, post, sign


def test_signature_agrees_with_stripe_library() -> None:
    body = event("payment_intent.succeeded", payment_intent(new_pi(), "r"))
    now = int(time.time())
    # what Stripe's own library signs, we accept; what we sign in tests, Stripe's library accepts
    mac = stripe.WebhookSignature._compute_signature(f"{now}.{body.decode()}", WEBHOOK_SECRET)
    verify_signature(body, f"t={now},v0=ignored,v1={mac}", (WEBHOOK_SECRET,))
    assert stripe.Webhook.construct_event(body.decode(), sign(body), WEBHOOK_SECRET).id
    with pytest.raises(InvalidSignature):
        verify_signature(body, f"t={now},v0={mac}", (WEBHOOK_SECRET,))  # only v1 counts
    with pytest.raises(InvalidSignature):
        verify_signature(body, f"t=１２３,v1={mac}", (WEBHOOK_SECRET,))  # non-ASCII digits
    # Stripe's library lets a stamp from the future through; we do not
    future = now + 3600
    header = sign(body, t=future)
    assert stripe.Webhook.construct_event(body.decode(), header, WEBHOOK_SECRET).id
    with pytest.raises(InvalidSignature):
        verify_signature(body, header, (WEBHOOK_SECRET,))


def test_the_timestamp_tolerance_is_exact_on_both_sides() -> None:
    body = event("payment_intent.succeeded", payment_intent(new_pi(), "r"))
    now = 1_800_000_000
    for t in (now - 300, now, now + 300):  # at the edge, still inside
        verify_signature(body, sign(body, t=t), (WEBHOOK_SECRET,), now=now, tolerance=300)
    for t in (now - 301, now + 301):
        with pytest.raises(InvalidSignature, match="tolerance"):
            verify_signature(body, sign(body, t=t), (WEBHOOK_SECRET,), now=now, tolerance=300)


async def test_ingress_accepts_only_signed_well_formed_events(start_service, nats_url: str) -> None:
    ingress = start_service("ingress", MAX_BODY_BYTES="65536")
    url = ingress.url
    now = int(time.time())
    good = event("payment_intent.succeeded", payment_intent(new_pi(), "r1"))
    rotated = event("charge.refunded", {"id": "ch_1", "payment_intent": new_pi()})
    both = event("customer.created", {"id": "cus_1"})
    good_id = json.loads(good)["id"]
    async with aiohttp.ClientSession() as s:
        status, data, _ = await post(s, url, good, sign(good))
        assert (status, data["id"], data["duplicate"]) == (200, good_id, False)
        status, data, _ = await post(s, url, good, sign(good))  # Stripe delivers it again
        assert (status, data["duplicate"]) == (200, True)
        status, _, _ = await post(s, url, rotated, sign(rotated, WEBHOOK_SECRET_OLD))
        assert status == 200  # signed with the previous secret during rotation
        two = f"{sign(both, 'whsec_wrong_one')},v1={sign(both).split('v1=')[1]}"
        status, _, _ = await post(s, url, both, two)
        assert status == 200  # one of several v1 signatures matches

        bad = event("payment_intent.succeeded", payment_intent(new_pi(), "r2"))
        tampered = bad.replace(b'"amount": 5000', b'"amount": 1')
        assert tampered != bad
        # the stamps are read from the clock when sent (the requests before took their time),
        # and sit 30 s outside the 300 s tolerance; the exact edge is tested on verify_signature
        cases = {
            "wrong secret": (bad, sign(bad, "whsec_not_ours_at_all"), 400),
            "stale timestamp": (bad, lambda: sign(bad, t=int(time.time()) - 330), 400),
            "future timestamp": (bad, lambda: sign(bad, t=int(time.time()) + 330), 400),
            "no header": (bad, None, 400),
            "empty header": (bad, "", 400),
            "malformed header": (bad, "v1=abc,t=notanumber", 400),
            "no v1": (bad, f"t={now}", 400),
            "tampered body": (tampered, sign(bad), 400),
            "oversized body": (b"{" + b" " * 70000 + b"}", sign(b"x"), 413),
        }
        for name, (body, header, want) in cases.items():
            status, data, _ = await post(s, url, body, header() if callable(header) else header)
            assert status == want, (name, status, data)
            assert data["code"] == ("payload_too_large" if want == 413 else "invalid_signature"), name
            text = json.dumps(data)
            assert WEBHOOK_SECRET not in text and WEBHOOK_SECRET_OLD not in text

        shapes = {
            "malformed JSON": (b'{"id": "evt_1", "type": ', "invalid_json"),
            "not an object": (b'[1, 2]', "invalid_stripe_event"),
            "no type": (json.dumps({"id": "evt_2", "created": now, "data": {"object": {}}}).encode(),
                        "invalid_stripe_event"),
            "no data.object": (json.dumps({"id": "evt_3", "type": "x.y", "created": now,
                                           "data": {}}).encode(), "invalid_stripe_event"),
            "wildcard type": (event("payment_intent.>", {"id": "pi_x"}), "invalid_stripe_event"),
            "spaces in id": (event("x.y", {}, event_id="evt 4"), "invalid_stripe_event"),
        }
        for name, (body, code) in shapes.items():
            status, data, _ = await post(s, url, body, sign(body))
            assert (status, data["code"]) == (400, code), (name, data)

    # only the three accepted events reached the stream, each once, on its type's subject
    async with busmod.connect(nats_url, "probe") as bus:
        info = await bus.js.stream_info("STRIPE_EVENTS")
        assert info.state.messages == 3
        msg = await bus.js.get_msg("STRIPE_EVENTS", seq=1)
        assert msg.subject == "stripe.events.payment_intent.succeeded"
        assert msg.data == good and msg.headers["Nats-Msg-Id"] == good_id
        assert (await bus.js.get_msg("STRIPE_EVENTS", seq=2)).subject == "stripe.events.charge.refunded"
