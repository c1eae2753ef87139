"""Error ingest at ingress (POST /v1/errors and the Sentry envelope protocol) and the
operators' error routes, against real ingress and error-sink processes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid

import brotli
import nats

from boxoffice import scrub
from tests.errors_support import AUTH, ahttp, browser_event, count, envelope, report
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, CLIENT_TOKEN_2, SENTRY_KEY, eventually

SDK_SCRIPT = """
import sys, sentry_sdk
sentry_sdk.init(dsn=sys.argv[1], release="shop@1.2.3", environment="production")

def checkout(order_id):
    raise ValueError(f"card 4242424242424242 declined for order {order_id}")

try:
    checkout(42)
except ValueError:
    event_id = sentry_sdk.capture_exception()
sentry_sdk.flush(timeout=10)
print(event_id)
"""


async def _stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return (await nc.jetstream().stream_info("ERRORS")).state.messages
    finally:
        await nc.close()


async def test_an_unmodified_sentry_sdk_reports_through_ingress(db, start_service, tmp_path) -> None:
    ingress = start_service("ingress")
    start_service("error_sink")
    dsn = f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/1"
    (tmp_path / "shop.py").write_text(SDK_SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "shop.py"), dsn], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("SENTRY")})
    event_id = out.stdout.strip().splitlines()[-1]
    assert len(event_id) == 32, out.stderr
    rid = str(uuid.UUID(event_id))
    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_logs WHERE id = $1::uuid", rid))
    assert row["error_type"] == "ValueError" and row["severity"] == "error"
    assert row["service"] == "sentry-python" and row["release"] == "shop@1.2.3"
    assert "checkout" in row["stacktrace"] and "4242424242424242" not in row["error_message"]
    assert "[Filtered]" in row["error_message"]
    assert row["context"]["sentry"]["project_id"] == "1"
    group = await db.fetchrow("SELECT * FROM error_groups WHERE id = $1", row["group_id"])
    assert group["count"] == 1 and group["fingerprint"][0] == "ValueError"
    assert any(f.endswith(":checkout") for f in group["fingerprint"])

    # a browser: key in the query string, text/plain body, an Origin; a second envelope
    event = browser_event()
    status, headers, body = await ahttp(
        "POST", f"{ingress.url}/api/7/envelope/?sentry_key={SENTRY_KEY}&sentry_version=7",
        envelope(({"type": "event"}, json.dumps(event).encode()),
                 ({"type": "client_report"}, b'{"discarded_events": []}')),
        {"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://shop.example"})
    assert status == 200, body
    assert json.loads(body) == {"id": event["event_id"]}
    assert headers["Access-Control-Allow-Origin"] == "*"
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event["event_id"]))))
    assert row["service"] == "checkout-web" and row["error_message"] == "TypeError: cart is undefined"
    assert "s3cr3tvalue" not in json.dumps(row["context"]) and "bob@example.com" not in json.dumps(row["context"])
    assert row["context"]["user"] == {"id": "u-1"}
    group = await db.fetchrow("SELECT fingerprint FROM error_groups WHERE id = $1", row["group_id"])
    assert group["fingerprint"] == ["TypeError", "static/cart.js:addToCart"]


async def test_envelopes_with_bad_input_change_nothing(nats_url, start_service) -> None:
    ingress = start_service("ingress", MAX_BODY_BYTES="65536")
    url = f"{ingress.url}/api/1/envelope/"
    good = envelope(({"type": "event"}, json.dumps(browser_event()).encode()))

    async def post(body: bytes, headers: dict | None = None, target: str = url):
        status, hdrs, raw = await ahttp("POST", target, body, {**AUTH, **(headers or {})})
        return status, hdrs, (json.loads(raw) if raw else None)

    cases = [
        ({}, {"X-Sentry-Auth": "Sentry sentry_key=wrongwrongwrong, sentry_version=7"}, good, 403, "forbidden"),
        ({}, {"X-Sentry-Auth": ""}, good, 403, "forbidden"),
        ({}, {}, b"{not json\n", 400, "invalid_envelope"),
        ({}, {}, b'{}\n{"type": "event", "length": 500}\n{"a": 1}\n', 400, "invalid_envelope"),
        ({}, {}, b'{}\n{"length": 2}\n{}\n', 400, "invalid_envelope"),
        ({}, {}, envelope(({"type": "event"}, b"[1, 2]")), 400, "invalid_envelope"),
        ({}, {}, envelope(({"type": "event"}, b"{bad json")), 400, "invalid_envelope"),
        ({}, {}, envelope(({"type": "event"}, b'{"pad": "' + b"x" * (1 << 20) + b'"}')), 413, "event_too_large"),
        ({}, {"Content-Encoding": "gzip"}, gzip.compress(b"\n" * (21 << 20)), 413, "payload_too_large"),
        ({}, {"Content-Encoding": "gzip"}, b"\x1f\x8b\x08\x00broken-gzip", 400, "bad_request"),
        ({}, {"Content-Encoding": "br"}, brotli.compress(b"\n" * (21 << 20)), 413, "payload_too_large"),
        ({}, {"Content-Encoding": "br"}, b"\x00\x01broken-br", 400, "bad_request"),
    ]
    for _, headers, body, want, code in cases:
        status, hdrs, problem = await post(body, headers)
        assert (status, problem["code"]) == (want, code), (headers, body[:60], status, problem)
        assert hdrs["Content-Type"].startswith("application/problem+json")
        assert hdrs["Access-Control-Allow-Origin"] == "*"  # a browser can read why
    assert (await post(good, target=f"{ingress.url}/api/abc/envelope/"))[0] == 404
    # only non-event items: accepted, nothing to report
    status, _, answer = await post(envelope(({"type": "session"}, b'{"sid": "x"}'),
                                            ({"type": "attachment", "length": 3}, b"abc")))
    assert (status, answer) == (200, {})
    # a preflight for browsers
    status, hdrs, _ = await ahttp("OPTIONS", url, None, {"Origin": "https://shop.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert status == 204 and "X-Sentry-Auth" in hdrs["Access-Control-Allow-Headers"]
    assert await _stream_count(nats_url) == 0
    # a gzip body with the key in the envelope header's dsn (what a tunnel forwards)
    header = {"event_id": uuid.uuid4().hex, "dsn": f"https://{SENTRY_KEY}@o1.ingest.example/1"}
    body = gzip.compress(envelope(({"type": "event"}, json.dumps(browser_event()).encode()), header=header))
    status, _, raw = await ahttp("POST", url, body, {"Content-Encoding": "gzip"})
    assert status == 200, raw
    assert await _stream_count(nats_url) == 1
    # brotli, which the Python SDK uses whenever the brotli package is installed
    body = brotli.compress(envelope(({"type": "event"}, json.dumps(browser_event()).encode())))
    status, _, raw = await ahttp("POST", url, body, {**AUTH, "Content-Encoding": "br"})
    assert status == 200, raw
    assert await _stream_count(nats_url) == 2


async def test_post_errors_validated_and_published(db, nats_url, start_service) -> None:
    ingress = start_service("ingress")
    start_service("error_sink")
    url = f"{ingress.url}/v1/errors"
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"}
    good = report(1, service="checkout-web", level="warning", context={"password": "pw-123456"})
    bad = [
        (client, b"{nope", 400, "invalid_json"),
        (client, json.dumps(report(2, level="loud")).encode(), 422, "validation_failed"),
        (client, json.dumps(report(3, occurred_at=12)).encode(), 422, "validation_failed"),
        (client, json.dumps(report(4, unknown=1)).encode(), 422, "validation_failed"),
        (client, json.dumps({"message": "no id"}).encode(), 422, "validation_failed"),
        (client, json.dumps(report(5, service="has spaces")).encode(), 422, "validation_failed"),
        (client, json.dumps(report(6, message="x" * (2 << 20))).encode(), 413, "payload_too_large"),
        ({}, json.dumps(good).encode(), 401, "unauthorized"),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, json.dumps(good).encode(), 403, "forbidden"),
    ]
    for headers, body, want, code in bad:
        status, _, raw = await ahttp("POST", url, body, headers)
        assert (status, json.loads(raw)["code"]) == (want, code), (body[:80], raw)
    assert await _stream_count(nats_url) == 0
    status, _, raw = await ahttp("POST", url, json.dumps(good).encode(), client)
    assert status == 202 and json.loads(raw) == {"id": good["id"]}
    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_logs WHERE id = $1::uuid", good["id"]))
    assert row["service"] == "checkout-web" and row["severity"] == "warning"
    assert row["context"] == {"password": "[Filtered]"}
    assert await _stream_count(nats_url) == 1
    # on the bus already scrubbed, under the seal that spares the sink a second scrub
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg("ERRORS", "errors.>")
    finally:
        await nc.close()
    assert msg.subject == f"errors.checkout-web.warning.{scrub.SEAL}"
    assert json.loads(msg.data)["context"] == {"password": "[Filtered]"}


async def test_reports_shaped_against_the_scrubber_are_stored_promptly(db, start_service) -> None:
    """Reports whose text made the scrubber's and the grouping's patterns rescan from every
    position (ingress scrubs on its event loop, the sink groups): a stacktrace of 256 KiB of
    "password" repeated took 133 s of ingress's CPU, one of 256 KiB of blank lines 126 s of the
    sink's. Each is accepted at once and stored, and ingress answers meanwhile."""
    ingress = start_service("ingress")
    start_service("error_sink")
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"}
    hostile = [report(1, message="password" * 8192, stacktrace="password" * 32768),
               report(2, stacktrace="\n" * 262_144, message="blank lines"),
               report(3, message="a." * 32_000 + "://u:p@h", context={"k": "auth_" * 50_000})]
    started = time.monotonic()
    for body in hostile:
        status, _, raw = await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(body).encode(),
                                     client)
        assert status == 202, raw[:300]
        health, _, _ = await ahttp("GET", f"{ingress.url}/healthz")
        assert health == 200
    assert time.monotonic() - started < 10
    ids = [b["id"] for b in hostile]
    assert await eventually(lambda: db.fetchval(
        "SELECT count(*) = 3 FROM error_logs WHERE id = ANY($1::uuid[])", ids), timeout=30)


async def test_per_key_rate_limit_answers_429_with_retry_after(nats_url, start_service) -> None:
    ingress = start_service("ingress", ERROR_RATE_LIMIT_PER_MINUTE="3")
    url = f"{ingress.url}/api/1/envelope/"
    statuses = []
    for _ in range(4):
        body = envelope(({"type": "event"}, json.dumps(browser_event()).encode()))
        status, headers, _ = await ahttp("POST", url, body, AUTH)
        statuses.append(status)
    assert statuses == [200, 200, 200, 429]
    assert int(headers["Retry-After"]) >= 1
    assert headers["X-Sentry-Rate-Limits"].startswith(f"{headers['Retry-After']}:error:key, ")
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    codes = [(await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(report(i)).encode(), client))[0]
             for i in range(4)]
    assert codes == [202, 202, 202, 429]
    other = {"Authorization": f"Bearer {CLIENT_TOKEN_2}"}  # another key has its own budget
    assert (await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(report(9)).encode(), other))[0] == 202
    assert await _stream_count(nats_url) == 7


async def test_operators_list_resolve_ignore_and_regression(db, nats_url, start_service) -> None:
    ingress = start_service("ingress")
    start_service("error_sink")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"}

    def trace(line: int) -> str:
        return ("Traceback (most recent call last):\n"
                f'  File "/app/services/payment/handlers.py", line {line}, in hold\n'
                '  File "/app/.venv/lib/python3.11/site-packages/asyncpg/pool.py", line 9, in acquire\n'
                "TimeoutError: no connection")

    bodies = [report(i, error_type="TimeoutError", message=f"hold {uuid.uuid4()} timed out after {i}s",
                     stacktrace=trace(10 + i)) for i in range(3)]  # one group: same frames
    bodies.append(report(5, service="webhook", error_type="TimeoutError", stacktrace=trace(10)))
    bodies.append(report(6, level="critical", fingerprint=["ledger", "drift"], message="drift 1"))
    bodies.append(report(7, error_type=None, message="user 123 not found in 0.5s"))
    bodies.append(report(8, error_type=None, message="user 98765 not found in 12.25s"))
    for b in bodies:
        status, _, raw = await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(b).encode(), client)
        assert status == 202, raw
    await eventually(lambda: _all_stored(db, len(bodies)))

    async def get(path: str, headers: dict = admin) -> tuple[int, dict]:
        status, _, raw = await ahttp("GET", f"{ingress.url}{path}", None, headers)
        return status, json.loads(raw)

    status, listing = await get("/v1/admin/errors")
    assert status == 200 and len(listing["groups"]) == 4, listing
    hold = next(g for g in listing["groups"] if g["service"] == "payment" and g["count"] == 3)
    assert hold["fingerprint"] == ["TimeoutError", "payment/handlers.py:hold"]
    users = next(g for g in listing["groups"] if g["title"].startswith("user "))
    assert users["count"] == 2 and users["fingerprint"] == ["user <n> not found in <n>s"]
    assert any(g["fingerprint"] == ["ledger", "drift"] for g in listing["groups"])
    assert [g["service"] for g in (await get("/v1/admin/errors?service=webhook"))[1]["groups"]] == ["webhook"]
    assert [g["level"] for g in (await get("/v1/admin/errors?level=critical"))[1]["groups"]] == ["critical"]
    assert (await get("/v1/admin/errors?since=2999-01-01T00:00:00Z"))[1]["groups"] == []
    status, detail = await get(f"/v1/admin/errors/{hold['id']}?events=2")
    assert status == 200 and detail["group"]["id"] == hold["id"] and len(detail["events"]) == 2

    # resolve: the group and its rows; the runbook query no longer shows them
    status, _, raw = await ahttp("POST", f"{ingress.url}/v1/admin/errors/{hold['id']}/resolve", b"", admin)
    assert status == 200 and json.loads(raw)["status"] == "resolved"
    assert await count(db, "SELECT count(*) FROM error_logs WHERE group_id = $1 AND NOT resolved",
                       uuid.UUID(hold["id"])) == 0
    runbook = await db.fetch("SELECT severity, function_name, error_message, timestamp FROM error_logs "
                             "WHERE resolved = FALSE ORDER BY timestamp DESC LIMIT 20;")
    assert len(runbook) == len(bodies) - 3
    # a new report on the resolved group reopens it (a regression)
    again = report(9, error_type="TimeoutError", message="hold x timed out", stacktrace=trace(99))
    await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(again).encode(), client)
    group = await eventually(lambda: _group_count(db, hold["id"], 4))
    assert group["status"] == "unresolved" and group["regressed_at"] is not None
    # ignore: rows resolved, and new reports of the group are stored resolved
    other = next(g for g in listing["groups"] if g["service"] == "webhook")
    status, _, raw = await ahttp("POST", f"{ingress.url}/v1/admin/errors/{other['id']}/ignore", b"", admin)
    assert status == 200 and json.loads(raw)["status"] == "ignored"
    late = report(10, service="webhook", error_type="TimeoutError", stacktrace=trace(12))
    await ahttp("POST", f"{ingress.url}/v1/errors", json.dumps(late).encode(), client)
    group = await eventually(lambda: _group_count(db, other["id"], 2))
    assert group["status"] == "ignored"
    assert await db.fetchval("SELECT resolved FROM error_logs WHERE id = $1::uuid", late["id"]) is True
    # bad input and authorisation
    assert (await get(f"/v1/admin/errors/{uuid.uuid4()}"))[1]["code"] == "error_group_not_found"
    assert (await get("/v1/admin/errors/not-a-uuid"))[0] == 422
    assert (await get("/v1/admin/errors?status=sleeping"))[0] == 422
    assert (await get("/v1/admin/errors?limit=0"))[0] == 422
    assert (await get("/v1/admin/errors", {"Authorization": f"Bearer {CLIENT_TOKEN}"}))[0] == 403
    # the same from the CLI
    env = dict(os.environ, INGRESS_URL=ingress.url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", "list", "--status", "ignored"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert [g["id"] for g in json.loads(out.stdout)["groups"]] == [other["id"]]
    out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", "resolve", str(uuid.uuid4())],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 1 and "error_group_not_found" in out.stderr


async def _all_stored(db, n: int) -> bool:
    return await count(db) >= n


async def _group_count(db, group_id: str, n: int):
    row = await db.fetchrow("SELECT * FROM error_groups WHERE id = $1", uuid.UUID(group_id))
    return row if row["count"] >= n else None
