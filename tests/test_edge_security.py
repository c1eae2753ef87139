"""The edge and operators: scoped admin tokens with a log of every action, metrics off the public
listener, alerts signed as Standard Webhooks, and events of the other Stripe mode refused."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from boxoffice import bus as busmod
from boxoffice.error_sink import alerts
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, eventually
from tests.sql_support import new_event, new_hold
from tests.webhooks_support import deliver, event, log_status, new_pi, payment_intent

READ_TOKEN = "admin-read-token-dddddddddddddddd"
EVENT = {"name": "Scoped", "capacity": 10, "price": 1000, "currency": "eur"}


async def call(s: aiohttp.ClientSession, method: str, url: str, token: str,
               body: dict | None = None) -> tuple[int, dict]:
    async with s.request(method, url, json=body,
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_read_scope_reads_operate_scope_acts_and_every_action_is_logged(
        db: asyncpg.Pool, start_service) -> None:
    start_service("payment")
    start_service("reaper")
    start_service("error_sink")
    ingress = start_service("ingress", ADMIN_READ_API_TOKENS=READ_TOKEN)
    base = ingress.url
    async with aiohttp.ClientSession() as s:
        # read: lists and stats
        assert (await call(s, "GET", f"{base}/v1/admin/reservations/stats", READ_TOKEN))[0] == 200
        # but no action: refused before anything is done or recorded
        status, body = await call(s, "POST", f"{base}/v1/admin/events", READ_TOKEN, EVENT)
        assert (status, body["code"]) == (403, "forbidden")
        status, _ = await call(s, "POST", f"{base}/v1/admin/reservations/cleanup", READ_TOKEN)
        assert status == 403
        assert await db.fetchval("SELECT count(*) FROM ticketed_events") == 0
        assert await db.fetchval("SELECT count(*) FROM admin_actions") == 0
        # operate: acts, and the action is logged with the token's id, never the token
        status, created = await call(s, "POST", f"{base}/v1/admin/events", ADMIN_TOKEN, EVENT)
        assert status == 201
        status, _ = await call(s, "POST", f"{base}/v1/admin/errors/{uuid.uuid4()}/resolve",
                               ADMIN_TOKEN)
        assert status == 404  # a failed action is logged too, with its status
        # a client token is no admin token
        assert (await call(s, "GET", f"{base}/v1/admin/audit", CLIENT_TOKEN))[0] == 403

        async def logged() -> list | None:
            status, log = await call(s, "GET", f"{base}/v1/admin/audit?limit=10", READ_TOKEN)
            assert status == 200
            done = [a for a in log["actions"] if a["status"] is not None]
            return log["actions"] if len(done) == 2 else None
        actions = await eventually(logged, what="both actions in the log")
    assert [(a["action"], a["status"]) for a in actions] == [
        ("POST /v1/admin/errors/{group_id}/{action}", 404),
        ("POST /v1/admin/events", 201)]
    assert actions[1]["target"] == "/v1/admin/events"
    actor = actions[0]["actor"]
    assert actor.startswith("a_") and all(a["actor"] == actor for a in actions)
    assert all(a["finished_at"] is not None and a["request_id"] for a in actions)
    rows = await db.fetch("SELECT * FROM admin_actions")
    dumped = json.dumps([dict(r) for r in rows], default=str) + ingress.logs()
    assert ADMIN_TOKEN not in dumped and READ_TOKEN not in dumped
    assert created["id"]


async def test_actions_wait_on_the_bus_for_the_reaper(db: asyncpg.Pool, start_service) -> None:
    start_service("payment")
    ingress = start_service("ingress")  # the reaper, keeper of the log, is down
    async with aiohttp.ClientSession() as s:
        status, _ = await call(s, "POST", f"{ingress.url}/v1/admin/events", ADMIN_TOKEN, EVENT)
        assert status == 201
        start_service("reaper")

        async def logged() -> list | None:
            _status, log = await call(s, "GET", f"{ingress.url}/v1/admin/audit", ADMIN_TOKEN)
            return [(a["action"], a["status"]) for a in log["actions"]] or None
        assert await eventually(logged, what="the action in the log") == [
            ("POST /v1/admin/events", 201)]


async def test_an_action_that_cannot_be_logged_is_not_carried_out(
        db: asyncpg.Pool, start_service, nats_url: str) -> None:
    start_service("payment")
    ingress = start_service("ingress")
    async with busmod.connect(nats_url, "operator") as bus:
        await bus.js.delete_stream("AUDIT")  # the log cannot be written at all
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, "POST", f"{ingress.url}/v1/admin/events", ADMIN_TOKEN, EVENT)
    assert status == 503, body
    assert await db.fetchval("SELECT count(*) FROM ticketed_events") == 0


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def test_alert_posts_are_signed_as_standard_webhooks(alert_endpoint) -> None:
    url, got = alert_endpoint.url, alert_endpoint.received
    payload = {"id": "g1:1", "level": "critical", "reason": "level", "title": "Boom",
               "service": "payment", "count": 1, "window_count": 1}
    async with aiohttp.ClientSession() as s:
        assert await alerts._post(s, url, payload, "g1:1", alerts.signer(SECRET)) is None
        assert await alerts._post(s, url, payload, "g1:2", None) is None  # no secret: unsigned
    (body, headers), (unsigned, plain) = got
    verified = Webhook(SECRET).verify(body, headers)
    assert verified["alert"]["title"] == "Boom" and headers["webhook-id"] == "g1:1"
    with pytest.raises(WebhookVerificationError):  # another secret cannot have signed it
        Webhook("whsec_" + "A" * 32).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # nor can the body be changed
        Webhook(SECRET).verify(body.replace(b"Boom", b"Calm"), headers)
    assert "webhook-signature" not in {k.lower() for k in plain} and json.loads(unsigned)


async def test_events_of_the_other_stripe_mode_are_refused_and_recorded(
        db: asyncpg.Pool, start_service) -> None:
    webhook = start_service("webhook")  # a test-mode key (sk_test_...)
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=4)
    res = await new_hold(db, ev, 2)
    body = json.loads(event("payment_intent.succeeded", payment_intent(new_pi(), res)))
    body["livemode"] = True
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, raw)
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM webhook_events_log WHERE event_id = $1 AND processing_status = 'failed'",
        body["id"]), what="the event to be refused")
    assert "live-mode event for a test-mode key" in row["last_error"]
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", res) == "active"
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    await eventually(lambda: _logged(webhook, "live-mode event"), what="the refusal reported")
    # the same event in test mode is applied
    body["id"], body["livemode"] = f"evt_{uuid.uuid4().hex}", False
    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, json.dumps(body).encode())
    await eventually(lambda: log_status(db, body["id"]), what="the test-mode event")
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", res) == "completed"


async def _logged(proc, text: str) -> bool:
    return text in proc.logs()


def test_signer_accepts_the_format_standard_webhooks_defines() -> None:
    sign = alerts.signer(SECRET)
    assert sign is not None and alerts.signer(None) is None
    now = datetime.now(UTC)
    sig = sign.sign("id-1", now, "{}")
    Webhook(SECRET).verify("{}", {"webhook-id": "id-1", "webhook-timestamp": str(int(time.time())),
                                  "webhook-signature": sig})
