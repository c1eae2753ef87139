"""The published contracts: OpenAPI covers exactly ingress's routes, the AsyncAPI file in the
repository is the generated one, and Schemathesis finds no 5xx and no answer that breaks the
OpenAPI document on a live stack."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from boxoffice import asyncapi
from boxoffice.ingress import contract
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, SENTRY_KEY
from tests.hostile_support import ingress_routes

ROOT = Path(__file__).resolve().parent.parent
READ_TOKEN = "admin-read-token-contract-0000000"
EXAMPLES = 12  # per operation: about 30 operations run in well under a minute


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    routed = {(r.method, r.template) for r in ingress_routes()}
    documented = {(method.upper(), path) for path, ops in contract.openapi()["paths"].items()
                  for method in ops}
    left_out = set(contract.UNDOCUMENTED)
    assert left_out <= routed and not left_out & documented, "UNDOCUMENTED names a route wrongly"
    assert all(len(reason) > 20 for reason in contract.UNDOCUMENTED.values())
    assert routed - documented - left_out == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented routes that ingress does not have"


def test_openapi_schemas_come_from_the_wire_types() -> None:
    spec = contract.openapi()
    hold = spec["paths"]["/v1/reservations"]["post"]
    assert hold["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HoldBody"}
    body = spec["components"]["schemas"]["HoldBody"]
    assert body["properties"]["quantity"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert body["additionalProperties"] is False  # forbid_unknown_fields
    # regular expressions in ECMA-262's dialect, as JSON Schema reads them
    assert "\\Z" not in json.dumps(spec)


def test_asyncapi_in_the_repository_is_the_generated_one() -> None:
    kept = (ROOT / "libs/boxoffice/wire/asyncapi.json").read_text()
    assert kept == asyncapi.dumps(), (
        "run: .venv/bin/python -m boxoffice.asyncapi > libs/boxoffice/wire/asyncapi.json")
    doc = json.loads(kept)
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {"stripe.events.{type}", "errors.{service}.{level}", "reservations.events.{kind}",
            "payments.events.{kind}", "alerts.{level}", "audit.actions.begun",
            "reservations.hold", "payments.intents.create"} <= addresses
    # every message's payload resolves to a schema of the document
    for msg in doc["components"]["messages"].values():
        for ref in _refs(msg["payload"]):
            assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read()


def test_live_stack_keeps_its_openapi_contract(start_service, localstripe) -> None:
    start_service("payment", STRIPE_API_BASE=localstripe.url)
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    start_service("error_sink")
    start_service("reaper")
    ingress = start_service("ingress", ADMIN_READ_API_TOKENS=READ_TOKEN)

    status, ctype, body = _get(f"{ingress.url}/openapi.json")
    assert (status, ctype.split(";")[0]) == (200, "application/json")
    assert json.loads(body) == json.loads(json.dumps(contract.openapi()))
    status, _, body = _get(f"{ingress.url}/asyncapi.json")
    assert json.loads(body) == asyncapi.document()
    status, ctype, page = _get(f"{ingress.url}/docs")
    assert ctype.startswith("text/html") and b"POST /v1/payment_intents" in page
    assert b"<script" not in page and b"http" not in page.split(b"</h1>")[0]

    # the raw bodies of the Sentry routes: an envelope is text, a CSP report JSON
    schemathesis.serializer.alias("application/x-sentry-envelope", "text/plain")
    schemathesis.serializer.alias("application/csp-report", "application/json")
    schema = schemathesis.openapi.from_url(f"{ingress.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    operations = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        security = op.definition.raw.get("security", [])
        names = {next(iter(s)) for s in security}
        if "clientToken" in names:
            headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        elif "adminToken" in names:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        elif "sentryKey" in names:
            headers = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={SENTRY_KEY}"}
        else:
            headers = {}

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy())
        def run(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), **headers}
            try:
                resp = case.call_and_validate(base_url=ingress.url, checks=checks, timeout=15)
                statuses.setdefault(op.label, set()).add(resp.status_code)
            except AssertionError as exc:  # schemathesis's failures; keep the first of each op
                failures.append(f"{op.label}: {str(exc)[:1500]}")
                raise

        try:
            run()
        except AssertionError:
            pass  # recorded above; every operation still runs
        except Exception as exc:  # noqa: BLE001 - schemathesis's grouped failures
            failures.append(f"{op.label}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # valid requests got through to the services and were answered as documented
    succeeded = {label for label, seen in statuses.items() if any(s < 300 for s in seen)}
    assert {"GET /healthz", "GET /docs", "POST /v1/admin/events",
            "POST /v1/errors", "GET /v1/admin/reservations/stats", "GET /v1/admin/errors",
            "GET /v1/admin/webhooks/events", "GET /v1/admin/audit", "GET /v1/admin/reaper/runs",
            "GET /v1/admin/payments", "GET /v1/admin/invariants",
            "POST /v1/admin/reservations/cleanup"} <= succeeded, sorted(statuses.items())
    # every operation ran (schemathesis leaves out the route that serves the document itself,
    # fetched above)
    assert operations == sum(len(ops) for ops in contract.openapi()["paths"].values()) - 1
    assert time.monotonic() - started < 120
    # every service is still ready afterwards
    assert _get(f"{ingress.url}/readyz")[0] == 200


@pytest.fixture(autouse=True)
def _no_hypothesis_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # hypothesis keeps nothing in the repository (database=None too)
