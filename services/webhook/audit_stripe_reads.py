"""What the Stripe check reads at Stripe, and nothing else: lists filtered on ``created`` and
paged, one PaymentIntent, the refunds of one PaymentIntent. Read-only: the check never changes
anything at Stripe (repairs are reconciliation's and the operators' business).

Any failure to read (Stripe unreachable, slow, refusing, an answer cut mid-body) is
``StripeUnavailable``: the run is recorded as failed and the next one tries again; it is never
taken for a difference in the books.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import stripe

PAGE = 100
CALL_TIMEOUT = 30.0
PAYMENT_EVENTS = ("payment_intent.", "charge.")


class StripeUnavailable(Exception):
    """Stripe could not be read now."""


class _NotFound(Exception):
    """Stripe has no such object (404)."""


class StripeReads:
    def __init__(self, client: stripe.StripeClient, *, timeout: float = CALL_TIMEOUT):
        self.client = client
        self.timeout = timeout
        self._charges: dict[str, str | None] = {}

    async def _call(self, call: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise _NotFound() from None
            raise StripeUnavailable(
                f"Stripe refused a read: {exc.code} (HTTP {exc.http_status})") from None
        except stripe.StripeError as exc:
            raise StripeUnavailable(
                f"Stripe: {type(exc).__name__} (HTTP {exc.http_status})") from None
        except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise StripeUnavailable(
                f"Stripe's answer did not arrive ({type(exc).__name__})") from None

    async def _all(self, resource: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params = {**params, "limit": PAGE}
        while True:
            try:
                page = await self._call(resource.list_async(params=params))
            except _NotFound:
                raise StripeUnavailable("Stripe: no such list") from None
            items = [obj.to_dict() for obj in page.data]
            out += items
            if not page.has_more or not items:
                return out
            params["starting_after"] = items[-1]["id"]

    @staticmethod
    def _since(lo: int | None) -> dict[str, Any]:
        return {} if lo is None else {"created": {"gte": lo}}

    async def intents(self, lo: int | None) -> list[dict[str, Any]]:
        """PaymentIntents created since ``lo`` (unix time; None: all)."""
        return await self._all(self.client.v1.payment_intents, self._since(lo))

    async def refunds(self, lo: int | None) -> list[dict[str, Any]]:
        return await self._all(self.client.v1.refunds, self._since(lo))

    async def event_times(self, lo: int) -> dict[str, int]:
        """The newest event since ``lo`` about each PaymentIntent (its own events and its
        charge's: refunds, disputes)."""
        out: dict[str, int] = {}
        for ev in await self._all(self.client.v1.events, self._since(lo)):
            if not str(ev.get("type", "")).startswith(PAYMENT_EVENTS):
                continue
            obj = (ev.get("data") or {}).get("object") or {}
            pi = (obj.get("id") if obj.get("object") == "payment_intent"
                  else obj.get("payment_intent"))
            if isinstance(pi, str):
                out[pi] = max(out.get(pi, 0), int(ev.get("created", 0)))
        return out

    async def intent(self, pi: str) -> dict[str, Any] | None:
        """The PaymentIntent, or None when Stripe has no such PaymentIntent."""
        try:
            return (await self._call(self.client.v1.payment_intents.retrieve_async(pi))).to_dict()
        except _NotFound:
            return None

    async def refunds_of(self, pi: str, intent: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Every refund of the PaymentIntent (none without a charge: nothing to refund)."""
        if intent is None or not intent.get("latest_charge"):
            return []
        return await self._all(self.client.v1.refunds, {"payment_intent": pi})

    async def refund_intent(self, refund: dict[str, Any]) -> str | None:
        """The PaymentIntent a refund is of (through its charge when the refund does not say)."""
        pi = refund.get("payment_intent")
        if isinstance(pi, str) and pi:
            return pi
        charge = refund.get("charge")
        charge_id = charge.get("id") if isinstance(charge, dict) else charge
        if not isinstance(charge_id, str):
            return None
        if charge_id not in self._charges:
            try:
                got = (await self._call(self.client.v1.charges.retrieve_async(charge_id))).to_dict()
            except _NotFound:
                got = {}
            value = got.get("payment_intent")
            self._charges[charge_id] = value if isinstance(value, str) else None
        return self._charges[charge_id]
