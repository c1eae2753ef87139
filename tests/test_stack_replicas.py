"""`boxoffice up` with two replicas of ingress, payment and webhook (BOXOFFICE_REPLICAS): each
replica its own supervised process on its own health port, listed by `boxoffice status`, the two
ingresses on one public port; holds, payments and Stripe's webhooks go through them and each is
done once. A malformed count is refused before
anything starts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import psutil
import pytest

from boxoffice.embedded import free_port
from boxoffice.stack import read_env
from tests.harness import http_ready, in_one_snapshot
from tests.stack_support import start_stack, stop_stack

BUYERS = 6  # enough that, shared between two replicas, both are likely to take some


def client(env: dict[str, str], path: str, body: dict, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {env['CLIENT_API_TOKEN']}",
               "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(env["INGRESS_URL"] + path, method="POST",
                                 data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=15) as resp:
        assert resp.status == 201, resp.status
        return json.loads(resp.read())


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", *args],
                          env={**os.environ, "BOXOFFICE_HOME": str(home)},
                          capture_output=True, text=True, timeout=60)


async def _ledger(url: str, pis: list[str]) -> dict[str, list]:
    # one snapshot: read one table at a time, a webhook's transaction committing between two
    # reads showed its hold completed and its event processed beside the payment as it was
    # before (CI saw it 'created')
    return await in_one_snapshot(url, lambda conn: _read_ledger(conn, pis))


async def _read_ledger(conn: asyncpg.Connection, pis: list[str]) -> dict[str, list]:
    return {
        "intents": [tuple(r) for r in await conn.fetch(
            "SELECT stripe_payment_intent_id, attempts FROM payment_intents_log "
            "WHERE stripe_payment_intent_id = ANY($1)", pis)],
        "payments": [tuple(r) for r in await conn.fetch(
            "SELECT payment_intent_id, status FROM payments WHERE payment_intent_id = ANY($1)",
            pis)],
        "events": [tuple(r) for r in await conn.fetch(
            "SELECT payload->'data'->'object'->>'id', processing_status, attempts "
            "FROM webhook_events_log WHERE event_type = 'payment_intent.succeeded' "
            "AND payload->'data'->'object'->>'id' = ANY($1)", pis)],
        "sold": [r[0] for r in await conn.fetch(
            "SELECT r.status FROM reservations r JOIN payments p "
            "ON p.reservation_id = r.id WHERE p.payment_intent_id = ANY($1)", pis)],
    }


def test_two_replicas_of_ingress_payment_and_webhook(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc, lines = start_stack(home, free_port(), BOXOFFICE_REPLICAS="ingress=2, payment=2, webhook=2")
    try:
        assert any("replicas: ingress=2, payment=2, webhook=2" in line for line in lines), lines
        services = json.loads((home / "services.json").read_text())
        names = {"ingress", "ingress-2", "payment", "payment-2", "webhook", "webhook-2", "error_sink", "reaper"}
        assert set(services) == names
        pids = {info["pid"] for info in services.values()}
        assert len(pids) == len(names)
        assert len({info["ready"] for info in services.values()}) == len(names)  # own ports
        for name in ("ingress", "ingress-2", "payment", "payment-2", "webhook", "webhook-2"):
            assert psutil.pid_exists(services[name]["pid"]) and http_ready(services[name]["ready"])
            assert (home / "logs" / f"{name}.log").exists()
        status = cli(home, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert {line.split()[0] for line in status.stdout.splitlines()} == names

        env = read_env(home / "stack.env")
        pis = []
        for _ in range(BUYERS):
            hold = client(env, "/v1/reservations", {"event_id": env["DEMO_EVENT_ID"], "quantity": 1},
                          key=str(uuid.uuid4()))
            pi = client(env, "/v1/payment_intents", {"reservation_id": hold["id"]},
                        key=str(uuid.uuid4()))
            pis.append(pi["id"])
        for pi in pis:
            paid = cli(home, "dev", "pay", pi)
            assert paid.returncode == 0, paid.stdout + paid.stderr

        deadline = time.monotonic() + 60
        while True:
            ledger = asyncio.run(_ledger(env["DATABASE_URL"], pis))
            if ledger["sold"].count("completed") == BUYERS and len(ledger["events"]) == BUYERS \
                    and all(s == "processed" for _, s, _ in ledger["events"]):
                break
            assert time.monotonic() < deadline, ledger
            time.sleep(0.3)
        # each intent created once, each payment recorded once, each event applied once
        assert sorted(ledger["intents"]) == sorted((pi, 1) for pi in pis)
        assert sorted(ledger["payments"]) == sorted((pi, "succeeded") for pi in pis)
        assert sorted(ledger["events"]) == sorted((pi, "processed", 1) for pi in pis)
        assert ledger["sold"] == ["completed"] * BUYERS

        # both replicas of each are still the processes they were: alive, ready, never restarted
        again = json.loads((home / "services.json").read_text())
        assert {n: i["pid"] for n, i in again.items()} == {n: i["pid"] for n, i in services.items()}
        assert all(http_ready(again[n]["ready"])
                   for n in ("ingress", "ingress-2", "payment", "payment-2", "webhook", "webhook-2"))
        # the two ingresses listen on the one public port
        port = int(env["INGRESS_URL"].rsplit(":", 1)[1])
        for name in ("ingress", "ingress-2"):
            listening = {c.laddr.port for c in psutil.Process(again[name]["pid"]).net_connections()
                         if c.status == psutil.CONN_LISTEN}
            assert port in listening, name
    finally:
        family = stop_stack(proc)
    _, alive = psutil.wait_procs(list(family), timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"


@pytest.mark.parametrize("value", ["payment=0", "payment", "payment=2,payment=3", "billing=2",
                                   "payment=x", "payment=99"])
def test_up_refuses_a_malformed_replica_count(tmp_path: Path, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "up"], capture_output=True,
                       text=True, timeout=60,
                       env={**env, "BOXOFFICE_HOME": str(tmp_path), "BOXOFFICE_REPLICAS": value})
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "BOXOFFICE_REPLICAS must be" in r.stderr
    assert not (tmp_path / "nats").exists() and not (tmp_path / "pgdata").exists()
