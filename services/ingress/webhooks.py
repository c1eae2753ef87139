"""Stripe's webhook deliveries, and the operators' view of them.

``POST /v1/webhooks/stripe`` checks the signature over the raw body, checks the event's shape,
publishes the raw body to ``stripe.events.<type>`` with the event id as ``Nats-Msg-Id``, and
answers 200 only after JetStream's PubAck: an event answered 2xx is kept. No database work here;
the webhook service applies the event. When the bus cannot take it, 503 with ``Retry-After``, and
Stripe delivers it again later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import msgspec
from aiohttp import web

from boxoffice import errors, tokens
from boxoffice.ingress.http import (
    CONFIG,
    REQUEST_ID,
    json_response,
    operate,
    read_json,
    read_query,
    require_admin,
)
from boxoffice.ingress.routing import ANY, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import stripe as w
from boxoffice.wire.subjects import stripe_event

log = logging.getLogger("boxoffice.ingress.webhooks")

REPLAY_TIMEOUT = 45.0  # one event's effects, Stripe's refund included
NDJSON = "application/x-ndjson"
TOLERANCE = 300  # seconds, either side of now (Stripe's default; a future stamp is as suspect)
MAX_SIGNATURES = 8

InvalidSignature = errors.define("InvalidSignature", "invalid_signature", 400,
                                 "Stripe signature verification failed")
InvalidEvent = errors.define("InvalidStripeEvent", "invalid_stripe_event", 400,
                             "Not a Stripe event")

routes = Routes()
EVENT_ID = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,255}$"}


class WebhookReceived(msgspec.Struct):
    received: bool
    id: str
    duplicate: bool


def setup(app: web.Application) -> None:
    routes.setup(app)


def verify_signature(body: bytes, header: str | None, secrets: tuple[str, ...],
                     now: float | None = None, tolerance: int = TOLERANCE) -> None:
    """Check ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]`` against every secret.

    HMAC-SHA256 over ``"<t>.<body>"``; every (secret, v1) pair is compared in constant time,
    without stopping at the first match, so timing tells nothing about which secret or which
    signature matched. Other schemes (v0) are ignored. Raises ``InvalidSignature``; its detail
    says what was wrong with the header, never anything about a secret.
    """
    if not header:
        raise InvalidSignature("the Stripe-Signature header is missing")
    timestamp: str | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1" and len(candidates) < MAX_SIGNATURES:
            candidates.append(value.encode())
    if (timestamp is None or not (timestamp.isascii() and timestamp.isdigit())
            or len(timestamp) > 12 or not candidates):
        raise InvalidSignature("the Stripe-Signature header is malformed")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance:
        raise InvalidSignature("the signature's timestamp is outside the tolerance")
    signed = timestamp.encode() + b"." + body
    matched = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
        matched |= tokens.match(expected, candidates) is not None
    if not matched:
        raise InvalidSignature("no signature matches")


def parse_event(body: bytes) -> w.StripeEvent:
    try:
        return msgspec.json.decode(body, type=w.StripeEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"not a Stripe event: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise errors.InvalidJSON("the body is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise errors.InvalidJSON("the body is nested too deeply") from None


@routes.post("/v1/webhooks/stripe", "A Stripe event (signed with the endpoint secret)", "stripe",
             w.StripeEvent, ok=(200, WebhookReceived),
             headers=(("Stripe-Signature", ANY, True),),
             tag="ingest")
async def stripe_webhook(request: web.Request) -> web.Response:
    body = await request.read()  # over the body limit: 413 from the middleware
    try:
        verify_signature(body, request.headers.get("Stripe-Signature"),
                         request.app[CONFIG].stripe_webhook_secrets)
    except errors.BoxofficeError as exc:
        log.warning("stripe webhook rejected: %s", exc.detail)
        raise
    event = parse_event(body)
    bus = request.app[BUS]
    if not bus.connected:  # fail fast: Stripe will deliver again
        raise errors.ServiceUnavailable("the event bus is unavailable", retry_after=5)
    fresh = await bus.publish(stripe_event(event.type), body, event.id, timeout=3.0)
    return json_response({"received": True, "id": event.id, "duplicate": not fresh})


@routes.get("/v1/admin/webhooks/events", "Stripe events received", "admin",
            query=w.ListEventsRequest, ok=(200, w.LoggedEvents))
async def list_events(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, w.ListEventsRequest)
    return json_response(await request.app[BUS].request(w.EVENTS_LIST, req, w.LoggedEvents))


def _event_id(request: web.Request) -> str:
    """The path's event id; one that Stripe could not have sent names no event (the same 404
    as an unknown one)."""
    event_id = request.match_info["event_id"]
    try:
        return msgspec.convert({"event_id": event_id}, w.ReplayRequest).event_id
    except msgspec.ValidationError:
        raise errors.WebhookEventNotFound(f"no webhook event {event_id[:64]!r}") from None


@routes.get("/v1/admin/webhooks/events/{event_id}",
            "A Stripe event: its payload (secrets filtered) and last error", "admin",
            ok=(200, w.LoggedEventDetail), path_params={"event_id": EVENT_ID})
async def get_event(request: web.Request) -> web.Response:
    """One event with its payload (secrets filtered) and its last error."""
    require_admin(request)
    req = w.GetEventRequest(event_id=_event_id(request))
    return json_response(await request.app[BUS].request(w.EVENTS_GET, req, w.LoggedEventDetail))


@routes.post("/v1/admin/webhooks/events/{event_id}/replay", "Apply a Stripe event again",
             "operate", ok=(200, w.ReplayResult), path_params={"event_id": EVENT_ID})
@operate
async def replay_event(request: web.Request) -> web.Response:
    require_admin(request)
    req = w.ReplayRequest(event_id=_event_id(request))
    result = await request.app[BUS].request(w.EVENTS_REPLAY, req, w.ReplayResult,
                                            timeout=REPLAY_TIMEOUT)
    return json_response(result)


@routes.post("/v1/admin/webhooks/replay",
             "Replay every event of a status (and type), oldest first: NDJSON, a ReplayProgress "
             "line per event and a last one with the totals", "operate", w.ReplayManyBody,
             ok=(200, NDJSON))
@operate
async def replay_matching(request: web.Request) -> web.StreamResponse:
    """Replay every event with a status (and type), oldest first, one after the other through
    the single replay; the answer is NDJSON, a ``ReplayProgress`` line per event as it is done
    and a last line with the totals, so that a client shows progress."""
    require_admin(request)
    body = await read_json(request, w.ReplayManyBody)
    bus = request.app[BUS]
    listed = await bus.request(w.EVENTS_LIST, w.ListEventsRequest(
        status=body.status, type=body.type, limit=body.limit), w.LoggedEvents)
    todo = [e.event_id for e in reversed(listed.events)]  # the list is newest first
    resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store",
                                       "X-Request-Id": request.get(REQUEST_ID, "")})
    await resp.prepare(request)
    succeeded = failed = 0
    for done, event_id in enumerate(todo, 1):
        line = w.ReplayProgress(done=done, total=len(todo), event_id=event_id)
        try:
            result = await bus.request(w.EVENTS_REPLAY, w.ReplayRequest(event_id=event_id),
                                       w.ReplayResult, timeout=REPLAY_TIMEOUT)
            line.outcome = result.outcome
        except errors.BoxofficeError as exc:  # e.g. applied meanwhile: said, and carry on
            line.outcome, line.code = "error", exc.code
        if line.outcome in ("failed", "error"):
            failed += 1
        else:
            succeeded += 1
        await resp.write(msgspec.json.encode(line) + b"\n")
    await resp.write(msgspec.json.encode(w.ReplayProgress(
        done=len(todo), total=len(todo), finished=True, succeeded=succeeded, failed=failed))
        + b"\n")
    await resp.write_eof()
    return resp


@routes.get("/v1/admin/webhooks/reconciliation", "Reconciliation with Stripe", "admin",
            query=w.ReconciliationRequest, ok=(200, w.Reconciliation))
async def reconciliation(request: web.Request) -> web.Response:
    """How far reconciliation with Stripe got and its last runs (answered by the webhook service)."""
    require_admin(request)
    req = read_query(request, w.ReconciliationRequest)
    return json_response(await request.app[BUS].request(w.RECONCILIATION, req, w.Reconciliation))
