"""The alert relay: publishes the alerts decided with their reports, and posts them to a webhook.

An alert row is written in the same transaction as the reports that caused it (``store``);
this relay publishes it to ``alerts.<level>`` with the alert id (the group id plus its window)
as ``Nats-Msg-Id``, then posts it to ``ALERT_WEBHOOK_URL`` when one is set. Rows are claimed
with ``FOR UPDATE SKIP LOCKED`` so replicas share the work; a crash retries from the table.

The two deliveries fail for different reasons and are counted apart: a failed publish (our own
bus is away) is logged and retried without end, with back-off up to a minute, and leaves the
webhook's budget alone; a failed post (someone else's endpoint) is retried with exponential
back-off up to ``MAX_ATTEMPTS`` times. After a failed publish the rest of the round waits: the
bus that refused one alert would make each of the others wait for its timeout too.

With ``ALERT_WEBHOOK_SECRET`` set, every post is signed as the Standard Webhooks specification
says (``webhook-id`` = the alert id, the same on every retry so the receiver can deduplicate;
``webhook-timestamp``; ``webhook-signature``), so the receiver can tell our alerts from forged
ones with any Standard Webhooks library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import prometheus_client
from standardwebhooks.webhooks import Webhook

from boxoffice import background, db, errors
from boxoffice.bus import Bus
from boxoffice.wire.subjects import alert as alert_subject

log = logging.getLogger("boxoffice.error_sink.alerts")

MAX_ATTEMPTS = 12  # posts to the webhook; publishing is never given up
PUBLISH_LOUD_AFTER = 12  # failed publishes of one alert before that is an ERROR, not a warning
SENT = prometheus_client.Counter("boxoffice_error_alerts_total", "Alerts published", ["level"])
FAILED = prometheus_client.Counter("boxoffice_error_alert_failures_total",
                                   "Failed deliveries of alerts", ["kind"])  # publish, webhook

BATCH = 50  # alerts a pass handles at most
CLAIM = f"""
SELECT id, level, payload::text AS payload, published_at, notified_at, attempts, publish_attempts
FROM error_alerts
WHERE (published_at IS NULL OR (notified_at IS NULL AND $1 AND attempts < $2))
  AND next_attempt <= now()
ORDER BY next_attempt LIMIT {BATCH}
FOR UPDATE SKIP LOCKED
"""
# $4: the publish failed (then no post was tried); $5: the post failed
DONE = """
UPDATE error_alerts SET published_at = coalesce(published_at, $2),
       notified_at = coalesce(notified_at, $3),
       publish_attempts = publish_attempts + $4::int, attempts = attempts + $5::int,
       next_attempt = now() + make_interval(secs => CASE WHEN $4::int > 0
                          THEN least(60, 2 ^ (publish_attempts + 1))
                          ELSE least(600, 2 ^ (attempts + $5::int)) END),
       last_error = $6
WHERE id = $1
"""


def _text(payload: dict) -> str:
    return (f"[{payload['level']}] {payload['service']}: {payload['title']} "
            f"({payload['count']} in total"
            + (f", {payload['window_count']} this minute" if payload["reason"] == "rate" else "")
            + ")")


def signer(secret: str | None) -> Webhook | None:
    """The Standard Webhooks signer of ``ALERT_WEBHOOK_SECRET`` (``whsec_`` + base64)."""
    return Webhook(secret) if secret else None


async def _post(session: aiohttp.ClientSession, url: str, payload: dict, alert_id: str = "",
                sign: Webhook | None = None) -> str | None:
    """Post one alert; None when the webhook took it, else why not (never the URL)."""
    body = json.dumps({"text": _text(payload), "alert": payload})
    headers = {"Content-Type": "application/json"}
    if sign is not None:
        now = datetime.now(UTC)
        headers.update({"webhook-id": alert_id, "webhook-timestamp": str(int(now.timestamp())),
                        "webhook-signature": sign.sign(alert_id, now, body)})
    try:
        async with session.post(url, data=body.encode(), headers=headers) as resp:
            if 200 <= resp.status < 300:
                return None
            return f"webhook answered {resp.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return f"webhook unreachable: {type(exc).__name__}"


async def relay_once(pool: asyncpg.Pool, bus: Bus, session: aiohttp.ClientSession,
                     webhook_url: str | None, sign: Webhook | None = None) -> int:
    """Handle the alerts that are due; returns how many were handled (0 when the bus refused:
    the caller then waits before the next round)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(CLAIM, webhook_url is not None, MAX_ATTEMPTS)
        for row in rows:
            published = row["published_at"]
            if published is None:
                try:
                    await bus.publish(alert_subject(row["level"]), row["payload"].encode(), row["id"])
                except errors.ServiceUnavailable as exc:
                    await _publish_failed(conn, row, exc.detail)
                    return 0  # the others stay due, untouched, for the next round
                published = await conn.fetchval("SELECT now()")
                SENT.labels(row["level"]).inc()
            notified, error = row["notified_at"], None
            if webhook_url and notified is None:
                error = await _post(session, webhook_url, json.loads(row["payload"]),
                                    str(row["id"]), sign)
                if error is None:
                    notified = await conn.fetchval("SELECT now()")
                else:
                    FAILED.labels("webhook").inc()
                    if row["attempts"] + 1 >= MAX_ATTEMPTS:
                        log.error("alert %s: giving up on the webhook after %d attempts (%s)",
                                  row["id"], MAX_ATTEMPTS, error)
                    else:
                        log.warning("alert %s: %s, will retry", row["id"], error)
            await conn.execute(DONE, row["id"], published, notified, 0, 1 if error else 0, error)
    return len(rows)


async def _publish_failed(conn: asyncpg.Connection, row: asyncpg.Record, detail: str) -> None:
    """Count a failed publish (not a webhook attempt) and say so; ``detail`` names the failure's
    type only, never an address or a credential."""
    FAILED.labels("publish").inc()
    failures = row["publish_attempts"] + 1
    error = f"publish to ALERTS failed: {detail}"
    if failures == PUBLISH_LOUD_AFTER:
        log.error("alert %s: not published after %d attempts (%s), still retrying",
                  row["id"], failures, error)
    else:
        log.warning("alert %s: %s (attempt %d), will retry", row["id"], error, failures)
    await conn.execute(DONE, row["id"], None, row["notified_at"], 1, 0, error)


async def run(pool: asyncpg.Pool, bus: Bus, webhook_url: str | None, wake: asyncio.Event,
              stopping: asyncio.Event, sign: Webhook | None = None) -> None:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def step() -> int:
            try:
                return await relay_once(pool, bus, session, webhook_url, sign)
            except db.FAILURES as exc:
                log.warning("alert relay paused (%s)", type(exc).__name__)
                return 0

        await background.drain(step, stopping, wake, every=1.0, batch=BATCH)


@contextlib.asynccontextmanager
async def relay(pool: asyncpg.Pool, bus: Bus, webhook_url: str | None,
                webhook_secret: str | None = None) -> AsyncIterator[asyncio.Event]:
    """Run the relay in the background; yields the event that wakes it for new alerts."""
    wake = asyncio.Event()
    sign = signer(webhook_secret)

    async def relaying(stopping: asyncio.Event) -> None:
        await run(pool, bus, webhook_url, wake, stopping, sign)

    async with background.running("alert relay", relaying, grace=10, wake=wake):
        yield wake
