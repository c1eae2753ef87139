"""The published contracts: OpenAPI 3.1 for ingress's HTTP routes (``/openapi.json``, readable at
``/docs``) and AsyncAPI 3.0 for the bus (``/asyncapi.json``).

Every route is one ``routing.Op`` naming the wire types it reads and answers, declared where the
route is registered (each domain's ``routes``, ``domains.ALL``); the few of ingress's own
(health, these documents) are below. Schemas come from the msgspec Structs
(``boxoffice.wire.schema``), so the document changes when the code does. A test checks that
every route of the router is here and everything here is a route.
"""

from __future__ import annotations

import html
import json
from typing import Any

import msgspec
from aiohttp import web

from boxoffice import __version__ as version
from boxoffice import asyncapi
from boxoffice.ingress import domains
from boxoffice.ingress.routing import Op, Routes
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


routes = Routes()  # these documents' own (below)
HEALTH: tuple[Op, ...] = (  # registered by ``runtime.add_health_routes``, as in every service
    Op("GET", "/healthz", "Alive", ok=(200, Health), tag="health"),
    Op("GET", "/readyz", "NATS reachable (503 when not)", ok=(200, Readiness), tag="health"),
)

# Routes left out of the document, each with the reason.
UNDOCUMENTED: dict[tuple[str, str], str] = {
    key: reason for domain in domains.ALL for key, reason in domain.routes.undocumented.items()}

SECURITY: dict[str, list[dict[str, list[str]]]] = {
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
        out["requestBody"] = {"required": op.body_required,
                              "content": _media(op.body, refs)}
    if op.auth in SECURITY:
        out["security"] = SECURITY[op.auth]
    elif op.auth == "stripe":
        out["description"] = "Authenticated by its Stripe-Signature (STRIPE_WEBHOOK_SECRET)."
    return out


def operations() -> list[Op]:
    """Every documented route of ingress: health, these documents, then each domain's."""
    return [*HEALTH, *routes.ops, *(op for domain in domains.ALL for op in domain.routes.ops)]


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ingress."""
    ops = operations()
    types: list[Any] = [Problem, Readiness]
    for op in ops:
        for kind in (op.body, op.ok[1]):
            if isinstance(kind, type) and kind not in types:
                types.append(kind)
    schemas, named = components(types, REF)
    refs = dict(zip(types, schemas))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
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
            body: dict[str, Any] = op.get("requestBody", {}).get("content", {})
            first: dict[str, Any] = next(iter(body.values()), {})
            body_ref = first.get("schema", {}).get("$ref", "")
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
    routes.setup(app)


@routes.get("/openapi.json", "This document", ok=(200, "json"), tag="contract")
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENTS]["openapi"], content_type="application/json")


@routes.get("/asyncapi.json", "The bus's contract (AsyncAPI 3.0)", ok=(200, "json"),
            tag="contract")
async def asyncapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENTS]["asyncapi"], content_type="application/json")


@routes.get("/docs", "This document, readable", ok=(200, "html"), tag="contract")
async def docs(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENTS]["docs"], content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'"})
