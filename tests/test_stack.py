"""`boxoffice up` end to end: embedded servers, ready, stack.env, each service on its own
PostgreSQL role, a killed service restarted, data kept across restarts, and one SIGINT leaving no
process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

from boxoffice import bus as busmod
from boxoffice import bus_access, roles
from boxoffice.embedded import free_port
from boxoffice.stack import STACK_KEYS, read_env
from tests.harness import http_ready
from tests.stack_support import start_stack, stop_stack


def admin(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def _services_use_their_own_roles(home: Path, owner_url: str) -> None:
    """Each service logs into PostgreSQL with its own role, whose random password is kept in
    secrets.env (mode 0600) and checked by the server; stack.env keeps the owner's URL."""
    kept = home / "secrets.env"
    assert kept.stat().st_mode & 0o777 == 0o600
    passwords = {s: read_env(kept)[roles.password_variable(s)] for s in roles.ROLES}
    conn = await asyncpg.connect(owner_url)
    try:
        users = {r[0] for r in await conn.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")}
    finally:
        await conn.close()
    assert users == set(roles.ROLES.values()), users
    for service, password in passwords.items():
        assert len(password) >= 24
        conn = await asyncpg.connect(roles.url_for(owner_url, service, password))
        assert await conn.fetchval("SELECT current_user") == roles.ROLES[service]
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(roles.url_for(owner_url, service, password[::-1]))


def _services_use_their_own_nats_users(home: Path, env: dict[str, str]) -> None:
    """Each service connects to the embedded nats-server as its own user (its random password
    kept in secrets.env); the server's configuration, passwords in it, is private; stack.env
    has the operator's NATS_URL and the reporter's NATS_REPORTER_URL."""
    kept = read_env(home / "secrets.env")
    assert (home / "nats" / "nats.conf").stat().st_mode & 0o777 == 0o600
    assert bus_access.user_of(env["NATS_URL"]) == bus_access.OPERATOR
    assert bus_access.user_of(env["NATS_REPORTER_URL"]) == bus_access.REPORTER
    services = json.loads((home / "services.json").read_text())
    for service, info in services.items():
        url = psutil.Process(info["pid"]).environ()["NATS_URL"]
        password = kept[bus_access.password_variable(service)]
        assert len(password) >= 24 and url == bus_access.with_user(
            bus_access.without_user(env["NATS_URL"]), service, password), service


def test_up_ready_restart_and_clean_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    proc, lines = start_stack(home, port)
    try:
        ready_line = next(line for line in lines if "ingress listening on" in line)
        assert f"http://127.0.0.1:{port}" in ready_line
        env = read_env(home / "stack.env")
        assert set(STACK_KEYS) <= set(env) and all(env[k] for k in STACK_KEYS)
        assert env["FRONTEND_SENTRY_DSN"].startswith("http://") and f":{port}/" in env["FRONTEND_SENTRY_DSN"]
        assert http_ready(f"{env['INGRESS_URL']}/readyz")
        status = subprocess.run([sys.executable, "-m", "boxoffice.cli", "status"],
                                env={**os.environ, "BOXOFFICE_HOME": str(home)},
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        asyncio.run(_services_use_their_own_roles(home, env["DATABASE_URL"]))
        _services_use_their_own_nats_users(home, env)

        # the demo event is seeded; an event created now must survive a restart
        demo = admin(env["INGRESS_URL"], env["ADMIN_API_TOKEN"], "GET",
                     f"/v1/admin/events/{env['DEMO_EVENT_ID']}")
        assert demo["capacity"] > 0
        created = admin(env["INGRESS_URL"], env["ADMIN_API_TOKEN"], "POST", "/v1/admin/events",
                        {"name": "Persisted", "capacity": 7, "price": 100, "currency": "eur"})

        # kill a service: it is restarted and the stack becomes ready again
        services = json.loads((home / "services.json").read_text())
        victim = services["payment"]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = json.loads((home / "services.json").read_text())["payment"]["pid"]
            if now != victim and http_ready(services["payment"]["ready"]):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("payment was not restarted")
        status = subprocess.run([sys.executable, "-m", "boxoffice.cli", "status"],
                                env={**os.environ, "BOXOFFICE_HOME": str(home)},
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0
    finally:
        family = stop_stack(proc)
    assert len(family) >= 8  # five services and three embedded servers at least
    _gone, alive = psutil.wait_procs(list(family), timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    status = subprocess.run([sys.executable, "-m", "boxoffice.cli", "status"],
                            env={**os.environ, "BOXOFFICE_HOME": str(home)},
                            capture_output=True, text=True, timeout=30)
    assert status.returncode != 0

    # a second start on the same directory keeps the data
    proc, _ = start_stack(home, port)
    try:
        env = read_env(home / "stack.env")
        again = admin(env["INGRESS_URL"], env["ADMIN_API_TOKEN"], "GET",
                      f"/v1/admin/events/{created['id']}")
        assert again["name"] == "Persisted" and again["capacity"] == 7
    finally:
        family = stop_stack(proc)
    _, alive = psutil.wait_procs(list(family), timeout=10)
    assert not alive


def test_up_with_a_nats_cluster_of_three(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc, lines = start_stack(home, free_port(), BOXOFFICE_NATS_NODES="3")
    try:
        assert any("cluster of 3 nodes" in line for line in lines), lines
        env = read_env(home / "stack.env")
        servers = env["NATS_URL"].split(",")
        assert len(servers) == 3
        assert {bus_access.user_of(s) for s in servers} == {bus_access.OPERATOR}
        for n in (1, 2, 3):  # each node its own store; its configuration (passwords) private
            node = home / "nats" / f"n{n}"
            assert (node / "nats.conf").stat().st_mode & 0o777 == 0o600
            assert (node / "jetstream").is_dir()
        for service, info in json.loads((home / "services.json").read_text()).items():
            senv = psutil.Process(info["pid"]).environ()
            assert [bus_access.without_user(s) for s in senv["NATS_URL"].split(",")] == [
                bus_access.without_user(s) for s in servers], service
            assert {bus_access.user_of(s) for s in senv["NATS_URL"].split(",")} == {service}
            assert senv["NATS_STREAM_REPLICAS"] == "3"

        assert {r for r, _ in asyncio.run(_streams(env["NATS_URL"])).values()} == {3}
        req = urllib.request.Request(
            f"{env['INGRESS_URL']}/v1/reservations", method="POST",
            data=json.dumps({"event_id": env["DEMO_EVENT_ID"], "quantity": 1}).encode(),
            headers={"Authorization": f"Bearer {env['CLIENT_API_TOKEN']}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
        deadline = time.monotonic() + 20
        while (kept := asyncio.run(_streams(env["NATS_URL"])))["RESERVATIONS"][1] < 1:
            assert time.monotonic() < deadline, "the hold's event never reached RESERVATIONS"
            time.sleep(0.2)
    finally:
        family = stop_stack(proc)
    assert len(family) >= 10  # five services, three nats-servers, PostgreSQL, localstripe
    _, alive = psutil.wait_procs(list(family), timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"

    # started again on the same stores, the cluster has every message it had
    proc, _ = start_stack(home, free_port(), BOXOFFICE_NATS_NODES="3")
    try:
        # a restarted cluster answers for a stream once it has elected that stream's leader
        again = asyncio.run(_streams(read_env(home / "stack.env")["NATS_URL"], patience=60))
        assert all(again[name][1] >= kept[name][1] for name in kept), (kept, again)
    finally:
        family = stop_stack(proc)
    _, alive = psutil.wait_procs(list(family), timeout=10)
    assert not alive


async def _streams(url: str, patience: float = 0.0) -> dict[str, tuple[int, int]]:
    """Each stream's replicas and messages; a stream that does not answer yet (no leader) is
    asked again for up to ``patience`` seconds."""
    async with busmod.connect(url, "test") as bus:
        out = {}
        for name in ("STRIPE_EVENTS", "ERRORS", "RESERVATIONS", "PAYMENTS"):
            deadline = time.monotonic() + patience
            while True:
                try:
                    info = await bus.js.stream_info(name)
                    break
                except (TimeoutError, nats.errors.Error):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            out[name] = (info.config.num_replicas, info.state.messages)
        return out


def test_up_refuses_another_number_of_nats_nodes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "up"], capture_output=True,
                       text=True, timeout=60,
                       env={**env, "BOXOFFICE_HOME": str(tmp_path), "BOXOFFICE_NATS_NODES": "2"})
    assert r.returncode == 1
    assert "BOXOFFICE_NATS_NODES must be 1 or 3" in r.stderr
    assert not (tmp_path / "nats").exists()
