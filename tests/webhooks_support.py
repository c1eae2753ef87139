"""Helpers of the webhook tests: signed Stripe events delivered to ingress, the webhook log and
outbox, and payments made at Stripe (localstripe). Events and holds made in SQL come from
sql_support."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import stripe

from boxoffice import bus_access
from tests.harness import STRIPE_KEY, WEBHOOK_SECRET

GOOD_CARD = "4242424242424242"


def sign(body: bytes, secret: str = WEBHOOK_SECRET, t: int | None = None) -> str:
    """A Stripe-Signature header, computed the way Stripe does."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(type_: str, obj: dict[str, Any], *, created: int | None = None,
          event_id: str | None = None) -> bytes:
    return json.dumps({
        "id": event_id or f"evt_{uuid.uuid4().hex}", "object": "event", "type": type_,
        "created": int(time.time()) if created is None else created, "livemode": False,
        "api_version": "2024-06-20", "data": {"object": obj},
    }).encode()


def payment_intent(pi_id: str, reservation_id: Any, amount: int = 5000, currency: str = "eur",
                   status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    return {"id": pi_id, "object": "payment_intent", "amount": amount, "currency": currency,
            "status": status, "metadata": {"reservation_id": str(reservation_id)}, **extra}


def charge(pi_id: str, amount: int = 5000, refunded: bool = True) -> dict[str, Any]:
    return {"id": f"ch_{uuid.uuid4().hex[:20]}", "object": "charge", "payment_intent": pi_id,
            "amount": amount, "amount_refunded": amount if refunded else amount // 2,
            "currency": "eur", "refunded": refunded,
            "refunds": {"data": [{"id": f"re_{uuid.uuid4().hex[:20]}"}]}}


def new_pi() -> str:
    return f"pi_{uuid.uuid4().hex[:24]}"


async def relayed(db: asyncpg.Pool | asyncpg.Connection, service: str = "webhook") -> bool:
    """Whether ``service``'s relay published every outbox row of its subjects (a hold made
    in SQL leaves a held row that only payment's relay may publish)."""
    return await db.fetchval("SELECT count(*) = 0 FROM outbox WHERE subject = ANY($1::text[])",
                             list(bus_access.ACCESS[service].relays))


async def post(session: aiohttp.ClientSession, url: str, body: bytes,
               header: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    async with session.post(f"{url}/v1/webhooks/stripe", data=body, headers=headers) as resp:
        text = await resp.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = {"raw": text}
        return resp.status, data, dict(resp.headers)


async def deliver(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    """Deliver a correctly signed event; it must be accepted."""
    status, data, _ = await post(session, url, body, sign(body))
    assert status == 200, data
    return data


async def log_status(db: asyncpg.Pool, event_id: str) -> str | None:
    return await db.fetchval("SELECT processing_status FROM webhook_events_log WHERE event_id = $1",
                             event_id)


def stripe_client(localstripe: Any) -> stripe.StripeClient:
    return stripe.StripeClient(STRIPE_KEY, base_addresses={"api": localstripe.url})


def card(sc: stripe.StripeClient, number: str = GOOD_CARD) -> str:
    """A card PaymentMethod at Stripe: its id."""
    return sc.v1.payment_methods.create(params={"type": "card", "card": {
        "number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}).id


def pay_at_stripe(sc: stripe.StripeClient, pi: str, number: str = GOOD_CARD) -> str:
    """What Stripe.js does in the buyer's browser: a card attached to the PaymentIntent, then
    confirmed. Returns the PaymentIntent's status."""
    sc.v1.payment_intents.update(pi, params={"payment_method": card(sc, number)})
    return sc.v1.payment_intents.confirm(pi).status


def paid_intent(sc: stripe.StripeClient, reservation_id: Any, amount: int = 5000) -> dict[str, Any]:
    """A PaymentIntent paid by card at Stripe (localstripe), as its webhook event carries it."""
    pi = sc.v1.payment_intents.create(params={
        "amount": amount, "currency": "eur", "metadata": {"reservation_id": str(reservation_id)}})
    assert pay_at_stripe(sc, pi.id) == "succeeded"
    return sc.v1.payment_intents.retrieve(pi.id).to_dict()
