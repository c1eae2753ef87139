"""Checkout routes: holds (reservations) and PaymentIntents, forwarded to the payment service.

Ingress authenticates, validates the body, checks the ``Idempotency-Key`` header and computes the
request fingerprint; the payment service decides and stores. Stored answers come back as status
plus exact body and are written out unchanged (``Idempotent-Replayed: true`` on a replay).

A stored answer never changes once it exists, so ingress keeps the ones it has seen for a minute
(``ReplayCache``): a client retrying a finished request in a loop is answered without a round trip
to the payment service. The entries live far shorter than the keys themselves (kept at least
``IDEMPOTENCY_KEY_TTL_HOURS``), so the cache never answers for a key the database has forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from aiohttp import web

from boxoffice import idempotency
from boxoffice.ingress.http import PROBLEM, client_id, json_response, read_json, read_query, require_admin
from boxoffice.ingress.routing import ANY, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import payments as pw
from boxoffice.wire import reservations as rw
from boxoffice.wire import subjects

routes = Routes()
IDEMPOTENCY_KEY = {"type": "string", "pattern": r"^[\x20-\x7e]{1,255}$"}


class ReplayCache:
    """Finished answers of idempotency keys seen by this process: bounded in size and age."""

    def __init__(self, ttl: float = 60.0, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, str, pw.StoredResponse]] = \
            OrderedDict()

    def get(self, scope: tuple[str, str, str], fingerprint: str) -> pw.StoredResponse | None:
        entry = self._entries.get(scope)
        if entry is None:
            return None
        expires, stored_fingerprint, stored = entry
        if expires < time.monotonic():
            del self._entries[scope]
            return None
        if stored_fingerprint != fingerprint:
            raise idempotency.IdempotencyKeyMismatch(
                "this Idempotency-Key was used with another request; use a new key")
        return pw.StoredResponse(status=stored.status, body=stored.body, replayed=True)

    def put(self, scope: tuple[str, str, str], fingerprint: str, stored: pw.StoredResponse) -> None:
        self._entries[scope] = (time.monotonic() + self.ttl, fingerprint, stored)
        self._entries.move_to_end(scope)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


REPLAYS = web.AppKey("replays", ReplayCache)


def setup(app: web.Application) -> None:
    """Add the checkout routes and their replay cache to ingress's app."""
    app[REPLAYS] = ReplayCache()
    routes.setup(app)


async def forward(request: web.Request, subject: str,
                  req: rw.HoldRequest | pw.CreateIntentRequest, timeout: float) -> web.Response:
    """Send a keyed (or unkeyed) request to the payment service, or answer from the cache."""
    key, fingerprint = req.idempotency_key, req.fingerprint
    scope = (subject, req.client_id, key or "")
    if key is not None and fingerprint is not None:
        cached = request.app[REPLAYS].get(scope, fingerprint)
        if cached is not None:
            return stored_response(cached)
    stored = await request.app[BUS].request(subject, req, pw.StoredResponse, timeout=timeout)
    if key is not None and fingerprint is not None:
        request.app[REPLAYS].put(scope, fingerprint, stored)
    return stored_response(stored)

# The payment service bounds its Stripe call at 8 s (retries included); wait a little longer.
INTENT_TIMEOUT = 10.0
HOLD_TIMEOUT = 5.0


def stored_response(stored: pw.StoredResponse) -> web.Response:
    headers = {idempotency.REPLAYED_HEADER: "true"} if stored.replayed else None
    content_type = PROBLEM if stored.status >= 400 else "application/json"
    return web.Response(status=stored.status, body=stored.body.encode(),
                        content_type=content_type, headers=headers)


def idempotency_header(request: web.Request) -> str | None:
    values = request.headers.getall(idempotency.HEADER, [])
    if len(values) > 1:  # which one did the client mean? neither is safe to pick
        raise idempotency.IdempotencyKeyInvalid(f"send one {idempotency.HEADER} header")
    return values[0] if values else None


@routes.at(rw.HOLD_ROUTE, "Hold tickets for RESERVATION_TTL_SECONDS", "client", rw.HoldBody,
           ok=(201, rw.Reservation), headers=(("Idempotency-Key", IDEMPOTENCY_KEY, False),),
           tag="checkout")
async def hold(request: web.Request) -> web.Response:
    cid = client_id(request)
    key = idempotency.check_key(idempotency_header(request), required=False)
    body = await read_json(request, rw.HoldBody)
    body.event_id = body.event_id.lower()
    req = rw.HoldRequest(client_id=cid, event_id=body.event_id, quantity=body.quantity,
                         customer_ref=body.customer_ref, idempotency_key=key,
                         fingerprint=idempotency.fingerprint(rw.HOLD_ROUTE, body)
                         if key else None)
    return await forward(request, subjects.RESERVATIONS_HOLD, req, HOLD_TIMEOUT)


@routes.get("/v1/reservations/{reservation_id}", "A hold", "client", ok=(200, rw.Reservation),
            path_params={"reservation_id": ANY}, tag="checkout")
async def get_reservation(request: web.Request) -> web.Response:
    req = rw.GetRequest(client_id=client_id(request),
                        reservation_id=request.match_info["reservation_id"])
    return json_response(await request.app[BUS].request(subjects.RESERVATIONS_GET, req,
                                                        rw.Reservation))


@routes.post("/v1/reservations/{reservation_id}/cancel", "Release a hold's tickets", "client",
             ok=(200, rw.Reservation), path_params={"reservation_id": ANY}, tag="checkout")
async def cancel_reservation(request: web.Request) -> web.Response:
    req = rw.CancelRequest(client_id=client_id(request),
                           reservation_id=request.match_info["reservation_id"])
    return json_response(await request.app[BUS].request(subjects.RESERVATIONS_CANCEL, req,
                                                        rw.Reservation))


@routes.at(pw.CREATE_INTENT_ROUTE, "A Stripe PaymentIntent for a hold", "client", pw.IntentBody,
           ok=(201, pw.PaymentIntent), headers=(("Idempotency-Key", IDEMPOTENCY_KEY, True),),
           tag="checkout")
async def create_payment_intent(request: web.Request) -> web.Response:
    cid = client_id(request)
    key = idempotency.check_key(idempotency_header(request), required=True)
    assert key is not None
    body = await read_json(request, pw.IntentBody)
    body.reservation_id = body.reservation_id.lower()
    req = pw.CreateIntentRequest(client_id=cid, idempotency_key=key,
                                 reservation_id=body.reservation_id,
                                 fingerprint=idempotency.fingerprint(pw.CREATE_INTENT_ROUTE, body))
    return await forward(request, subjects.PAYMENTS_INTENTS_CREATE, req, INTENT_TIMEOUT)


@routes.get("/v1/admin/payments", "The audit trail of PaymentIntent keys", "admin",
            query=pw.ListPayments, ok=(200, pw.PaymentLog))
async def list_payments(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, pw.ListPayments)
    return json_response(await request.app[BUS].request(pw.ADMIN_PAYMENTS_LIST, req,
                                                        pw.PaymentLog))
