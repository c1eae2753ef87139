"""Stripe's list endpoints as Stripe serves them, in front of the localstripe emulator.

localstripe lists PaymentIntents without the ``created`` filter (it answers 400) and lists every
object oldest first. Stripe (docs.stripe.com/api/pagination, /api/events/list,
/api/payment_intents/list) filters ``GET /v1/events`` and ``GET /v1/payment_intents`` on
``created[gt|gte|lt|lte]``, returns the newest first and pages with ``limit`` (1-100, default
10) and ``starting_after``. This proxy answers those two lists that way from everything
localstripe holds, and passes every other request to ``StripeKeysProxy`` (Stripe's
idempotency keys; stopping it is Stripe becoming unreachable).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.stripe_keys_proxy import Seen, StripeKeysProxy, stripe_error

LISTS = ("/v1/events", "/v1/payment_intents")
BOUNDS = {"gt": lambda c, v: c > v, "gte": lambda c, v: c >= v,
          "lt": lambda c, v: c < v, "lte": lambda c, v: c <= v}


class StripeListsProxy(StripeKeysProxy):
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET" or request.path not in LISTS:
            return await super()._handle(request)
        self.requests.append(Seen(request.method, request.path, None))
        query = request.query
        tests = []
        for name, value in query.items():
            if name.startswith("created[") and name.endswith("]") and name[8:-1] in BOUNDS:
                if not value.isdigit():
                    return stripe_error(400, "invalid_request_error", f"Invalid integer: {value}")
                tests.append((BOUNDS[name[8:-1]], int(value)))
            elif name == "type" and request.path == "/v1/events":
                tests.append((None, value))
            elif name not in ("limit", "starting_after"):
                return stripe_error(400, "invalid_request_error",
                                    f"Received unknown parameter: {name}")
        limit = int(query.get("limit", "10"))
        if not 1 <= limit <= 100:
            return stripe_error(400, "invalid_request_error", "limit must be between 1 and 100")
        everything = await self._everything(request)
        kept = [o for o in everything
                if all(o.get("type") == v if t is None else t(o["created"], v) for t, v in tests)]
        kept.reverse()  # localstripe keeps insertion order: newest last
        kept.sort(key=lambda o: o["created"], reverse=True)  # stable: ties stay newest first
        start = 0
        if after := query.get("starting_after"):
            ids = [o["id"] for o in kept]
            if after not in ids:
                return stripe_error(400, "invalid_request_error", f"No such object: '{after}'")
            start = ids.index(after) + 1
        page = kept[start:start + limit]
        return web.json_response({"object": "list", "url": request.path,
                                  "has_more": start + limit < len(kept), "data": page})

    async def _everything(self, request: web.Request) -> list[dict[str, Any]]:
        """Every object of the list from localstripe, page by page."""
        assert self._session is not None
        headers = {"Authorization": request.headers.get("Authorization", "")}
        out: list[dict[str, Any]] = []
        params = {"limit": "100"}
        while True:
            async with self._session.get(self.upstream + request.path, params=params,
                                         headers=headers) as resp:
                body = json.loads(await resp.read())
            out += body["data"]
            if not body.get("has_more") or not body["data"]:
                return out
            params["starting_after"] = body["data"][-1]["id"]
