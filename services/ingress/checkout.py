"""Checkout routes: holds (reservations) and PaymentIntents, forwarded to the payment service.

Ingress authenticates, validates the body, checks the ``Idempotency-Key`` header and computes the
request fingerprint; the payment service decides and stores. Stored answers come back as status
plus exact body and are written out unchanged (``Idempotent-Replayed: true`` on a replay).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from boxoffice import errors, idempotency
from boxoffice.ingress.http import PROBLEM, client_id, json_response, read_json, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import payments as pw
from boxoffice.wire import reservations as rw
from boxoffice.wire import subjects

routes = web.RouteTableDef()

# The payment service bounds its Stripe call at 8 s (retries included); wait a little longer.
INTENT_TIMEOUT = 10.0
HOLD_TIMEOUT = 5.0


def stored_response(stored: pw.StoredResponse) -> web.Response:
    headers = {idempotency.REPLAYED_HEADER: "true"} if stored.replayed else None
    content_type = PROBLEM if stored.status >= 400 else "application/json"
    return web.Response(status=stored.status, body=stored.body.encode(),
                        content_type=content_type, headers=headers)


@routes.post("/v1/reservations")
async def hold(request: web.Request) -> web.Response:
    cid = client_id(request)
    key = idempotency.check_key(request.headers.get(idempotency.HEADER), required=False)
    body = await read_json(request, rw.HoldBody)
    body.event_id = body.event_id.lower()
    req = rw.HoldRequest(client_id=cid, event_id=body.event_id, quantity=body.quantity,
                         customer_ref=body.customer_ref, idempotency_key=key,
                         fingerprint=idempotency.fingerprint("POST /v1/reservations", body)
                         if key else None)
    stored = await request.app[BUS].request(subjects.RESERVATIONS_HOLD, req, pw.StoredResponse,
                                            timeout=HOLD_TIMEOUT)
    return stored_response(stored)


@routes.get("/v1/reservations/{reservation_id}")
async def get_reservation(request: web.Request) -> web.Response:
    req = rw.GetRequest(client_id=client_id(request),
                        reservation_id=request.match_info["reservation_id"])
    return json_response(await request.app[BUS].request(subjects.RESERVATIONS_GET, req,
                                                        rw.Reservation))


@routes.post("/v1/reservations/{reservation_id}/cancel")
async def cancel_reservation(request: web.Request) -> web.Response:
    req = rw.CancelRequest(client_id=client_id(request),
                           reservation_id=request.match_info["reservation_id"])
    return json_response(await request.app[BUS].request(subjects.RESERVATIONS_CANCEL, req,
                                                        rw.Reservation))


@routes.post("/v1/payment_intents")
async def create_payment_intent(request: web.Request) -> web.Response:
    cid = client_id(request)
    key = idempotency.check_key(request.headers.get(idempotency.HEADER), required=True)
    assert key is not None
    body = await read_json(request, pw.IntentBody)
    body.reservation_id = body.reservation_id.lower()
    req = pw.CreateIntentRequest(client_id=cid, idempotency_key=key,
                                 reservation_id=body.reservation_id,
                                 fingerprint=idempotency.fingerprint("POST /v1/payment_intents",
                                                                     body))
    stored = await request.app[BUS].request(subjects.PAYMENTS_INTENTS_CREATE, req,
                                            pw.StoredResponse, timeout=INTENT_TIMEOUT)
    return stored_response(stored)


@routes.get("/v1/admin/payments")
async def list_payments(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        req = msgspec.convert(dict(request.query), pw.ListPayments, strict=False)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(f"query: {exc}") from None
    return json_response(await request.app[BUS].request(pw.ADMIN_PAYMENTS_LIST, req,
                                                        pw.PaymentLog))
