"""`docker compose up` proven without a Docker engine: docker-compose.yml (every profile, as
`docker-compose config` interpolates it) run with real processes by tests/compose_support.py,
each service with exactly its command, environment and start order; then a checkout through it,
its health checks, its volumes and its stop."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import stripe

from boxoffice import SERVICES, roles
from boxoffice.spool import bus_digest
from tests.bus_support import connection_refused
from tests.compose_images import PostgresImage, ProjectImage
from tests.compose_support import ComposeStack, compose_config
from tests.harness import eventually
from tests.webhooks_support import event, pay_at_stripe, sign

# what a user would set in the shell before `docker compose up`, so that a hold expires in the test
TTL = 10
CONDITION_EVENT = {"service_started": "started", "service_healthy": "healthy",
                   "service_completed_successfully": "exited"}


@contextmanager
def running(cfg: dict) -> Iterator[ComposeStack]:
    run_dir = Path(tempfile.mkdtemp(prefix="boxoffice-compose-"))
    stack = None
    try:
        stack = ComposeStack(cfg, run_dir)
        stack.up()
        yield stack
    finally:
        if stack is not None:
            stack.down()
        shutil.rmtree(run_dir, ignore_errors=True)


def logs(stack: ComposeStack, name: str) -> str:
    return stack.log_tail(stack.containers[name])


def dependents(cfg: dict, of: str) -> set[str]:
    """Every service that waits on ``of``, directly or not."""
    found: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, spec in cfg["services"].items():
            if name not in found and set(spec.get("depends_on") or {}) & (found | {of}):
                found.add(name)
                grew = True
    return found


# first, before the module's stack exists: two stacks at once would only slow both down
def test_a_service_whose_condition_fails_is_not_started() -> None:
    cfg = compose_config()
    cfg["services"]["migrate"]["command"] = ["migrate", "--no-such-option"]  # a failing migrate
    with running(cfg) as stack:
        migrate = stack.containers["migrate"]
        assert (migrate.state, migrate.exit_code) == ("exited", 2), logs(stack, "migrate")
        waiting = dependents(cfg, "migrate")
        assert {"payment", "webhook", "error-sink", "reaper"} <= waiting
        for name in waiting:
            c = stack.containers[name]
            assert c.state == "blocked" and c.proc is None and not c.log.exists(), (name, c.state)
        for name in set(cfg["services"]) - waiting - {"migrate"}:  # their conditions held
            assert stack.containers[name].state in ("healthy", "exited", "running"), \
                (name, stack.states())
        assert stack.containers["ingress"].state == "healthy"


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    with running(compose_config({"RESERVATION_TTL_SECONDS": str(TTL)})) as s:
        yield s


def test_every_service_starts_in_the_order_the_file_gives(stack: ComposeStack) -> None:
    for name, c in stack.containers.items():
        if c.healthcheck:
            assert c.state == "healthy", (name, c.state, logs(stack, name))
        elif c.spec.get("restart") == "no":  # a one-shot step
            assert (c.state, c.exit_code) == ("exited", 0), (name, logs(stack, name))
        else:
            assert c.state == "running", (name, c.state, logs(stack, name))
        for dep, cond in (c.spec.get("depends_on") or {}).items():
            event = CONDITION_EVENT[cond.get("condition", "service_started")]
            assert stack.containers[dep].times[event] <= c.times["started"], (name, dep, event)
    # the one-shot migrate step ran first for every service that uses the database
    for name in SERVICES:
        name = name.replace("_", "-")
        if "DATABASE_URL" in (stack.containers[name].spec.get("environment") or {}):
            migrated = stack.containers["migrate"].times["exited"]
            assert migrated <= stack.containers[name].times["started"], name


def test_each_process_gets_exactly_the_environment_the_file_gives(stack: ComposeStack) -> None:
    for name, c in stack.containers.items():
        if c.proc is None or c.proc.poll() is not None or not isinstance(c.image, ProjectImage):
            continue
        raw = Path(f"/proc/{c.proc.pid}/environ").read_bytes()
        env = dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)
        given = {k for k, v in (c.spec.get("environment") or {}).items() if v is not None}
        image = set(c.image.dockerfile.env) | {"PATH", "HOME"}
        assert set(env) == given | image, (name, set(env) ^ (given | image))
        for key in given:  # as written, but for this run's addresses and paths
            assert env[key] == stack.env_value(name, str(c.spec["environment"][key])), (name, key)


def test_every_health_check_in_the_file_passes(stack: ComposeStack) -> None:
    checked = set()
    for name, c in stack.containers.items():
        if c.healthcheck:
            r = stack.probe(c)
            assert r.returncode == 0, (name, c.healthcheck["test"], r.stdout, r.stderr)
            checked.add(name)
    assert {"nats", "postgres", "localstripe", "ingress", "payment", "webhook", "error-sink",
            "reaper"} <= checked


def published(stack: ComposeStack, name: str) -> str:
    """The address of ``name``'s first published port."""
    p = stack.containers[name].spec["ports"][0]
    target = int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1])
    return f"http://127.0.0.1:{stack.port(name, target)}"


def first(values: str) -> str:
    return values.split(",")[0].strip()


async def test_checkout_payment_expiry_and_error_report(stack: ComposeStack) -> None:
    base = published(stack, "ingress")
    ingress_env = stack.containers["ingress"].env
    client = {"Authorization": f"Bearer {first(ingress_env['CLIENT_API_TOKENS'])}"}
    admin = {"Authorization": f"Bearer {first(ingress_env['ADMIN_API_TOKENS'])}"}
    payment_env = stack.containers["payment"].env
    assert payment_env["RESERVATION_TTL_SECONDS"] == str(TTL)  # interpolated from the shell
    sc = stripe.StripeClient(payment_env["STRIPE_API_KEY"],
                             base_addresses={"api": payment_env["STRIPE_API_BASE"]})
    db = await asyncpg.connect(stack.containers["migrate"].env["DATABASE_URL"])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/admin/events", headers=admin, json={
                    "name": "Compose", "capacity": 3, "price": 1500, "currency": "eur"}) as r:
                assert r.status == 201, await r.text()
                event_id = (await r.json())["id"]
            holds = []
            for _ in range(2):
                async with s.post(f"{base}/v1/reservations", headers=client,
                                  json={"event_id": event_id, "quantity": 1}) as r:
                    assert r.status == 201, await r.text()
                    holds.append((await r.json())["id"])
            paid, abandoned = holds
            async with s.post(f"{base}/v1/payment_intents",
                              headers={**client, "Idempotency-Key": f"compose-{uuid.uuid4()}"},
                              json={"reservation_id": paid}) as r:
                assert r.status == 201, await r.text()
                pi = await r.json()
            assert pi["amount"] == 1500

            # the buyer's card, confirmed at Stripe (Stripe.js in a browser)
            assert await asyncio.to_thread(pay_at_stripe, sc, pi["id"]) == "succeeded"

            async def status(rid: str) -> str:
                return await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                                         uuid.UUID(rid))

            async def completed() -> bool:
                return await status(paid) == "completed"

            async def expired() -> bool:
                return await status(abandoned) == "expired"

            # Stripe's webhook, signed with the file's secret, reaches ingress and the webhook service
            await eventually(completed, 30, "the paid hold completed")
            assert await db.fetchval("SELECT processing_status FROM webhook_events_log WHERE "
                                     "event_type = 'payment_intent.succeeded' AND "
                                     "payload->'data'->'object'->>'id' = $1", pi["id"]) == "processed"
            # the other hold is released by the reaper (its status in the table, not only read so)
            await eventually(expired, TTL + 15, "the hold expired")
            async with s.get(f"{base}/v1/admin/events/{event_id}", headers=admin) as r:
                counts = await r.json()
            assert (counts["sold"], counts["held"], counts["available"]) == (1, 0, 2), counts

            report = {"id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(),
                      "service": "shop-web", "level": "error", "message": "checkout button broke"}
            async with s.post(f"{base}/v1/errors", headers=client, json=report) as r:
                assert r.status == 202, await r.text()
        stored = await eventually(lambda: db.fetchrow(
            "SELECT service, severity, error_message FROM error_logs WHERE id = $1",
            uuid.UUID(report["id"])), 20, "the error report stored")
        assert tuple(stored) == ("shop-web", "error", "checkout button broke")
    finally:
        await db.close()


async def test_each_service_logs_into_postgresql_with_its_own_role(stack: ComposeStack) -> None:
    # the migrate step gave each role LOGIN and the password of its service's DATABASE_URL
    db = await asyncpg.connect(stack.containers["migrate"].env["DATABASE_URL"])
    try:
        users = {r[0] for r in await db.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")}
    finally:
        await db.close()
    assert users == set(roles.ROLES.values()), users
    for service, role in roles.ROLES.items():
        assert urlsplit(stack.containers[service.replace("_", "-")].env["DATABASE_URL"]
                        ).username == role


async def test_nats_takes_no_anonymous_connection_and_refused_no_service_anything(
        stack: ComposeStack) -> None:
    # (every service connected as its own user and did its part of the flows above)
    assert "Violation" not in stack.containers["nats"].log.read_text(errors="replace")
    address = f"nats://127.0.0.1:{stack.port('nats', 4222)}"
    assert "Authorization Violation" in await connection_refused(address)


async def test_volumes_hold_what_the_services_write(stack: ComposeStack) -> None:
    assert set(stack.volumes) == set(stack.cfg.get("volumes") or {}), "a volume no service uses"
    # PostgreSQL's data directory is the pg-data volume (PGDATA, where the image keeps it)
    (pg,) = [c for c in stack.containers.values() if isinstance(c.image, PostgresImage)]
    data = pg.image.data_dir(pg, stack)
    assert any(data.is_relative_to(v) for v in stack.volumes.values()), data
    assert (data / "PG_VERSION").exists()
    # JetStream's store is the nats-data volume
    assert {p.name for p in stack.volumes["nats-data"].rglob("streams/*")} >= {
        "ERRORS", "STRIPE_EVENTS", "RESERVATIONS", "PAYMENTS", "ALERTS"}
    # every service spools its error reports on the one error-spool volume ...
    spool = stack.volumes["error-spool"]
    for service in SERVICES:
        env = stack.containers[service.replace("_", "-")].env
        assert Path(env["ERROR_SPOOL_DIR"]) == spool, service
    # ... and a report made by a service goes through it on its way to error_logs: a dispute
    # (signed with the file's webhook secret) makes the webhook service report a critical error
    pi = f"pi_{uuid.uuid4().hex[:24]}"
    body = event("charge.dispute.created", {
        "id": f"dp_{uuid.uuid4().hex[:20]}", "object": "dispute", "payment_intent": pi,
        "amount": 1500, "currency": "eur", "reason": "fraudulent"})
    secret = first(stack.containers["ingress"].env["STRIPE_WEBHOOK_SECRET"])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{published(stack, 'ingress')}/v1/webhooks/stripe", data=body,
                          headers={"Stripe-Signature": sign(body, secret),
                                   "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
    db = await asyncpg.connect(stack.containers["migrate"].env["DATABASE_URL"])
    try:
        await eventually(lambda: db.fetchval(
            "SELECT 1 FROM error_logs WHERE service = 'webhook' AND severity = 'critical' "
            "AND context->>'payment_intent_id' = $1", pi), 30, "the dispute's report stored")
    finally:
        await db.close()
    webhook = stack.containers["webhook"]
    digest = bus_digest(webhook.env["NATS_URL"])
    assert (spool / digest).is_dir(), sorted(p.name for p in spool.iterdir())
    health = int(webhook.spec["environment"]["HEALTH_PORT"])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{stack.port('webhook', health)}/metrics") as r:
            metrics = await r.text()
    spooled = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("boxoffice_error_reports_spooled_total")]
    assert spooled and spooled[0] >= 1, spooled


# last: it stops the module's stack
def test_every_service_stops_within_its_grace_period(stack: ComposeStack) -> None:
    running = [n for n, c in stack.containers.items() if c.proc and c.proc.poll() is None]
    assert len(running) >= 8
    codes = stack.down()
    for name in running:
        c = stack.containers[name]
        assert codes[name] == 0 and not c.reason, (name, codes[name], c.reason, logs(stack, name))
