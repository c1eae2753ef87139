"""The service runtime: health, readiness, metrics, refusal on an unmigrated database, and
graceful shutdown on SIGTERM (exit 0)."""

from __future__ import annotations

import json
import urllib.request
import uuid

import asyncpg
import pytest

from tests.harness import http_ready, with_db

SERVICES = ["ingress", "payment", "webhook", "error_sink", "reaper"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("service", SERVICES)
async def test_service_serves_health_and_stops_cleanly(service: str, start_service) -> None:
    proc = start_service(service)
    status, body = get(f"{proc.url}/healthz")
    assert status == 200 and json.loads(body)["service"] == service
    status, body = get(f"{proc.url}/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert ready["checks"]["nats"] is True
    assert ("postgres" in ready["checks"]) == (service != "ingress")
    status, body = get(f"{proc.health_url}/metrics")
    assert status == 200 and b"python_info" in body
    if service == "ingress":  # never on the public listener
        status, _ = get(f"{proc.url}/metrics")
        assert status == 404
        status, _ = get(f"{proc.health_url}/readyz")
        assert status == 200
    assert proc.stop() == 0
    assert f"{service} stopped" in proc.logs()


async def test_readiness_follows_the_bus(start_service, nats_server) -> None:
    proc = start_service("payment")
    nats_server.kill()
    assert proc.running
    for _ in range(100):
        status, _ = get(f"{proc.url}/readyz")
        if status == 503:
            break
        import time
        time.sleep(0.1)
    assert status == 503
    nats_server.start()
    proc.wait_ready(30)
    assert http_ready(f"{proc.url}/readyz")


@pytest.mark.parametrize("service", ["payment", "reaper"])
async def test_refuses_to_start_on_unmigrated_database(service: str, start_service,
                                                       pg_admin_url: str) -> None:
    name = f"empty_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        proc = start_service(service, wait=False, DATABASE_URL=with_db(pg_admin_url, name))
        assert proc.proc is not None
        code = proc.proc.wait(60)
        assert code != 0
        assert "boxoffice migrate" in proc.logs()
    finally:
        conn = await asyncpg.connect(pg_admin_url)
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.close()
