"""The self-audit's Stripe check: our books against Stripe's (localstripe, with Stripe's list
filters in front of it). Real payment, ingress and webhook processes keep the books, paid at
Stripe, with Stripe's webhooks delivered; the check runs in-process with a grace of 2 s. Each
test has a localstripe of its own: a full pass lists everything Stripe holds.

Damage made at Stripe (a refund in the dashboard, a PaymentIntent created outside boxoffice) or
in our books (a refund recorded that Stripe never made) is found, named and resolved once
repaired the way an operator or reconciliation would."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest_asyncio
import stripe

from boxoffice.embedded import LocalStripe
from boxoffice.webhook.audit_stripe import StripeCheck
from boxoffice.webhook.audit_stripe_reads import StripeReads
from tests.audit_support import AuditListsProxy, auditor, named, open_findings, run
from tests.checkout_support import Api
from tests.harness import STRIPE_KEY, WEBHOOK_SECRET, eventually
from tests.webhooks_support import deliver, event, pay_at_stripe

GRACE = 2


@pytest_asyncio.fixture
async def reads(own_stripe_api: AuditListsProxy) -> AsyncIterator[StripeReads]:
    """What the webhook service reads Stripe with: an async client, no retries, short calls."""
    http = stripe.AIOHTTPClient(timeout=5)
    client = stripe.StripeClient(STRIPE_KEY, http_client=http, max_network_retries=0,
                                 base_addresses={"api": own_stripe_api.url})
    try:
        yield StripeReads(client, timeout=5)
    finally:
        await http.close_async()


async def checkout(api: Api, event_id: str, quantity: int = 2) -> tuple[uuid.UUID, str]:
    r = await api.hold(event_id, quantity)
    assert r.status == 201, r.body
    p = await api.pay(r.json["id"], f"audit-{uuid.uuid4()}")
    assert p.status == 201, p.body
    return uuid.UUID(r.json["id"]), p.json["id"]


async def test_stripe_books_agree_then_damage_is_found_and_resolved(
        db: asyncpg.Pool, start_service, own_stripe: LocalStripe, own_stripe_api: AuditListsProxy,
        reads: StripeReads, http: aiohttp.ClientSession) -> None:
    start_service("payment", STRIPE_API_BASE=own_stripe_api.url)
    start_service("webhook", STRIPE_API_BASE=own_stripe_api.url)
    start_service("reaper")
    ingress = start_service("ingress")
    own_stripe.configure_webhook(f"{ingress.url}/v1/webhooks/stripe", WEBHOOK_SECRET)
    api = Api(http, ingress.url)
    # the test acts at Stripe directly (a blocking client: not through the proxy in this loop)
    sc = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": own_stripe.url})
    event_id = await api.create_event(capacity=20, price=1500)
    paid = [await checkout(api, event_id) for _ in range(3)]
    unpaid = await checkout(api, event_id, 1)
    for _, pi in paid:
        assert pay_at_stripe(sc, pi) == "succeeded"
    await eventually(lambda: db.fetchval("SELECT count(*) = 3 FROM reservations "
                                       "WHERE status = 'completed'"), 30, "three sales")
    # a refund boxoffice decides and makes itself (a cancel of the unpaid hold, too)
    refunded_res, refunded_pi = paid[2]
    await db.execute("SELECT request_stripe_action('refund', $1, $2, 'test', 3000)",
                     refunded_pi, refunded_res)
    await api.call("POST", f"/v1/reservations/{unpaid[0]}/cancel")
    await eventually(lambda: db.fetchval("SELECT count(*) = 0 FROM stripe_actions "
                                       "WHERE status = 'pending'"), 30, "the actions made")

    a = auditor(db, StripeCheck(db, reads, grace=GRACE))
    clean = await run(a)
    assert clean.holds, clean
    assert clean.checks[0].mode == "full" and clean.checks[0].examined == 4
    await asyncio.sleep(GRACE + 1)  # what follows is all that is younger than the grace

    # 1. a refund made in Stripe's dashboard, whose webhook never reaches us
    own_stripe.configure_webhook("http://127.0.0.1:9/gone", "whsec_unused_unused")
    dash_res, dash_pi = paid[0]
    refund = sc.v1.refunds.create(params={"payment_intent": dash_pi})
    # 2. a PaymentIntent created at Stripe outside boxoffice, naming one of our holds
    other_res = await db.fetchval("SELECT id FROM hold_tickets($1, 1, 'client', 900)",
                                  uuid.UUID(event_id))
    orphan = sc.v1.payment_intents.create(params={
        "amount": 1500, "currency": "eur", "metadata": {"reservation_id": str(other_res)}})
    # 3. a refund recorded in our books that Stripe never made (nothing in flight explains it)
    ghost_pi = paid[1][1]
    await db.execute("UPDATE payments SET status = 'refunded', updated_at = now() "
                     "WHERE payment_intent_id = $1", ghost_pi)
    young = await run(a)  # what happened at Stripe is younger than the grace: in flight
    assert named(young) == {("stripe", "refund_missing_at_stripe", f"PaymentIntent {ghost_pi}")}
    assert young.checks[0].in_flight == 2, young.checks
    await asyncio.sleep(GRACE + 1)
    found = await run(a)
    assert named(found) == {("stripe", "refund_not_recorded", f"PaymentIntent {dash_pi}"),
                            ("stripe", "unknown_payment_intent", f"PaymentIntent {orphan.id}"),
                            ("stripe", "refund_missing_at_stripe", f"PaymentIntent {ghost_pi}")}
    by_kind = {f.kind: f for f in found.findings}
    assert by_kind["refund_not_recorded"].found == "succeeded in boxoffice"
    assert by_kind["unknown_payment_intent"].ids == {"payment_intent_id": orphan.id,
                                                     "reservation_id": str(other_res)}
    assert by_kind["refund_missing_at_stripe"].found == "0 refunded at Stripe"
    assert found.checks[0].mode == "incremental"

    # repaired: the refund's event delivered as Stripe would have sent it; the orphan cancelled
    # as reconciliation does; the false refund undone by hand
    charge = {"id": f"ch_{uuid.uuid4().hex[:20]}", "object": "charge", "payment_intent": dash_pi,
              "amount": 3000, "amount_refunded": 3000, "currency": "eur", "refunded": True,
              "metadata": {"reservation_id": str(dash_res)},
              "refunds": {"data": [{"id": refund.id}]}}
    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, event("charge.refunded", charge))
    await db.execute("SELECT request_stripe_action('cancel', $1, $2, 'orphan', 1500)",
                     orphan.id, other_res)
    await db.execute("UPDATE payments SET status = 'succeeded', updated_at = now() "
                     "WHERE payment_intent_id = $1", ghost_pi)
    await eventually(lambda: db.fetchval(
        "SELECT count(*) = 2 FROM payments WHERE payment_intent_id = ANY($1) "
        "AND status IN ('refunded', 'canceled')", [dash_pi, orphan.id]), 30, "the repairs")
    await asyncio.sleep(GRACE + 1)  # the repairs' own events are younger than the grace
    fixed = await run(a)
    assert fixed.holds and fixed.checks[0].resolved == 3, fixed
    assert await open_findings(db, "stripe") == []
    assert (await run(a, full=True)).holds


async def test_stripe_unreachable_is_a_failed_run_not_a_violation(
        db: asyncpg.Pool, own_stripe_api: AuditListsProxy, reads: StripeReads) -> None:
    a = auditor(db, StripeCheck(db, reads, grace=GRACE))
    assert (await run(a)).holds
    await own_stripe_api.stop()
    started = time.monotonic()
    down = await run(a)
    assert not down.holds and down.findings == []
    assert down.checks[0].error is not None and "Stripe" in down.checks[0].error
    assert time.monotonic() - started < 10
    row = await db.fetchrow("SELECT * FROM audit_checks WHERE check_name = 'stripe'")
    assert row["error"] == down.checks[0].error and json.loads(json.dumps(row["checkpoint"]))
    await own_stripe_api.start()
    assert (await run(a)).holds
