"""The published contracts: OpenAPI 3.1 for ingress's HTTP routes (``/openapi.json``, readable at
``/docs``) and AsyncAPI 3.0 for the bus (``/asyncapi.json``).

Every route is one ``Op`` below naming the wire types it reads and answers; their schemas come
from the msgspec Structs (``boxoffice.wire.schema``), so the document changes when the code does.
A test checks that every route of the router is here and everything here is a route.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from boxoffice import __version__ as version
from boxoffice import asyncapi
from boxoffice.ingress import console
from boxoffice.wire import admin, audit, payments, reaper, reservations, stripe
from boxoffice.wire import admin_actions as actions
from boxoffice.wire import errors as errw
from boxoffice.wire import sentry_items as si
from boxoffice.wire.schema import components, field_schemas

REF = "#/components/schemas/{name}"


# -- answers of ingress's own (not messages of any service) -------------------------------------
class Problem(msgspec.Struct):
    """Every error answer (RFC 9457, ``application/problem+json``)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str | None = None


class Health(msgspec.Struct):
    status: str
    service: str


class Readiness(msgspec.Struct):
    ready: bool
    checks: dict[str, bool]


class ReportAccepted(msgspec.Struct):
    id: str


class EnvelopeAccepted(msgspec.Struct):
    id: str | None = None


class WebhookReceived(msgspec.Struct):
    received: bool
    id: str
    duplicate: bool


@dataclass(frozen=True)
class Op:
    method: str
    path: str                      # as the router's canonical form
    summary: str
    auth: str | None = None        # "client", "admin" (read), "operate", "sentry", "stripe"
    body: Any = None               # a Struct, or a media type name for a raw body
    query: type[msgspec.Struct] | None = None
    ok: tuple[int, Any] = (200, None)
    headers: tuple[tuple[str, dict[str, Any], bool], ...] = ()  # (name, schema, required)
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_path: tuple[str, ...] = ()  # fields of ``query`` that the path gives
    tag: str = "operators"


UUID = {"type": "string", "format": "uuid"}
ANY = {"type": "string", "minLength": 1}
PROJECT = {"type": "string", "pattern": r"^[0-9]{1,18}$"}
IDEMPOTENCY_KEY = {"type": "string", "pattern": r"^[\x20-\x7e]{1,255}$"}

OPS: tuple[Op, ...] = (
    Op("GET", "/healthz", "Alive", ok=(200, Health), tag="health"),
    Op("GET", "/readyz", "NATS reachable (503 when not)", ok=(200, Readiness), tag="health"),
    Op("GET", "/openapi.json", "This document", ok=(200, "json"), tag="contract"),
    Op("GET", "/asyncapi.json", "The bus's contract (AsyncAPI 3.0)", ok=(200, "json"),
       tag="contract"),
    Op("GET", "/docs", "This document, readable", ok=(200, "html"), tag="contract"),
    # checkout (client token)
    Op("POST", "/v1/reservations", "Hold tickets for RESERVATION_TTL_SECONDS", "client",
       reservations.HoldBody, ok=(201, reservations.Reservation),
       headers=(("Idempotency-Key", IDEMPOTENCY_KEY, False),), tag="checkout"),
    Op("GET", "/v1/reservations/{reservation_id}", "A hold", "client",
       ok=(200, reservations.Reservation), path_params={"reservation_id": ANY}, tag="checkout"),
    Op("POST", "/v1/reservations/{reservation_id}/cancel", "Release a hold's tickets", "client",
       ok=(200, reservations.Reservation), path_params={"reservation_id": ANY}, tag="checkout"),
    Op("POST", "/v1/payment_intents", "A Stripe PaymentIntent for a hold", "client",
       payments.IntentBody, ok=(201, payments.PaymentIntent),
       headers=(("Idempotency-Key", IDEMPOTENCY_KEY, True),), tag="checkout"),
    # Stripe and error reports
    Op("POST", "/v1/webhooks/stripe", "A Stripe event (signed with the endpoint secret)",
       "stripe", stripe.StripeEvent, ok=(200, WebhookReceived),
       headers=(("Stripe-Signature", ANY, True),), tag="ingest"),
    Op("POST", "/v1/errors", "An error report", "client", errw.ErrorReport,
       ok=(202, ReportAccepted), tag="ingest"),
    Op("POST", "/api/{project_id}/envelope/", "Sentry envelope (the Sentry SDKs' protocol)",
       "sentry", "application/x-sentry-envelope", ok=(200, EnvelopeAccepted),
       path_params={"project_id": PROJECT}, tag="ingest"),
    Op("POST", "/api/{project_id}/store/", "Sentry event (the older SDKs' protocol)", "sentry",
       "object", ok=(200, EnvelopeAccepted), path_params={"project_id": PROJECT}, tag="ingest"),
    Op("POST", "/api/{project_id}/security/", "Browsers' Content-Security-Policy reports",
       "sentry", "application/csp-report", ok=(201, None), path_params={"project_id": PROJECT},
       tag="ingest"),
    Op("POST", "/api/0/projects/{organization}/{project}/user-feedback/",
       "Sentry's user-feedback endpoint (Authorization: DSN <dsn>)", "sentry", "object",
       ok=(200, "object"), path_params={"organization": ANY, "project": ANY}, tag="ingest"),
    Op("OPTIONS", "/api/{project_id}/{endpoint}/", "CORS preflight for browsers' SDKs",
       ok=(204, None), path_params={"project_id": PROJECT, "endpoint": {
           "type": "string", "enum": ["envelope", "store", "security"]}}, tag="ingest"),
    # the operators' console (its page and files are public; its data comes from the routes
    # below, with the session cookie standing for the token)
    Op("GET", "/console", "The operators' console (a page)", ok=(200, "html"), tag="console"),
    Op("GET", "/console/app.js", "The console's script", ok=(200, "text/javascript"),
       tag="console"),
    Op("GET", "/console/console.css", "The console's styles", ok=(200, "text/css"),
       tag="console"),
    Op("POST", "/console/session", "Sign in with an admin token: sets the session cookie",
       body=console.SignIn, ok=(201, console.SessionInfo), tag="console"),
    Op("GET", "/console/session", "The signed-in session (its CSRF token)", "session",
       ok=(200, console.SessionInfo), tag="console"),
    Op("DELETE", "/console/session", "Sign out (X-CSRF-Token required)", "session",
       ok=(204, None), tag="console"),
    # operators
    Op("GET", "/v1/admin/events", "Ticketed events and their inventory, newest first", "admin",
       query=admin.ListEvents, ok=(200, admin.TicketedEvents)),
    Op("POST", "/v1/admin/events", "Create a ticketed event", "operate", admin.CreateEvent,
       ok=(201, admin.TicketedEvent)),
    Op("GET", "/v1/admin/events/{event_id}", "A ticketed event's inventory", "admin",
       ok=(200, admin.TicketedEvent), path_params={"event_id": ANY}),
    Op("GET", "/v1/admin/payments", "The audit trail of PaymentIntent keys", "admin",
       query=payments.ListPayments, ok=(200, payments.PaymentLog)),
    Op("GET", "/v1/admin/reservations/stats", "Holds by status, overdue, next expiry", "admin",
       ok=(200, reaper.ReservationStats)),
    Op("POST", "/v1/admin/reservations/cleanup", "Expire every overdue hold now", "operate",
       reaper.CleanupRequest, ok=(200, reaper.CleanupResult)),
    Op("GET", "/v1/admin/reservations/expiry-lag", "How late holds were released, per minute",
       "admin", query=reaper.ExpiryLagRequest, ok=(200, reaper.ExpiryLag)),
    Op("GET", "/v1/admin/reaper/runs", "The reaper's runs", "admin", query=reaper.RunsRequest,
       ok=(200, reaper.ReaperRuns)),
    Op("GET", "/v1/admin/audit", "The operators' action log", "admin",
       query=actions.ListRequest, ok=(200, actions.Actions)),
    Op("GET", "/v1/admin/invariants", "The self-audit: last runs and open findings", "admin",
       query=audit.InvariantsRequest, ok=(200, audit.Invariants)),
    Op("POST", "/v1/admin/invariants/run", "Run every check of the self-audit now", "admin",
       audit.RunRequest, ok=(200, audit.Invariants)),
    Op("GET", "/v1/admin/webhooks/events", "Stripe events received", "admin",
       query=stripe.ListEventsRequest, ok=(200, stripe.LoggedEvents)),
    Op("GET", "/v1/admin/webhooks/events/{event_id}",
       "A Stripe event: its payload (secrets filtered) and last error", "admin",
       ok=(200, stripe.LoggedEventDetail),
       path_params={"event_id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,255}$"}}),
    Op("POST", "/v1/admin/webhooks/events/{event_id}/replay", "Apply a Stripe event again",
       "operate", ok=(200, stripe.ReplayResult),
       path_params={"event_id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,255}$"}}),
    Op("POST", "/v1/admin/webhooks/replay",
       "Replay every event of a status (and type), oldest first: NDJSON, a ReplayProgress line "
       "per event and a last one with the totals", "operate", stripe.ReplayManyBody,
       ok=(200, "application/x-ndjson")),
    Op("GET", "/v1/admin/webhooks/reconciliation", "Reconciliation with Stripe", "admin",
       query=stripe.ReconciliationRequest, ok=(200, stripe.Reconciliation)),
    Op("GET", "/v1/admin/errors", "Error groups", "admin", query=errw.ListGroups,
       ok=(200, errw.GroupList)),
    Op("GET", "/v1/admin/errors/dropped", "What Sentry SDKs and ingress dropped, by reason",
       "admin", query=si.ListDropped, ok=(200, si.DroppedList)),
    Op("GET", "/v1/admin/monitors", "Cron monitors: schedule, status, last and next check-in",
       "admin", query=si.ListMonitors, ok=(200, si.MonitorList)),
    Op("POST", "/v1/admin/monitors", "Create or change a cron monitor", "operate",
       si.SetMonitor, ok=(201, si.Monitor)),
    Op("GET", "/v1/admin/releases", "Release health: sessions, crash-free rates", "admin",
       query=si.ListReleases, ok=(200, si.ReleaseList)),
    Op("POST", "/v1/admin/releases/{release}/sourcemaps",
       "Upload a release's source map for one minified file (?name=URL or ~/path)", "operate",
       "application/json", ok=(201, si.SourceMapInfo), path_params={"release": ANY}),
    Op("GET", "/v1/admin/feedback", "Users' feedback sent through Sentry SDKs", "admin",
       query=si.ListFeedback, ok=(200, si.FeedbackList)),
    Op("GET", "/v1/admin/attachments/{attachment_id}", "An attachment, as a download", "admin",
       query=si.GetAttachment, from_path=("id",), ok=(200, "application/octet-stream"),
       path_params={"attachment_id": UUID}),
    Op("GET", "/v1/admin/errors/{group_id}", "An error group and its recent reports", "admin",
       query=errw.GetGroup, ok=(200, errw.GroupDetail), path_params={"group_id": UUID}),
    Op("POST", "/v1/admin/errors/{group_id}/{action}", "Resolve or ignore an error group",
       "operate", ok=(200, errw.ErrorGroup),
       path_params={"group_id": UUID, "action": {"type": "string",
                                                 "enum": ["resolve", "ignore"]}}),
)

# Routes left out of the document, each with the reason.
UNDOCUMENTED: dict[tuple[str, str], str] = {
    ("GET", "/console/stream"): "the console's live feed: an endless text/event-stream for the "
                                "page's session (no JSON answer to describe or to test)",
}

SECURITY = {
    "client": [{"clientToken": []}],
    "admin": [{"adminToken": []}, {"adminReadToken": []}, {"consoleSession": []}],
    "operate": [{"adminToken": []}, {"consoleSession": []}],
    "sentry": [{"sentryKey": []}],
    "session": [{"consoleSession": []}],
}
SCHEMES = {
    "clientToken": {"type": "http", "scheme": "bearer",
                    "description": "a client token (CLIENT_API_TOKENS)"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "an operate-scoped admin token (ADMIN_API_TOKENS)"},
    "adminReadToken": {"type": "http", "scheme": "bearer",
                       "description": "a read-scoped admin token (ADMIN_READ_API_TOKENS)"},
    "consoleSession": {"type": "apiKey", "in": "cookie", "name": "boxoffice_session",
                       "description": "the console's session (POST /console/session); an "
                                      "action also needs its X-CSRF-Token header"},
    "sentryKey": {"type": "apiKey", "in": "header", "name": "X-Sentry-Auth",
                  "description": "Sentry sentry_key=<SENTRY_INGEST_KEYS> (or ?sentry_key=, or "
                                 "the envelope's dsn)"},
}


def _media(kind: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if kind == "json":
        return {"application/json": {"schema": {"type": "object"}}}
    if kind == "object":
        return {"application/json": {"schema": {"type": "object"}}}
    if kind == "html":
        return {"text/html": {"schema": {"type": "string"}}}
    if kind == "application/octet-stream":
        return {kind: {"schema": {"type": "string", "format": "binary"}}}
    if isinstance(kind, str):  # a raw body: Sentry's envelope (text), a browser's CSP report
        return {kind: {"schema": {"type": "object" if kind.endswith("csp-report") else "string"}}}
    return {"application/json": {"schema": refs[kind]}}


def _operation(op: Op, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": schema}
        for name, schema in op.path_params.items()]
    if op.query is not None:
        for name, schema in field_schemas(op.query, REF).items():
            if name not in op.path_params and name not in op.from_path:
                params.append({"name": name, "in": "query", "required": False, "schema": schema})
    params += [{"name": name, "in": "header", "required": required, "schema": schema}
               for name, schema, required in op.headers]
    status, kind = op.ok
    problem = {"application/problem+json": {"schema": refs[Problem]}}
    responses: dict[str, Any] = {
        str(status): {"description": "done", **({"content": _media(kind, refs)} if kind else {})},
        "4XX": {"description": "refused (see code)", "content": problem},
    }
    if op.auth is not None or op.tag == "health":
        responses["503"] = {"description": "a service or the bus is unavailable; retry",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": problem if op.tag != "health" else
                            {"application/json": {"schema": refs[Readiness]}}}
    if op.auth in ("client", "admin", "operate"):
        responses["504"] = {"description": "the owning service did not answer in time; retry",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": problem}
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": f"{op.method.lower()} {op.path}", "responses": responses}
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body is not reaper.CleanupRequest,
                              "content": _media(op.body, refs)}
    if op.auth in SECURITY:
        out["security"] = SECURITY[op.auth]
    elif op.auth == "stripe":
        out["description"] = "Authenticated by its Stripe-Signature (STRIPE_WEBHOOK_SECRET)."
    return out


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ingress."""
    types = [Problem, Readiness]
    for op in OPS:
        for kind in (op.body, op.ok[1]):
            if isinstance(kind, type) and kind not in types:
                types.append(kind)
    schemas, named = components(types, REF)
    refs = dict(zip(types, schemas))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {"openapi": "3.1.0",
            "info": {"title": "boxoffice ingress", "version": version,
                     "description": "Tickets, payments, Stripe webhooks and error reports. "
                                    "Every error is application/problem+json with a stable "
                                    "code; a 503 or 504 carries Retry-After."},
            "paths": paths,
            "components": {"schemas": named, "securitySchemes": SCHEMES}}


def _docs_page(spec: dict[str, Any]) -> str:
    """The document as a plain HTML page (no script, nothing loaded from elsewhere)."""
    esc = html.escape
    rows = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = ", ".join(f"{p['name']} ({p['in']}{', required' if p['required'] else ''})"
                               for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {})
            body_ref = next(iter(body.values()), {}).get("schema", {}).get("$ref", "")
            auth = " or ".join(next(iter(s)) for s in op.get("security", [])) or "-"
            answers = ", ".join(
                f"{code}" + (f" {next(iter(r['content'].values()))['schema'].get('$ref', '')}"
                             .replace("#/components/schemas/", "")
                             if r.get("content") else "")
                for code, r in op["responses"].items())
            rows.append(f"<tr><td><code>{esc(method.upper())} {esc(path)}</code></td>"
                        f"<td>{esc(op['summary'])}</td><td>{esc(auth)}</td>"
                        f"<td>{esc(params)}</td>"
                        f"<td>{esc(body_ref.replace('#/components/schemas/', ''))}</td>"
                        f"<td>{esc(answers)}</td></tr>")
    schemas = "".join(f"<h3 id='{esc(name)}'>{esc(name)}</h3><pre>"
                      f"{esc(json.dumps(schema, indent=2))}</pre>"
                      for name, schema in spec["components"]["schemas"].items())
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(spec['info']['title'])} API</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .5em;"
            "vertical-align:top;text-align:left}pre{background:#f6f6f6;padding:.5em}"
            "</style></head><body>"
            f"<h1>{esc(spec['info']['title'])} {esc(spec['info']['version'])}</h1>"
            f"<p>{esc(spec['info']['description'])} Machine-readable: "
            "<a href='/openapi.json'>/openapi.json</a>; the bus: "
            "<a href='/asyncapi.json'>/asyncapi.json</a>.</p>"
            "<table><tr><th>route</th><th>what</th><th>token</th><th>parameters</th>"
            "<th>body</th><th>answers</th></tr>" + "".join(rows) + "</table>"
            "<h2>Schemas</h2>" + schemas + "</body></html>")


DOCUMENTS = web.AppKey("contract_documents", dict)


def setup(app: web.Application) -> None:
    """Serve the contracts (public: they hold nothing secret), computed once."""
    spec = openapi()
    app[DOCUMENTS] = {
        "openapi": json.dumps(spec).encode(),
        "asyncapi": json.dumps(asyncapi.document()).encode(),
        "docs": _docs_page(spec).encode(),
    }

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=request.app[DOCUMENTS]["openapi"],
                            content_type="application/json")

    async def asyncapi_json(request: web.Request) -> web.Response:
        return web.Response(body=request.app[DOCUMENTS]["asyncapi"],
                            content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(body=request.app[DOCUMENTS]["docs"], content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'none'; "
                                     "style-src 'unsafe-inline'"})

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/asyncapi.json", asyncapi_json)
    app.router.add_get("/docs", docs)
