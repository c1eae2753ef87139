"""What a Sentry event keeps (breadcrumbs, frame variables, mechanism, dist), how it is grouped
(never by checkout path or bundle hash), SENTRY_PROJECTS, and the legacy /store/ and the
/security/ (CSP) endpoints; with the unmodified sentry-sdk where it sends them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

from tests.errors_support import AUTH, ahttp, browser_event, envelope
from tests.harness import SENTRY_KEY, eventually

JOBS = """
def settle(order_id):
    password = "hunter2-local-secret"
    card = "4242 4242 4242 4242"
    note = "visible-local-" + str(order_id)
    raise ValueError(f"order {order_id} could not be settled")
"""

SCRIPT = """
import sys, sentry_sdk
sentry_sdk.init(dsn=sys.argv[1], release="shop@2.0.0", dist="build-7", environment="production")
from shopjobs import settle
sentry_sdk.add_breadcrumb(category="cart", message="added ticket 42", level="info")
sentry_sdk.add_breadcrumb(category="http", message="GET /pay?token=tok-abcdef123456", level="info")
if sys.argv[2] == "handled":
    try:
        settle(int(sys.argv[3]))
    except ValueError:
        print(sentry_sdk.capture_exception())
    sentry_sdk.flush(timeout=10)
else:
    settle(int(sys.argv[3]))  # unhandled: the SDK's excepthook reports it, then exits 1
"""


def _run(checkout: Path, dsn: str, mode: str, order: int) -> subprocess.CompletedProcess:
    checkout.mkdir(parents=True, exist_ok=True)
    (checkout / "shopjobs.py").write_text(JOBS)
    (checkout / "shop.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRY")}
    return subprocess.run([sys.executable, "shop.py", dsn, mode, str(order)], cwd=checkout,
                          capture_output=True, text=True, timeout=60, env=env)


async def test_events_keep_breadcrumbs_vars_mechanism_dist_and_group_without_paths(
        db, start_service, tmp_path) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web,2=box-office-app")
    start_service("error_sink")
    dsn = f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/2"

    out = _run(tmp_path / "home" / "alice" / "checkout-a", dsn, "handled", 41)
    event_id = out.stdout.strip().splitlines()[-1]
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event_id))))
    assert row["service"] == "box-office-app"  # SENTRY_PROJECTS, not sentry-python
    ctx = row["context"]
    assert ctx["sentry"]["dist"] == "build-7" and ctx["sentry"]["handled"] is True
    exc = ctx["exception"][-1]
    assert exc["type"] == "ValueError" and exc["mechanism"]["handled"] is True
    frame = exc["frames"][-1]
    assert frame["function"] == "settle" and frame["module"] == "shopjobs"
    assert "visible-local-41" in frame["vars"]["note"]
    assert frame["vars"]["password"] == "[Filtered]"
    assert "4242" not in json.dumps(ctx)
    crumbs = [c.get("message") for c in ctx["breadcrumbs"]]
    assert "added ticket 42" in crumbs
    assert "tok-abcdef123456" not in json.dumps(ctx["breadcrumbs"])
    group = await db.fetchrow("SELECT * FROM error_groups WHERE id = $1", row["group_id"])
    assert group["fingerprint"] == ["ValueError", "__main__:<module>", "shopjobs:settle"]
    assert not any("alice" in part or "checkout-a" in part for part in group["fingerprint"])

    # the same code checked out elsewhere, crashing unhandled: the same group, handled false
    out = _run(tmp_path / "srv" / "deploy" / "release-9", dsn, "crash", 42)
    assert out.returncode != 0
    rows = await eventually(lambda: _rows_of(db, row["group_id"], 2))
    crashed = next(r for r in rows if r["id"] != row["id"])
    assert crashed["context"]["exception"][-1]["mechanism"]["handled"] is False
    assert crashed["context"]["sentry"]["handled"] is False
    assert (await db.fetchval("SELECT count FROM error_groups WHERE id = $1", row["group_id"])) == 2


async def _rows_of(db, group_id, n):
    rows = await db.fetch("SELECT * FROM error_logs WHERE group_id = $1", group_id)
    return rows if len(rows) >= n else None


async def test_bundle_hash_and_origin_do_not_split_a_browser_group(db, start_service) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web")
    start_service("error_sink")
    ids = []
    for name in ("main.3f2a1b9c.js", "main.77e0d4aa.js"):
        event = browser_event(tags={})
        event["exception"]["values"][0]["stacktrace"]["frames"][-1]["filename"] = \
            f"https://cdn{len(ids)}.shop.example/static/js/{name}?v=1"
        ids.append(event["event_id"])
        status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/envelope/",
                                     envelope(({"type": "event"}, json.dumps(event).encode())), AUTH)
        assert status == 200, raw
    rows = await eventually(lambda: _rows_by_ids(db, ids))
    assert {r["service"] for r in rows} == {"shop-web"}
    assert rows[0]["group_id"] == rows[1]["group_id"]
    fp = await db.fetchval("SELECT fingerprint FROM error_groups WHERE id = $1", rows[0]["group_id"])
    assert fp == ["TypeError", "js/main.js:addToCart"]


async def _rows_by_ids(db, ids):
    rows = await db.fetch("SELECT * FROM error_logs WHERE id = ANY($1::uuid[]) ORDER BY id",
                          [str(uuid.UUID(i)) for i in ids])
    return rows if len(rows) == len(ids) else None


async def test_legacy_store_endpoint(db, start_service) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web")
    start_service("error_sink")
    plain, packed = browser_event(tags={}), browser_event(tags={}, level="warning")
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/store/", json.dumps(plain).encode(),
                                 {**AUTH, "Content-Type": "application/json"})
    assert status == 200 and json.loads(raw) == {"id": plain["event_id"]}
    body = base64.b64encode(zlib.compress(json.dumps(packed).encode()))  # raven's encoding
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/store/?sentry_key={SENTRY_KEY}", body,
                                 {"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(raw) == {"id": packed["event_id"]}
    rows = await eventually(lambda: _rows_by_ids(db, [plain["event_id"], packed["event_id"]]))
    assert {(r["service"], r["severity"]) for r in rows} == {("shop-web", "error"), ("shop-web", "warning")}
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/store/", json.dumps(plain).encode(),
                                 {"X-Sentry-Auth": "Sentry sentry_key=wrongwrongwrong"})
    assert status == 403
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/store/", b"not json at all!!", AUTH)
    assert status == 400 and json.loads(raw)["code"] == "invalid_envelope"


async def test_csp_reports_are_stored_as_warnings(db, start_service) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web")
    start_service("error_sink")
    url = f"{ingress.url}/api/1/security/?sentry_key={SENTRY_KEY}"
    classic = {"csp-report": {"document-uri": "https://shop.example/cart?token=tok-secret-998877",
                              "violated-directive": "script-src-elem", "effective-directive": "script-src-elem",
                              "blocked-uri": "https://evil.example/x.js", "original-policy": "script-src 'self'",
                              "disposition": "enforce"}}
    status, _, raw = await ahttp("POST", url, json.dumps(classic).encode(),
                                 {"Content-Type": "application/csp-report"})
    assert status == 201, raw
    reporting_api = [{"type": "csp-violation", "url": "https://shop.example/",
                      "body": {"documentURL": "https://shop.example/", "effectiveDirective": "img-src",
                               "blockedURL": "https://tracker.example/p.gif", "disposition": "report"}}]
    status, _, raw = await ahttp("POST", url, json.dumps(reporting_api).encode(),
                                 {"Content-Type": "application/reports+json"})
    assert status == 201, raw
    rows = await eventually(lambda: _csp_rows(db, 2))
    assert {r["error_message"] for r in rows} == {"Blocked 'script-src-elem' from 'evil.example'",
                                                  "Blocked 'img-src' from 'tracker.example'"}
    assert {(r["service"], r["severity"], r["error_type"]) for r in rows} == {
        ("shop-web", "warning", "CspViolation")}
    assert "tok-secret-998877" not in json.dumps([r["context"] for r in rows])
    assert (await ahttp("POST", f"{ingress.url}/api/1/security/", json.dumps(classic).encode()))[0] == 403
    status, _, raw = await ahttp("POST", url, b'{"not": "a report"}')
    assert status == 400


async def _csp_rows(db, n):
    rows = await db.fetch("SELECT * FROM error_logs WHERE error_type = 'CspViolation'")
    return rows if len(rows) >= n else None


async def test_minified_frames_resolved_with_an_uploaded_source_map(db, start_service, tmp_path) -> None:
    from tests.harness import ADMIN_TOKEN
    ingress = start_service("ingress")
    start_service("error_sink")
    event = browser_event(release="shop@9.9.9")
    frame = event["exception"]["values"][0]["stacktrace"]["frames"][-1]
    frame.update(filename="https://cdn.shop.example/static/js/main.3f2a1b9c.js?v=9",
                 abs_path="https://cdn.shop.example/static/js/main.3f2a1b9c.js?v=9",
                 function="a", lineno=2, colno=5)
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/envelope/",
                                 envelope(({"type": "event"}, json.dumps(event).encode())), AUTH)
    assert status == 200, raw
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event["event_id"]))))
    # line 2 of the bundle, from its first column, is line 2 of src/cart.js in addToCart
    source_map = {"version": 3, "file": "main.3f2a1b9c.js", "sources": ["src/cart.js"],
                  "names": ["addToCart"], "mappings": "AAAAA;AACAA"}
    (tmp_path / "main.js.map").write_text(json.dumps(source_map))
    env = dict(os.environ, INGRESS_URL=ingress.url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", "sourcemap", "shop@9.9.9",
                          "~/static/js/main.3f2a1b9c.js", str(tmp_path / "main.js.map")],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, _, raw = await ahttp("GET", f"{ingress.url}/v1/admin/errors/{row['group_id']}", None, admin)
    assert status == 200, raw
    [shown] = json.loads(raw)["events"]
    resolved = shown["context"]["exception"][-1]["frames"][-1]["resolved"]
    assert resolved == {"filename": "src/cart.js", "lineno": 2, "colno": 1, "function": "addToCart"}
    status, _, raw = await ahttp("POST", f"{ingress.url}/v1/admin/releases/shop@9.9.9/sourcemaps?name=x.js",
                                 b"not a map", admin)
    assert status == 422 and json.loads(raw)["code"] == "invalid_source_map"


async def test_a_source_map_found_by_its_debug_id(db, start_service) -> None:
    from tests.harness import ADMIN_TOKEN
    ingress = start_service("ingress")
    start_service("error_sink")
    debug_id = str(uuid.uuid4())
    url = "https://cdn.shop.example/assets/app.77e0d4aa.js"
    event = browser_event()  # no release: the Debug ID is enough
    event["debug_meta"] = {"images": [{"type": "sourcemap", "code_file": url, "debug_id": debug_id}]}
    frame = event["exception"]["values"][0]["stacktrace"]["frames"][-1]
    frame.update(filename=url, abs_path=url, function="b", lineno=2, colno=9)
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/envelope/",
                                 envelope(({"type": "event"}, json.dumps(event).encode())), AUTH)
    assert status == 200, raw
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event["event_id"]))))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    source_map = {"version": 3, "sources": ["src/pay.ts"], "names": ["submitPayment"],
                  "mappings": "AAAAA;AACAA", "debug_id": debug_id}
    status, _, raw = await ahttp(  # uploaded under another release and another name
        "POST", f"{ingress.url}/v1/admin/releases/any/sourcemaps?name=~/app.js",
        json.dumps(source_map).encode(), admin)
    assert status == 201, raw
    status, _, raw = await ahttp("GET", f"{ingress.url}/v1/admin/errors/{row['group_id']}", None, admin)
    [shown] = json.loads(raw)["events"]
    assert shown["context"]["exception"][-1]["frames"][-1]["resolved"] == {
        "filename": "src/pay.ts", "lineno": 2, "colno": 1, "function": "submitPayment"}
