"""The alert relay's accounting: failed publishes to ALERTS and failed posts to the webhook are
counted apart, and a failed publish is logged (without the webhook's address)."""

from __future__ import annotations

import json
import logging
import uuid

import aiohttp
import nats

from boxoffice import bus as busmod
from boxoffice.error_sink import alerts

PAYLOAD = {"id": "", "group_id": "", "level": "critical", "reason": "level",
           "title": "LedgerCorrupt: drift", "service": "payment", "count": 1, "window_count": 1,
           "first_seen": "2026-11-28T12:00:00Z", "last_seen": "2026-11-28T12:00:00Z",
           "alerted_at": "2026-11-28T12:00:00Z"}


async def _alert(db) -> str:
    group = str(uuid.uuid4())
    alert_id = f"{group}:1"
    await db.execute("INSERT INTO error_alerts (id, group_id, level, reason, payload) "
                     "VALUES ($1, $2::uuid, 'critical', 'level', $3)",
                     alert_id, group, dict(PAYLOAD, id=alert_id, group_id=group))
    return alert_id


async def test_publish_failures_are_logged_and_spare_the_webhooks_attempts(
        db, nats_url, caplog, alert_endpoint) -> None:
    alert_endpoint.fail_with.append(502)  # the first post fails
    url, posted = alert_endpoint.url, alert_endpoint.posted
    alert_id = await _alert(db)

    async def row() -> dict:
        return dict(await db.fetchrow(
            "SELECT published_at, notified_at, attempts, publish_attempts, last_error "
            "FROM error_alerts WHERE id = $1", alert_id))

    async def relay(session: aiohttp.ClientSession, bus: busmod.Bus) -> int:
        await db.execute("UPDATE error_alerts SET next_attempt = now()")  # due again at once
        return await alerts.relay_once(db, bus, session, url)

    async with busmod.connect(nats_url, "alerts-test") as bus, aiohttp.ClientSession() as session:
        # no ALERTS stream yet: every publish is refused, more times than the webhook may fail
        caplog.set_level(logging.WARNING, logger="boxoffice.error_sink.alerts")
        for _ in range(alerts.MAX_ATTEMPTS + 2):
            await relay(session, bus)
        r = await row()
        assert r["publish_attempts"] == alerts.MAX_ATTEMPTS + 2 and r["attempts"] == 0
        assert r["published_at"] is None and not posted  # no post before the publish
        assert r["last_error"].startswith("publish to ALERTS failed")
        failures = [m for m in caplog.messages if alert_id in m and "publish" in m]
        assert len(failures) == alerts.MAX_ATTEMPTS + 2
        assert any(rec.levelno == logging.ERROR for rec in caplog.records)  # said loudly once
        # the bus takes it: published, then the webhook's own attempts begin
        await bus.declare_streams("ALERTS")
        assert await relay(session, bus) == 1
        r = await row()
        assert r["published_at"] is not None and r["notified_at"] is None
        assert r["attempts"] == 1 and r["publish_attempts"] == alerts.MAX_ATTEMPTS + 2
        assert r["last_error"] == "webhook answered 502"
        assert await relay(session, bus) == 1
        r = await row()
        assert r["notified_at"] is not None and r["attempts"] == 1 and r["last_error"] is None
        assert [p["alert"]["id"] for p in posted] == [alert_id, alert_id]
        assert await relay(session, bus) == 0  # nothing left to do
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe("alerts.>", ordered_consumer=True)
        assert json.loads((await sub.next_msg(timeout=5)).data)["id"] == alert_id
    finally:
        await nc.close()
    assert "secret-token" not in caplog.text
