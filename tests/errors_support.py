"""Helpers of the tests/test_errors_*.py files: error reports published to ERRORS, Sentry
envelopes and browser events sent to ingress, and HTTP calls."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats

from boxoffice import bus as busmod
from tests.harness import ADMIN_TOKEN, SENTRY_KEY

# an operator's credentials on the admin routes
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# what a Sentry SDK sends with every envelope
AUTH = {"X-Sentry-Auth": f"Sentry sentry_key={SENTRY_KEY}, sentry_version=7, sentry_client=test/1.0"}


def browser_event(**fields) -> dict:
    """An error event as a Sentry browser SDK sends it; ``fields`` replace its own."""
    event = {"event_id": uuid.uuid4().hex, "timestamp": 1_790_000_000.5, "platform": "javascript",
             "level": "error", "tags": {"service": "checkout-web"}, "environment": "production",
             "exception": {"values": [{"type": "TypeError", "value": "cart is undefined",
                                       "stacktrace": {"frames": [
                                           {"filename": "https://shop.example/node_modules/react/index.js",
                                            "function": "render", "lineno": 1, "in_app": False},
                                           {"filename": "https://shop.example/static/cart.js",
                                            "function": "addToCart", "lineno": 88, "in_app": True}]}}]},
             "request": {"url": "https://shop.example/cart", "headers": {"Cookie": "session=s3cr3tvalue"}},
             "user": {"id": "u-1", "email": "bob@example.com", "ip_address": "10.0.0.1"}}
    event.update(fields)
    return event


def envelope(*items: tuple[dict, bytes], header: dict | None = None) -> bytes:
    """A Sentry envelope of ``items`` (item header, payload) under ``header``."""
    out = [json.dumps(header if header is not None else {"event_id": uuid.uuid4().hex}).encode()]
    for item_header, payload in items:
        out += [json.dumps(item_header).encode(), payload]
    return b"\n".join(out) + b"\n"


def report(i: int = 0, **fields: Any) -> dict[str, Any]:
    body = {"id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(),
            "service": "payment", "level": "error", "message": f"order {i} could not be charged",
            "error_type": "ChargeFailed"}
    body.update(fields)
    return body


async def _declare_errors(js: Any) -> None:
    """The ERRORS stream, declared unless it exists already (as the services declare it)."""
    try:
        await js.add_stream(busmod.stream_config("ERRORS"))
    except Exception:  # noqa: BLE001 - exists already
        pass


async def publish(nats_url: str, bodies: list[dict[str, Any]], *, concurrency: int = 256,
                  subject: str | None = None) -> None:
    """Publish reports to ERRORS (declared here if needed), each acked by JetStream."""
    await publish_messages(nats_url, [
        (subject or f"errors.{b.get('service', 'x')}.{b.get('level', 'error')}",
         json.dumps(b).encode(), b["id"]) for b in bodies], concurrency=concurrency)


async def publish_messages(nats_url: str, messages: list[tuple[str, bytes, str]], *,
                           concurrency: int = 256) -> None:
    """Publish (subject, body, Nats-Msg-Id) to ERRORS (declared here if needed), each acked."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await _declare_errors(js)
        sem = asyncio.Semaphore(concurrency)

        async def one(subject: str, data: bytes, msg_id: str) -> None:
            async with sem:
                await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=30)

        await asyncio.gather(*(one(*m) for m in messages))
    finally:
        await nc.close()


async def publish_raw(nats_url: str, subject: str, data: bytes, msg_id: str | None = None) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await _declare_errors(js)
        await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
    finally:
        await nc.close()


async def count(db: asyncpg.Pool, sql: str = "SELECT count(*) FROM error_logs", *args: Any) -> int:
    return await db.fetchval(sql, *args)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def ahttp(method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http, method, url, body, headers)


async def admin_json(url: str) -> Any:
    """GET an admin route as an operator: it answers 200; its JSON."""
    status, _, body = await ahttp("GET", url, None, ADMIN)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)
