"""The console's server side: sign-in to a signed session cookie (HttpOnly, SameSite=Strict,
Secure outside development) that keeps the token's scope, CSRF on every action, a strict CSP
and nothing loaded from elsewhere, the live inventory feed, the routes the console added (events
list, expiry lag, a webhook event's payload, bulk replay, the errors' sparkline) and the CLI's
bulk replay."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from boxoffice.config import Config
from boxoffice.ingress import console as console_routes
from boxoffice.ingress import sessions
from tests.console_support import allow_payments, console, failed_webhook_events
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, eventually
from tests.sql_support import new_event, new_hold
from tests.webhooks_support import deliver, event, log_status, new_pi, payment_intent

READ_TOKEN = "admin-read-token-console-000000"


# -- sessions, without a server ------------------------------------------------------------
CFG = Config(service="ingress", admin_api_tokens=(ADMIN_TOKEN,),
             admin_read_api_tokens=(READ_TOKEN,), env="test")


def test_a_session_keeps_its_scope_and_hides_its_token() -> None:
    value, issued = sessions.issue(ADMIN_TOKEN, "operate")
    assert ADMIN_TOKEN not in value and issued.actor in value
    read = sessions.read(CFG, value)
    assert (read.scope, read.actor, read.csrf) == ("operate", issued.actor, issued.csrf)
    value, _ = sessions.issue(READ_TOKEN, "read")
    assert sessions.read(CFG, value).scope == "read"


@pytest.mark.parametrize("tamper", ["scope", "expiry", "mac", "token gone", "expired", "junk"])
def test_a_tampered_or_stale_session_is_refused(tamper: str) -> None:
    now = time.time()
    value, _ = sessions.issue(READ_TOKEN, "read", now=now)
    version, actor, scope, expires, nonce, mac = value.split(".")
    cfg, at = CFG, now
    if tamper == "scope":  # a read session passed off as an operate one
        value = ".".join([version, actor, "operate", expires, nonce, mac])
    elif tamper == "expiry":
        value = ".".join([version, actor, scope, str(int(expires) + 86400), nonce, mac])
    elif tamper == "mac":
        value = value[:-1] + ("0" if value[-1] != "0" else "1")
    elif tamper == "token gone":  # the token was taken out of the configuration
        cfg = Config(service="ingress", admin_api_tokens=(ADMIN_TOKEN,), env="test")
    elif tamper == "expired":
        at = now + sessions.LIFETIME + 1
    else:
        value = "v1.junk"
    with pytest.raises(sessions.errors.Unauthorized):
        sessions.read(cfg, value, now=at)


# -- the console over HTTP -----------------------------------------------------------------
async def test_sign_in_sets_a_strict_cookie_and_the_session_reads_and_acts(start_service) -> None:
    start_service("payment")
    ingress = start_service("ingress", ADMIN_READ_API_TOKENS=READ_TOKEN)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        c = console(http, ingress.url)
        # refused without signing in, with a client token, with no token
        assert (await c.call("GET", "/console/session")).status == 401
        assert (await c.call("GET", "/v1/admin/events")).status == 401
        for token in (CLIENT_TOKEN, "wrong-token-000000000000", ""):
            answer = await c.sign_in(token)
            assert answer.status in (401, 422) and "Set-Cookie" not in answer.headers
        answer = await c.sign_in(ADMIN_TOKEN)
        assert answer.status == 201, answer.body
        cookie = c.set_cookie.lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "secure" in cookie  # BOXOFFICE_ENV=test: not development
        assert ADMIN_TOKEN not in c.set_cookie and ADMIN_TOKEN not in answer.body.decode()
        assert answer.json["scope"] == "operate" and answer.json["actor"].startswith("a_")
        me = await c.call("GET", "/console/session")
        assert me.status == 200 and me.json["csrf_token"] == c.csrf

        # the admin API answers the cookie; an action needs the CSRF token as well
        assert (await c.call("GET", "/v1/admin/events")).status == 200
        new = {"name": "console gig", "capacity": 5, "price": 1000, "currency": "eur"}
        for bad in ("", "x" * 43, c.csrf[:-1]):
            refused = await c.call("POST", "/v1/admin/events", new, csrf=bad, headers={
                sessions.CSRF_HEADER: bad} if bad else {})
            assert (refused.status, refused.json["code"]) == (403, "forbidden"), refused.body
        created = await c.call("POST", "/v1/admin/events", new)
        assert created.status == 201, created.body
        listed = (await c.call("GET", "/v1/admin/events")).json["events"]
        assert [e["id"] for e in listed] == [created.json["id"]]
        assert listed[0]["available"] == 5

        # a read-scoped session reads and never acts, CSRF or not
        reader = console(http, ingress.url)
        assert (await reader.sign_in(READ_TOKEN)).json["scope"] == "read"
        assert (await reader.call("GET", "/v1/admin/events")).status == 200
        refused = await reader.call("POST", "/v1/admin/events", new)
        assert (refused.status, refused.json["code"]) == (403, "forbidden")

        # sign-in and sign-out from another site are refused; sign-out needs the CSRF token
        other = console(http, ingress.url)
        answer = await other.call("POST", "/console/session", {"token": ADMIN_TOKEN},
                                  headers={"Origin": "https://evil.example"})
        assert answer.status == 403 and "Set-Cookie" not in answer.headers
        assert (await c.call("DELETE", "/console/session", csrf="nope",
                             headers={sessions.CSRF_HEADER: "nope"})).status == 403
        out = await c.call("DELETE", "/console/session")
        assert out.status == 204 and f"{sessions.COOKIE}=\"\"" in out.headers["Set-Cookie"]
        # a cookie that is not a session is not one
        c.cookie = "v1.a_0000.operate.99999999999.nonce.mac"
        assert (await c.call("GET", "/v1/admin/events")).status == 401


async def test_the_page_has_a_strict_policy_and_loads_nothing_from_elsewhere(start_service) -> None:
    ingress = start_service("ingress")
    async with aiohttp.ClientSession() as http:
        for path, kind in (("/console", "text/html"), ("/console/app.js", "text/javascript"),
                           ("/console/console.css", "text/css")):
            async with http.get(ingress.url + path) as resp:
                body = await resp.text()
                assert resp.status == 200 and resp.content_type == kind
                csp = resp.headers["Content-Security-Policy"]
                assert "default-src 'none'" in csp and "script-src 'self'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                # no CDN, no other origin: every URL is of this origin
                assert not re.search(r"(?:src|href)=\"(?:https?:)?//", body)
                assert "cdn" not in body.lower()
        async with http.get(ingress.url + "/console") as resp:
            page = await resp.text()
        assert "<script src=\"/console/app.js\"" in page and "<style" not in page
        assert "onclick=" not in page and "<script>" not in page  # no inline script


async def test_the_feed_sends_inventory_as_holds_change(db: asyncpg.Pool, start_service) -> None:
    start_service("payment")
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=50)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        c = console(http, ingress.url)
        async with http.get(ingress.url + "/console/stream") as resp:
            assert resp.status == 401  # no session, no feed
        await c.sign_in(ADMIN_TOKEN)
        headers = {"Cookie": f"{sessions.COOKIE}={c.cookie}"}
        async with http.get(ingress.url + "/console/stream", headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert b"connected" in first
            api = {"Authorization": f"Bearer {CLIENT_TOKEN}"}

            async def buy() -> None:  # through ingress and the payment service, as buyers do
                async with http.post(ingress.url + "/v1/reservations", headers=api,
                                     json={"event_id": str(ev), "quantity": 1}) as r:
                    assert r.status == 201

            started = time.monotonic()
            await asyncio.gather(*(buy() for _ in range(50)))  # a sell-out
            seen: dict = {}
            frames = 0
            deadline = time.monotonic() + 15
            while seen.get("available") != 0:
                assert time.monotonic() < deadline, f"last inventory: {seen}"
                frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 15)
                if frame.startswith(b"event: inventory"):
                    frames += 1
                    seen = json.loads(frame.split(b"data: ", 1)[1])
            elapsed = time.monotonic() - started
            assert seen["id"] == str(ev) and (seen["held"], seen["sold"]) == (50, 0)
            # coalesced: one read of the event per interval at most, not one per hold
            assert frames <= elapsed / console_routes.FEED_INTERVAL + 2, (frames, elapsed)
            assert frames < 50


async def test_expiry_lag_and_event_errors(db: asyncpg.Pool, start_service) -> None:
    start_service("payment")
    start_service("reaper")
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=10)
    await new_hold(db, ev, 2, ttl=1)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=admin) as http:
        async def lag() -> dict | None:
            async with http.get(ingress.url + "/v1/admin/reservations/expiry-lag") as resp:
                assert resp.status == 200
                body = await resp.json()
            return body if body["points"] else None

        body = await eventually(lag, 20, "the hold to expire")
        assert body["minutes"] == 60 and body["points"][0]["holds"] == 1
        assert 0 <= body["points"][0]["max_seconds"] < 5
        async with http.get(ingress.url + "/v1/admin/reservations/expiry-lag?minutes=0") as resp:
            assert resp.status == 422

        # one wording and one code for an event that is not there, whatever its id looks like
        for event_id in ("not-a-uuid", str(uuid.uuid4())):
            async with http.get(f"{ingress.url}/v1/admin/events/{event_id}") as resp:
                problem = await resp.json()
            assert (resp.status, problem["code"]) == (404, "event_not_found"), problem
            assert problem["detail"].startswith("no event ")


async def test_a_failed_events_payload_and_bulk_replay(db: asyncpg.Pool, start_service) -> None:
    start_service("payment")
    start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3")
    ingress = start_service("ingress", ADMIN_READ_API_TOKENS=READ_TOKEN)
    ev = await new_event(db, capacity=10)
    ids = await failed_webhook_events(db, ingress.url, ev, count=3)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=admin) as http:
        # one event: its last error and its payload, the client secret filtered out
        async with http.get(f"{ingress.url}/v1/admin/webhooks/events/{ids[0]}") as resp:
            detail = await resp.json()
        assert resp.status == 200, detail
        assert detail["event"]["processing_status"] == "failed"
        assert "effects refused for this test" in detail["event"]["last_error"]
        obj = detail["payload"]["data"]["object"]
        assert obj["client_secret"] == "[Filtered]" and obj["amount"] == 2500
        assert "secret_do_not_show" not in json.dumps(detail)
        for bad in ("evt_missing_0000", "not%20an%20id"):
            async with http.get(f"{ingress.url}/v1/admin/webhooks/events/{bad}") as resp:
                problem = await resp.json()
            assert (resp.status, problem["code"]) == (404, "webhook_event_not_found"), problem
            assert problem["detail"].startswith("no webhook event '")
        async with http.post(f"{ingress.url}/v1/admin/webhooks/events/a%20b/replay") as resp:
            assert (resp.status, (await resp.json())["code"]) == (404, "webhook_event_not_found")

        # bulk replay refuses a read token and a body without a status
        async with http.post(f"{ingress.url}/v1/admin/webhooks/replay", json={"status": "failed"},
                             headers={"Authorization": f"Bearer {READ_TOKEN}"}) as resp:
            assert resp.status == 403
        async with http.post(f"{ingress.url}/v1/admin/webhooks/replay", json={}) as resp:
            assert resp.status == 422
        # while the cause remains, every replay fails again and says so, line by line
        lines = await _replay(http, ingress.url, {"status": "failed"})
        replayed = [ln["event_id"] for ln in lines[:-1]]
        assert sorted(replayed) == sorted(ids)
        received = [await db.fetchval("SELECT received_at FROM webhook_events_log "
                                      "WHERE event_id = $1", e) for e in replayed]
        assert received == sorted(received)  # oldest first
        assert [ln["done"] for ln in lines[:-1]] == [1, 2, 3]
        assert {ln["outcome"] for ln in lines[:-1]} == {"failed"}
        assert lines[-1] == {"done": 3, "total": 3, "event_id": None, "outcome": None,
                             "code": None, "finished": True, "succeeded": 0, "failed": 3}
        # the cause fixed: a type that matches nothing replays nothing; the right one, all
        await allow_payments(db)
        assert (await _replay(http, ingress.url, {"status": "failed", "type": "charge.refunded"})
                )[-1]["total"] == 0
        lines = await _replay(http, ingress.url, {"status": "failed",
                                                  "type": "payment_intent.succeeded"})
        assert len(lines) == 4 and not {ln["outcome"] for ln in lines[:-1]} & {"failed", "error"}
        assert lines[-1]["succeeded"] == 3 and lines[-1]["failed"] == 0
        for event_id in ids:
            assert await log_status(db, event_id) == "processed"
        assert await db.fetchval("SELECT sum(sold) FROM inventory_buckets WHERE event_id = $1",
                                 ev) == 3


async def _replay(http: aiohttp.ClientSession, url: str, body: dict) -> list[dict]:
    async with http.post(f"{url}/v1/admin/webhooks/replay", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        return [json.loads(line) async for line in resp.content if line.strip()]


async def test_the_cli_replays_all_failed_events_with_progress(db: asyncpg.Pool,
                                                              start_service) -> None:
    start_service("payment")
    start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3")
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=10)
    ids = await failed_webhook_events(db, ingress.url, ev, count=2)
    env = dict(os.environ, INGRESS_URL=ingress.url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    shown = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "boxoffice.cli", "webhooks", "show", ids[0], "--json"],
        env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["event"]["processing_status"] == "failed"
    assert detail["payload"]["data"]["object"]["client_secret"] == "[Filtered]"
    listed = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "boxoffice.cli", "events", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=60)
    assert [e["id"] for e in json.loads(listed.stdout)["events"]] == [str(ev)]
    await allow_payments(db)
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "boxoffice.cli", "webhooks", "replay-all", "--status", "failed"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"total": 2, "succeeded": 2, "failed": 0}
    progress = done.stderr.strip().splitlines()
    assert [line.split("]")[0] for line in progress] == ["[1/2", "[2/2"]
    # (oldest first: in the order the webhook service recorded them, which may not be the order
    # they were delivered in)
    assert sorted(line.split()[1].rstrip(":") for line in progress) == sorted(ids)
    for event_id in ids:
        assert await log_status(db, event_id) == "processed"
    # nothing left: a second run replays nothing and succeeds
    again = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "boxoffice.cli", "webhooks", "replay-all"],
        env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout)["total"] == 0


async def test_error_groups_carry_a_sparkline_of_the_last_day(start_service) -> None:
    start_service("error_sink")
    ingress = start_service("ingress")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            report = {"id": str(uuid.uuid4()), "occurred_at": _ago(0), "service": "shop-web",
                      "level": "error", "message": "sparkline boom",
                      "fingerprint": ["sparkline"]}
            async with http.post(ingress.url + "/v1/errors", json=report,
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as resp:
                assert resp.status == 202
        old = {"id": str(uuid.uuid4()), "occurred_at": _ago(5 * 3600 + 60),
               "service": "shop-web", "level": "error", "message": "sparkline boom",
               "fingerprint": ["sparkline"]}
        async with http.post(ingress.url + "/v1/errors", json=old,
                             headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as resp:
            assert resp.status == 202

        async def group() -> dict | None:
            async with http.get(ingress.url + "/v1/admin/errors",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                groups = (await resp.json())["groups"]
            return groups[0] if groups and groups[0]["count"] == 4 else None

        g = await eventually(group, 20, "the reports to be grouped")
        assert len(g["hourly"]) == 24 and sum(g["hourly"]) == 4
        assert g["hourly"][23] == 3 and g["hourly"][23 - 5] == 1


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


async def test_the_walk_throughs_webhook_outage_drill(db: asyncpg.Pool, database_url: str,
                                                      start_service, tmp_path) -> None:
    start_service("payment")
    start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3")
    ingress = start_service("ingress")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXOFFICE_")}
    env.update(DATABASE_URL=database_url, BOXOFFICE_HOME=str(tmp_path), INGRESS_URL=ingress.url,
               ADMIN_API_TOKEN=ADMIN_TOKEN)

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "boxoffice.cli", *args],
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)

    # never outside a development stack
    refused = await asyncio.to_thread(cli, "dev", "webhook-outage", "on",
                                      BOXOFFICE_ENV="production")
    assert refused.returncode == 2 and "development" in refused.stderr
    assert await db.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = "
                             "'boxoffice_webhook_outage'") == 0
    on = await asyncio.to_thread(cli, "dev", "webhook-outage", "on")
    assert on.returncode == 0, on.stderr
    ev = await new_event(db, capacity=4)
    reservation = await new_hold(db, ev, 2)
    body = event("payment_intent.succeeded", payment_intent(new_pi(), reservation))
    event_id = json.loads(body)["id"]
    async with aiohttp.ClientSession() as http:
        await deliver(http, ingress.url, body)

    async def failed() -> bool:
        return await log_status(db, event_id) == "failed"

    await eventually(failed, 30, "the event to fail during the drill")
    assert "webhook outage drill" in await db.fetchval(
        "SELECT last_error FROM webhook_events_log WHERE event_id = $1", event_id)
    off = await asyncio.to_thread(cli, "dev", "webhook-outage", "off")
    assert off.returncode == 0, off.stderr
    replayed = await asyncio.to_thread(cli, "webhooks", "replay", event_id)
    assert replayed.returncode == 0, replayed.stderr
    assert await log_status(db, event_id) == "processed"
    assert await db.fetchval("SELECT sum(sold) FROM inventory_buckets WHERE event_id = $1",
                             ev) == 2
