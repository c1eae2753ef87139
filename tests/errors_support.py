"""Helpers shared by the tests/test_errors_*.py files (no tests here)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any

import asyncpg
import nats

from boxoffice import bus as busmod


def report(i: int = 0, **fields: Any) -> dict[str, Any]:
    body = {"id": str(uuid.uuid4()), "occurred_at": datetime.now(timezone.utc).isoformat(),
            "service": "payment", "level": "error", "message": f"order {i} could not be charged",
            "error_type": "ChargeFailed"}
    body.update(fields)
    return body


async def publish(nats_url: str, bodies: list[dict[str, Any]], *, concurrency: int = 256,
                  subject: str | None = None) -> None:
    """Publish reports to ERRORS (declared here if needed), each acked by JetStream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            await js.add_stream(busmod.stream_config("ERRORS"))
        except Exception:  # noqa: BLE001 - exists already
            pass
        sem = asyncio.Semaphore(concurrency)

        async def one(b: dict[str, Any]) -> None:
            async with sem:
                subj = subject or f"errors.{b.get('service', 'x')}.{b.get('level', 'error')}"
                await js.publish(subj, json.dumps(b).encode(), headers={"Nats-Msg-Id": b["id"]},
                                 timeout=30)

        await asyncio.gather(*(one(b) for b in bodies))
    finally:
        await nc.close()


async def publish_raw(nats_url: str, subject: str, data: bytes, msg_id: str | None = None) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            await js.add_stream(busmod.stream_config("ERRORS"))
        except Exception:  # noqa: BLE001
            pass
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
