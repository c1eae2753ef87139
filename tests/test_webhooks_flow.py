"""The real flow: a hold and a PaymentIntent through ingress, the card confirmed at Stripe
(localstripe), Stripe's signed payment_intent.succeeded delivered to ingress, the reservation
completed by the webhook service."""

from __future__ import annotations

import uuid

import aiohttp
import asyncpg
import stripe

from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, STRIPE_KEY, WEBHOOK_SECRET, eventually
from tests.sql_support import inventory
from tests.webhooks_support import pay_at_stripe


async def test_paid_hold_is_completed_by_stripes_own_webhook(
        db: asyncpg.Pool, start_service, localstripe) -> None:
    start_service("payment", STRIPE_API_BASE=localstripe.url)
    webhook = start_service("webhook", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    localstripe.configure_webhook(f"{ingress.url}/v1/webhooks/stripe", WEBHOOK_SECRET,
                                  endpoint_id="webhooks-flow")
    try:
        client = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{ingress.url}/v1/admin/events",
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                              json={"name": "Flow", "capacity": 4, "price": 3000,
                                    "currency": "eur"}) as r:
                assert r.status == 201, await r.text()
                event_id = (await r.json())["id"]
            async with s.post(f"{ingress.url}/v1/reservations", headers=client,
                              json={"event_id": event_id, "quantity": 2}) as r:
                assert r.status == 201, await r.text()
                reservation = (await r.json())["id"]
            async with s.post(f"{ingress.url}/v1/payment_intents",
                              headers={**client, "Idempotency-Key": f"flow-{uuid.uuid4()}"},
                              json={"reservation_id": reservation}) as r:
                assert r.status == 201, await r.text()
                pi = await r.json()
        assert pi["amount"] == 6000

        # the buyer's card, confirmed at Stripe (what Stripe.js does in the browser)
        sc = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": localstripe.url})
        assert pay_at_stripe(sc, pi["id"]) == "succeeded"

        rid = uuid.UUID(reservation)

        async def completed() -> bool:
            return await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                                     rid) == "completed"
        await eventually(completed, 30, "Stripe's webhook to complete the reservation")
        row = await db.fetchrow("SELECT * FROM webhook_events_log "
                                "WHERE event_type = 'payment_intent.succeeded'")
        assert row["processing_status"] == "processed"
        assert row["payload"]["data"]["object"]["id"] == pi["id"]
        pay = await db.fetchrow("SELECT * FROM payments WHERE payment_intent_id = $1", pi["id"])
        assert (pay["status"], pay["reservation_id"], pay["amount"]) == ("succeeded", rid, 6000)
        assert await inventory(db, uuid.UUID(event_id)) == (0, 2)
        assert "Traceback" not in webhook.logs()
    finally:  # the emulator is shared by the session: stop sending this test's way
        localstripe.configure_webhook("http://127.0.0.1:9/gone", "whsec_unused_unused",
                                      endpoint_id="webhooks-flow")
