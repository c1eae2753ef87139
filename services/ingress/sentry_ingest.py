"""The Sentry protocol, so that an unmodified Sentry SDK whose DSN is
``http(s)://<public key>@<ingress>/<project id>`` reports here.

- ``POST /api/{project_id}/envelope/``: the envelope protocol. Any numeric project id is accepted
  (it is kept in the report's context); the public key, from ``X-Sentry-Auth``, the
  ``sentry_key`` query parameter or the envelope's ``dsn``, must be one of
  ``SENTRY_INGEST_KEYS`` (403 otherwise). gzip, deflate and br bodies (decoded by aiohttp; br
  through the pinned Brotli package), size limits applied after decoding; CORS for browsers.
- ``POST /api/{project_id}/store/``: the legacy single-event endpoint of older SDKs;
  ``POST /api/{project_id}/security/``: browsers' CSP violation reports (``report-uri`` with
  ``?sentry_key=``), stored as warnings. ``SENTRY_PROJECTS`` names the service of a project's
  events (else the event's ``service`` tag, else ``sentry-<platform>``).
- ``POST /api/0/projects/{organization}/{project}/user-feedback/``: users' feedback, with the
  DSN as its credential.
- Rate limited per public key, each category its own budget, with the client reports' limiter
  (``error_reports``): 429, ``Retry-After`` and Sentry's ``X-Sentry-Rate-Limits``.

The envelope's parsing is ``sentry_envelope``, its items' ``sentry_items``; the operators' routes
for what arrives are ``sentry_admin`` and ``error_groups``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import uuid
import zlib
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from boxoffice import errors, scrub, tokens, wire
from boxoffice.config import Config
from boxoffice.ingress import csp, sentry_envelope, sentry_items
from boxoffice.ingress.error_reports import LIMITER, limit, publish
from boxoffice.ingress.http import CONFIG, REQUEST_ID, json_response, problem_response
from boxoffice.ingress.routing import ANY, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import sentry_items as si

QUOTA = web.AppKey("attachment_quota", sentry_items.AttachmentQuota)
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, X-Sentry-Auth, Authorization",
        "Access-Control-Expose-Headers": "Retry-After, X-Sentry-Rate-Limits",
        "Access-Control-Max-Age": "86400"}
routes = Routes()
PROJECT = {"type": "string", "pattern": r"^[0-9]{1,18}$"}


class EnvelopeAccepted(msgspec.Struct):
    id: str | None = None


def _client_payload_errors_are_warnings(record: logging.LogRecord) -> bool:
    # aiohttp logs "Unhandled exception" at ERROR when it drains a body that cannot be read
    # (say broken gzip) after the handler answered 400: the client's fault, not an error here.
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def setup(app: web.Application) -> None:
    """The Sentry routes and the attachments' daily quota; the rate limiter is the client
    reports' (``error_reports.setup``, called first)."""
    app[QUOTA] = sentry_items.AttachmentQuota()
    logging.getLogger("aiohttp.server").addFilter(_client_payload_errors_are_warnings)
    routes.setup(app)


def _key_from_auth(header: str) -> str | None:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "sentry":
        return None
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip() == "sentry_key":
            return value.strip() or None
    return None


def _key_from_dsn(header: dict) -> str | None:
    dsn = header.get("dsn")
    if not isinstance(dsn, str):
        return None
    try:
        return urlsplit(dsn).username
    except ValueError:
        return None


def _check_key(cfg: Config, key: str | None) -> str:
    found = None if key is None else tokens.match(key, cfg.sentry_ingest_keys)
    if found is None:
        raise errors.Forbidden("a valid Sentry public key is required (X-Sentry-Auth or sentry_key)")
    return found


async def _read_body(request: web.Request) -> bytes:
    """The (decompressed) body, refused past ``MAX_ENVELOPE`` bytes before or after inflating."""
    limit = sentry_envelope.MAX_ENVELOPE
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"an envelope may not exceed {limit} bytes")
    chunks, size = [], 0
    try:
        while chunk := await request.content.read(1 << 16):
            size += len(chunk)
            if size > limit:
                raise errors.PayloadTooLarge(f"an envelope may not exceed {limit} bytes")
            chunks.append(chunk)
    except (HttpProcessingError, RequestPayloadError):
        raise errors.BadRequest("the body could not be read or decompressed") from None
    return b"".join(chunks)


def _request_key(request: web.Request) -> str | None:
    """The public key a request names (checked), or None when it names none."""
    key = (_key_from_auth(request.headers.get("X-Sentry-Auth", ""))
           or request.query.get("sentry_key"))
    if key is not None:
        _check_key(request.app[CONFIG], key)
    return key


def _project_service(request: web.Request) -> str | None:
    """The service ``SENTRY_PROJECTS`` names for the request's project, if any."""
    pid = str(int(request.match_info["project_id"]))
    return dict(request.app[CONFIG].sentry_projects).get(pid)


async def _parse_envelope(request: web.Request) -> sentry_envelope.Parser:
    """Read the (decompressed) body into a ``Parser`` chunk by chunk, so an attachment over its
    limit is skipped, not held; at most ``MAX_WIRE`` bytes are read."""
    if request.content_length is not None and request.content_length > sentry_envelope.MAX_WIRE:
        raise errors.PayloadTooLarge(f"an envelope may not exceed {sentry_envelope.MAX_WIRE} bytes")
    parser, size = sentry_envelope.Parser(sentry_items.MAX_ATTACHMENT), 0
    try:
        while chunk := await request.content.read(1 << 16):
            size += len(chunk)
            if size > sentry_envelope.MAX_WIRE:
                raise errors.PayloadTooLarge(f"an envelope may not exceed {sentry_envelope.MAX_WIRE} bytes")
            parser.feed(chunk)
    except (HttpProcessingError, RequestPayloadError):
        raise errors.BadRequest("the body could not be read or decompressed") from None
    return parser


def _rate_limits(limited: dict[str, float]) -> str:
    """``X-Sentry-Rate-Limits``: the categories over their budget, then those never kept."""
    parts = [f"{max(1, math.ceil(wait))}:{cat}:key" for cat, wait in sorted(limited.items())]
    return ", ".join([*parts, sentry_items.REFUSED_HEADER])


async def _envelope(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    key = _request_key(request)
    header, items, dropped = (await _parse_envelope(request)).finish()
    if key is None:  # browsers through a tunnel: the key is in the envelope's dsn
        key = _check_key(cfg, _key_from_dsn(header))
    project_id = request.match_info["project_id"]
    sorted_ = sentry_items.sort(items, dropped)
    limited: dict[str, float] = {}
    for category in sentry_items.KEPT:  # each category its own budget
        n = sorted_.count(category)
        if n and (wait := request.app[LIMITER].take(f"sentry:{key}:{category}", n)):
            limited[category] = wait
            sorted_.drop("ratelimit", category, n)
    service = _project_service(request)
    reports = []
    for i, event in enumerate([] if "error" in limited else sorted_.events):
        fallback = header.get("event_id") if i == 0 and isinstance(header.get("event_id"), str) else None
        reports.append(sentry_envelope.to_report(event, project_id=project_id, fallback_id=fallback,
                                          service=service))
    item_service = reports[0].service if reports else service or "sentry"
    event_id = reports[0].id if reports else None
    if event_id is None and isinstance(header.get("event_id"), str):
        event_id = sentry_items._uuid(header["event_id"])
    published: list[tuple[str, object, str]] = []
    notes = [{"filename": d.filename, "size": d.size, "reason": "too_large"}
             for d in dropped if d.kind == "attachment"]
    for item in [] if "attachment" in limited else sorted_.attachments:
        if not request.app[QUOTA].take(key, len(item.payload)):
            sorted_.drop("quota", "attachment")
            notes.append({"filename": item.header.get("filename"), "size": len(item.payload),
                          "reason": "daily_quota"})
            continue
        a = sentry_items.attachment(item, service=item_service, project_id=project_id,
                                    event_id=event_id)
        published.append((si.subject(si.ATTACHMENT), a, a.id))
    if notes and reports:  # the error is kept; its note says what did not come with it
        reports[0].context = {**(reports[0].context or {}),
                              "attachments_dropped": scrub.clean(notes, 256, 20)}
    for kind, body in [] if "feedback" in limited else sorted_.feedback:
        fb = sentry_items.feedback(kind, body, service=service or item_service, project_id=project_id)
        if fb is not None and fb.email and cfg.sentry_feedback_email == "filter":
            fb = msgspec.structs.replace(fb, email=scrub.FILTERED)
        if fb is not None:
            published.append((si.subject(si.FEEDBACK), fb, fb.id))
    for body in [] if "monitor" in limited else sorted_.check_ins:
        if (ci := sentry_items.check_in(body, service=service or item_service,
                                        project_id=project_id)) is not None:
            # an in_progress check-in and its end share the check-in's id: not the message's
            published.append((si.subject(si.CHECK_IN), ci, f"{ci.id}:{ci.status}"))
        else:
            sorted_.drop("invalid", "monitor")
    counts = [c for kind, body in ([] if "session" in limited else sorted_.sessions)
              for c in sentry_items.sessions(kind, body)]
    if counts:
        ss = si.Sessions(id=str(uuid.uuid4()), service=service or item_service,
                         project_id=project_id, sessions=counts)
        published.append((si.subject(si.SESSIONS), ss, ss.id))
    for report in sorted_.client_reports:
        if found := sentry_items.client_discards(report):
            d = si.Discards(id=str(uuid.uuid4()), service=item_service, project_id=project_id,
                            origin="client", discarded=found)
            published.append((si.subject(si.DISCARDS), d, d.id))
    kept = len(reports) + len(published) + len(sorted_.client_reports)
    if sorted_.discarded:
        d = si.Discards(id=str(uuid.uuid4()), service=item_service, project_id=project_id,
                        origin="server", discarded=[si.Discarded(reason=r, category=c, quantity=n)
                                                    for (r, c), n in sorted_.discarded.items()])
        published.append((si.subject(si.DISCARDS), d, d.id))
    bus = request.app[BUS]
    await asyncio.gather(*(publish(request, r) for r in reports),
                         *(bus.publish(subject, wire.encode(body), msg_id)
                           for subject, body, msg_id in published))
    if limited and not kept:
        wait = max(1, math.ceil(max(limited.values())))
        resp = problem_response(errors.RateLimited(
            f"more than {cfg.error_rate_limit_per_minute} items a minute of "
            f"{', '.join(sorted(limited))} from this key", retry_after=wait), request.get(REQUEST_ID))
        resp.headers["X-Sentry-Rate-Limits"] = _rate_limits(limited)
        return resp
    resp = json_response({"id": reports[0].id.replace("-", "")} if reports else {})
    resp.headers["X-Sentry-Rate-Limits"] = _rate_limits(limited)
    return resp


async def _store(request: web.Request) -> web.Response:
    """The legacy single-event endpoint: the body is the event (JSON, or older SDKs'
    base64 of zlib-compressed JSON)."""
    key = _request_key(request)
    if key is None:
        raise errors.Forbidden("a valid Sentry public key is required (X-Sentry-Auth or sentry_key)")
    body = await _read_body(request)
    if len(body) > sentry_envelope.MAX_EVENT:
        raise sentry_envelope.EventTooLarge(f"an event is larger than {sentry_envelope.MAX_EVENT} bytes")
    if body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        try:
            body = zlib.decompressobj().decompress(base64.b64decode(body), sentry_envelope.MAX_EVENT + 1)
        except (binascii.Error, zlib.error, ValueError):
            raise sentry_envelope.InvalidEnvelope("the event is neither JSON nor base64 zlib JSON") from None
        if len(body) > sentry_envelope.MAX_EVENT:
            raise sentry_envelope.EventTooLarge(f"an event is larger than {sentry_envelope.MAX_EVENT} bytes")
    event = sentry_envelope.json_object(body, "the event")
    limit(request, f"sentry:{key}:error")
    report = sentry_envelope.to_report(event, project_id=request.match_info["project_id"],
                                fallback_id=None, service=_project_service(request))
    await publish(request, report)
    return json_response({"id": report.id.replace("-", "")})


async def _security(request: web.Request) -> web.Response:
    key = _request_key(request)
    if key is None:
        raise errors.Forbidden("a valid Sentry public key is required (sentry_key)")
    body = await _read_body(request)
    if len(body) > sentry_envelope.MAX_EVENT:
        raise sentry_envelope.EventTooLarge(f"a report is larger than {sentry_envelope.MAX_EVENT} bytes")
    try:
        parsed = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise sentry_envelope.InvalidEnvelope("a security report must be JSON") from None
    reports = csp.to_reports(parsed, project_id=request.match_info["project_id"],
                             service=_project_service(request))
    limit(request, f"sentry:{key}:error", len(reports))
    await asyncio.gather(*(publish(request, r) for r in reports))
    return web.Response(status=201)


async def _user_feedback(request: web.Request) -> web.Response:
    """Sentry's user-feedback endpoint, authenticated by the DSN itself
    (``Authorization: DSN <dsn>``), as the SDKs' crash-report widgets call it."""
    scheme, _, dsn = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "dsn":
        raise errors.Forbidden("Authorization: DSN <dsn> is required")
    try:
        parts = urlsplit(dsn.strip())
        key, project_id = parts.username, parts.path.rstrip("/").rsplit("/", 1)[-1]
    except ValueError:
        key = project_id = None
    key = _check_key(request.app[CONFIG], key)
    if not project_id or not project_id.isdigit() or len(project_id) > 18:
        raise errors.Forbidden("the DSN names no project")
    body = await _read_body(request)
    report = sentry_envelope.json_object(body, "the feedback")
    limit(request, f"sentry:{key}:feedback")
    service = dict(request.app[CONFIG].sentry_projects).get(str(int(project_id))) or "sentry"
    fb = sentry_items.feedback("user_report", report, service=service, project_id=str(int(project_id)))
    if fb is None or fb.event_id is None:
        raise errors.ValidationFailed("event_id and comments are required")
    fb = msgspec.structs.replace(fb, source="endpoint")
    if fb.email and request.app[CONFIG].sentry_feedback_email == "filter":
        fb = msgspec.structs.replace(fb, email=scrub.FILTERED)
    await request.app[BUS].publish(si.subject(si.FEEDBACK), wire.encode(fb), fb.id)
    return json_response({"id": fb.id, "event_id": fb.event_id.replace("-", ""), "name": fb.name,
                          "email": fb.email, "comments": fb.message})


@routes.post(r"/api/0/projects/{organization}/{project}/user-feedback/",
             "Sentry's user-feedback endpoint (Authorization: DSN <dsn>)", "sentry", "object",
             ok=(200, "object"), path_params={"organization": ANY, "project": ANY}, tag="ingest")
async def post_user_feedback(request: web.Request) -> web.Response:
    return await _answer(request, _user_feedback)


async def _answer(request: web.Request, handler) -> web.Response:
    try:
        resp = await handler(request)
    except errors.BoxofficeError as exc:  # answered here so that browsers see CORS headers
        resp = problem_response(exc, request.get(REQUEST_ID))
        if exc.status == 429:
            resp.headers["X-Sentry-Rate-Limits"] = f"{resp.headers.get('Retry-After', '60')}:error:key"
    resp.headers.update(CORS)
    return resp


@routes.post(r"/api/{project_id:\d{1,18}}/envelope/",
             "Sentry envelope (the Sentry SDKs' protocol)", "sentry",
             "application/x-sentry-envelope", ok=(200, EnvelopeAccepted),
             path_params={"project_id": PROJECT}, tag="ingest")
async def post_envelope(request: web.Request) -> web.Response:
    return await _answer(request, _envelope)


@routes.post(r"/api/{project_id:\d{1,18}}/store/", "Sentry event (the older SDKs' protocol)",
             "sentry", "object", ok=(200, EnvelopeAccepted), path_params={"project_id": PROJECT},
             tag="ingest")
async def post_store(request: web.Request) -> web.Response:
    return await _answer(request, _store)


@routes.post(r"/api/{project_id:\d{1,18}}/security/",
             "Browsers' Content-Security-Policy reports", "sentry", "application/csp-report",
             ok=(201, None), path_params={"project_id": PROJECT}, tag="ingest")
async def post_security(request: web.Request) -> web.Response:
    return await _answer(request, _security)


@routes.options(r"/api/{project_id:\d{1,18}}/{endpoint:envelope|store|security}/",
                "CORS preflight for browsers' SDKs", ok=(204, None),
                path_params={"project_id": PROJECT, "endpoint": {
                    "type": "string", "enum": ["envelope", "store", "security"]}}, tag="ingest")
async def envelope_preflight(_: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS)
