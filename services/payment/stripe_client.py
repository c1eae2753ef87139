"""The Stripe API as the payment service uses it: one async client, bounded in time.

Every call has a per-attempt timeout, the SDK's own retries with back-off on connection errors,
409 and 5xx, and an overall deadline. An outcome is either a PaymentIntent, a ``Definitive``
answer (Stripe decided: card declined, invalid request; stored and replayed to the client) or
``Transient`` (Stripe unreachable, timed out, rate limited, 5xx, or our own credentials refused:
nothing is stored and the client's retry resumes with the same Stripe idempotency key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import stripe

from boxoffice import errors, stripe_api
from boxoffice.config import Config

log = logging.getLogger("boxoffice.payment.stripe")

ATTEMPT_TIMEOUT = 3.0   # seconds per HTTP attempt
MAX_RETRIES = 2         # SDK retries (0.5 s then ~1 s back-off)
DEADLINE = 8.0          # seconds for the whole call, retries included (ingress waits 10 s)
PAYMENT_INTENTS = "/v1/payment_intents"

CardDeclined = errors.define("CardDeclined", "card_declined", 402, "The card was declined")
PaymentRejected = errors.define("PaymentRejected", "payment_rejected", 422,
                                "The payment provider rejected the request")


@dataclass(frozen=True)
class CreatedIntent:
    id: str
    client_secret: str
    status: str
    amount: int
    currency: str


# Network failures below the SDK: Stripe's answer never arrived whole.
NETWORK = (aiohttp.ClientError, OSError, asyncio.IncompleteReadError)


class Definitive(Exception):
    """Stripe answered with a final error: ``error`` is what the client is told, and stored."""

    def __init__(self, error: errors.BoxofficeError):
        super().__init__(error.detail)
        self.error = error


class Transient(Exception):
    """No final answer from Stripe; safe to retry with the same idempotency key."""


class StripeGateway:
    def __init__(self, client: stripe.StripeClient, deadline: float = DEADLINE):
        self.client = client
        self.deadline = deadline

    async def create_payment_intent(self, *, amount: int, currency: str, reservation_id: str,
                                    idempotency_key: str) -> CreatedIntent:
        try:
            async with asyncio.timeout(self.deadline):
                # The SDK's raw request: its transport, retries, headers and errors, without the
                # object tree it builds from the answer (a third of its CPU per call, on the
                # buyer's path between the Stripe call and the record), of which five fields
                # are read.
                answer = await self.client.raw_request_async(
                    "post", PAYMENT_INTENTS, amount=amount, currency=currency,
                    metadata={"reservation_id": reservation_id},
                    idempotency_key=idempotency_key)
        except TimeoutError:
            raise Transient(f"Stripe did not answer within {self.deadline:g}s") from None
        except stripe.CardError as exc:
            raise Definitive(CardDeclined(exc.user_message or "the card was declined",
                                          decline_code=exc.code)) from None
        except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
            raise Definitive(PaymentRejected(exc.user_message or "invalid request")) from None
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            # our configuration, not the client's request: never store it against their key
            log.error("Stripe refused our credentials (%s)", type(exc).__name__)
            raise Transient(f"Stripe refused our credentials ({exc.http_status})") from None
        except stripe.StripeError as exc:  # connection errors, rate limits, 5xx
            raise Transient(f"{type(exc).__name__} (HTTP {exc.http_status})") from None
        except NETWORK as exc:
            # the SDK wraps connection failures but not an answer cut mid-body (aiohttp's
            # ClientPayloadError and kin): no final answer either, so resumable, never a 500
            raise Transient(f"Stripe's answer was cut ({type(exc).__name__})") from None
        return created_intent(answer.data)


def created_intent(pi: Any) -> CreatedIntent:
    """The PaymentIntent in a successful answer of Stripe's; an answer that is not one (a proxy's
    page, a truncated object) is ``Transient``: nothing is stored, the retry asks again."""
    try:
        created = CreatedIntent(id=pi["id"], client_secret=pi.get("client_secret") or "",
                                status=pi["status"], amount=pi["amount"],
                                currency=pi["currency"])
    except (KeyError, TypeError, AttributeError):
        raise Transient("Stripe's answer was not a PaymentIntent") from None
    if not (isinstance(created.id, str) and created.id.startswith("pi_")
            and isinstance(created.amount, int)):
        raise Transient("Stripe's answer was not a PaymentIntent")
    return created


@contextlib.asynccontextmanager
async def gateway(cfg: Config) -> AsyncIterator[StripeGateway]:
    """A Stripe client for the service's lifetime; its HTTP session is closed on exit."""
    async with stripe_api.service_client(cfg, timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT),
                                         max_network_retries=MAX_RETRIES) as client:
        yield StripeGateway(client)
