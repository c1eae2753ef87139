"""Refunds through Stripe, for payments that arrived when their tickets were gone.

A refund is created with its own idempotency key (``refund-<payment intent id>``), so a retry
after a crash or a timeout gets the same refund back from Stripe instead of a second one. Keys
expire after a day and some emulators ignore them, so an existing refund of the PaymentIntent
is looked up first and reused: whatever the retries, a payment is refunded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import stripe

from boxoffice import stripe_api
from boxoffice.config import Config

log = logging.getLogger("boxoffice.webhook.refunds")

LIVE_REFUND = ("succeeded", "pending", "requires_action")


class Refunds:
    """Refunds whole PaymentIntents; the Stripe client is passed in (one per process)."""

    def __init__(self, client: stripe.StripeClient, *, timeout: float = 20.0):
        self.client = client
        self.timeout = timeout

    async def refund(self, payment_intent_id: str, amount: int, reason: str,
                     reservation_id: str | None) -> str:
        """Refund ``payment_intent_id`` in full (once); returns the refund's id."""
        async with asyncio.timeout(self.timeout):
            existing = await self.client.v1.refunds.list_async(
                params={"payment_intent": payment_intent_id, "limit": 100})
            live = [r for r in existing.data if r.status in LIVE_REFUND]
            if live and sum(r.amount for r in live) >= amount:
                return live[-1].id
            refund = await self.client.v1.refunds.create_async(
                params={"payment_intent": payment_intent_id,
                        "metadata": {"boxoffice_reason": reason,
                                     "reservation_id": reservation_id or ""}},
                options={"idempotency_key": f"refund-{payment_intent_id}"})
        log.info("refunded %s (%s)", payment_intent_id, reason,
                 extra={"payment_intent_id": payment_intent_id, "refund_id": refund.id})
        return refund.id


@contextlib.asynccontextmanager
async def client(cfg: Config) -> AsyncIterator[Refunds]:
    """A Stripe client on ``STRIPE_API_BASE`` when set; its HTTP session closed on exit."""
    async with stripe_api.service_client(cfg, timeout=15, max_network_retries=2) as sc:
        yield Refunds(sc)
