"""Secrets never appear in logs, error reports or responses.

Every service runs with distinctive secret values: the client and admin API tokens, the Stripe
secret key, both webhook signing secrets, and the password of each service's own PostgreSQL role
(checked by the server; the owner's URL given carries one more, which no service ever gets). The
test walks the main flows and their failures (wrong and other-kind tokens, bad signatures, Stripe
unreachable, a database that refuses, NATS credentials refused, malformed settings, a crash,
error reports that quote credentials), then looks for every secret in every service log,
nats-server's log, every response (body and headers), the ``error_logs`` table, every message on
every JetStream stream and the local error spool. Each service's own NATS password (its user in
``NATS_URL``) is among the secrets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import nats
import pytest

from boxoffice import bus_access, roles
from boxoffice.embedded import free_port
from tests.checkout_support import Api, Resp, nobody_answers
from tests.harness import DB_PASSWORDS, NATS_PASSWORDS, ServiceProcess, base_env, eventually
from tests.webhooks_support import event, payment_intent, sign

CLIENT = "client-SECRET-7b1e0c5a9f2d4e68"
ADMIN = "admin-SECRET-3c9d1f7e2a5b8d40"
STRIPE = "sk_test_SECRETSTRIPE5e8a1c3f9b7d"
WHSEC = "whsec_SECRET_ROTATED_4f2a9c1d7e3b"
WHSEC_OLD = "whsec_SECRET_PREVIOUS_8a6d2e0f4c1b"
PG_PASSWORD = "pgSECRET-0d4f8b2e6a1c"
NATS_WRONG = "natsWRONG-SECRET-6c2e9a0f4b8d"
SECRETS = {"client token": CLIENT, "admin token": ADMIN, "Stripe key": STRIPE,
           "webhook secret": WHSEC, "old webhook secret": WHSEC_OLD, "database password": PG_PASSWORD,
           **{f"{service}'s database password": p for service, p in DB_PASSWORDS.items()},
           # each service's NATS password (its user in NATS_URL), the operator's and reporter's
           **{f"{user}'s NATS password": p for user, p in NATS_PASSWORDS.items()},
           "a refused NATS password": NATS_WRONG}


def _with_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{PG_PASSWORD}@{host}"))


class Recorder:
    """An Api whose every answer (status, headers, body) is kept for the final search."""

    def __init__(self, api: Api):
        self.api = api
        self.seen: list[str] = []

    async def call(self, method: str, path: str, **kw: Any) -> Resp:
        r = await self.api.call(method, path, **kw)
        self.seen.append(f"{r.status} {dict(r.headers)!r} {r.body.decode(errors='replace')}")
        return r


def _find(haystack: str, where: str) -> list[str]:
    return [f"{name} in {where}" for name, value in SECRETS.items() if value in haystack]


async def _stream_texts(nats_url: str) -> dict[str, str]:
    """Every message (subject, headers, data) on every stream, as text, per stream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        out = {}
        for info in await js.streams_info():
            parts = []
            if not info.state.messages:
                out[info.config.name] = ""
                continue
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                data = (msg.data or b"").decode(errors="replace").replace("\n", "\\n")
                parts.append(f"{msg.subject} {msg.headers!r} {data}")
            out[info.config.name] = "\n".join(parts)
        return out
    finally:
        await nc.close()


@pytest.mark.timeout(150)
async def test_no_secret_in_logs_reports_or_responses(
        start_service, localstripe, nats_server, nats_url: str, database_url: str,
        db: asyncpg.Pool, tmp_path: Path) -> None:
    env = base_env(nats_url, _with_password(database_url), localstripe.url)
    env.update({"CLIENT_API_TOKENS": CLIENT, "ADMIN_API_TOKENS": ADMIN, "STRIPE_API_KEY": STRIPE,
                "STRIPE_WEBHOOK_SECRET": f"{WHSEC},{WHSEC_OLD}",
                "ERROR_SPOOL_DIR": str(tmp_path / "spool"), "LOG_LEVEL": "DEBUG"})
    procs: list[ServiceProcess] = []

    def start(name: str, **extra: str) -> ServiceProcess:
        proc = start_service(name, env=dict(env, **extra))
        procs.append(proc)
        return proc

    payment = start("payment")
    start("webhook")
    sink = start("error_sink")
    start("reaper")
    ingress = start("ingress")
    # the services really log in with their own roles (and so with those roles' passwords)
    users = {r[0] for r in await db.fetch(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend'")}
    assert users == set(roles.ROLES.values()) | {"postgres"}, users

    async with aiohttp.ClientSession() as session:
        api = Recorder(Api(session, ingress.url))
        # -- the main flow: event, hold, PaymentIntent, its webhook -----------------------------
        r = await api.call("POST", "/v1/admin/events", token=ADMIN,
                           body={"name": "gig", "capacity": 10, "price": 2500, "currency": "eur"})
        assert r.status == 201, r.body
        event_id = r.json["id"]
        r = await api.call("POST", "/v1/reservations", token=CLIENT,
                           body={"event_id": event_id, "quantity": 2})
        assert r.status == 201, r.body
        hold_id = r.json["id"]
        r = await api.call("POST", "/v1/payment_intents", token=CLIENT, key="order-1",
                           body={"reservation_id": hold_id})
        assert r.status == 201, r.body
        pi = r.json["id"]
        paid = event("payment_intent.succeeded", payment_intent(pi, hold_id, amount=5000))
        for secret in (WHSEC, WHSEC_OLD):  # a rotation: both secrets sign
            r = await api.call("POST", "/v1/webhooks/stripe", token=None, raw=paid,
                               headers={"Stripe-Signature": sign(paid, secret)})
            assert r.status == 200, r.body

        async def completed() -> bool:
            return await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                                     uuid.UUID(hold_id)) == "completed"

        await eventually(completed, what="the hold completed by the webhook")

        # -- wrong credentials of every kind ----------------------------------------------------
        for token, path, method in [
                (ADMIN, "/v1/reservations", "POST"), (CLIENT, "/v1/admin/events", "POST"),
                (CLIENT + "x", "/v1/reservations", "POST"), (ADMIN[:-1], "/v1/admin/events", "POST"),
                (STRIPE, "/v1/admin/events", "POST"), (WHSEC, f"/v1/reservations/{hold_id}", "GET"),
                (f"{CLIENT} {ADMIN}", "/v1/admin/reservations/stats", "GET")]:
            r = await api.call(method, path, token=token, body={"event_id": event_id, "quantity": 1})
            assert r.status in (401, 403), (token, r.status, r.body)
        r = await api.call("GET", "/v1/admin/events/" + event_id, token=None,
                           headers={"Authorization": f"Basic {ADMIN}"})
        assert r.status == 401
        for sig in (sign(paid, "whsec_wrong_secret"), sign(paid, WHSEC, t=int(time.time()) - 3600),
                    f"t={int(time.time())},v1={WHSEC}", WHSEC):
            r = await api.call("POST", "/v1/webhooks/stripe", token=None, raw=paid,
                               headers={"Stripe-Signature": sig})
            assert r.status == 400 and r.json["code"] == "invalid_signature", r.body
        # secrets inside bodies that fail validation are not echoed back
        r = await api.call("POST", "/v1/reservations", token=CLIENT,
                           body={"event_id": ADMIN, "quantity": 1, STRIPE: PG_PASSWORD})
        assert r.status == 422, r.body
        r = await api.call("POST", "/v1/admin/events", token=ADMIN,
                           body={"name": "x", "capacity": 1, "price": 1, "currency": WHSEC})
        assert r.status == 422, r.body
        r = await api.call("POST", "/v1/payment_intents", token=CLIENT, key=ADMIN,
                           body={"reservation_id": STRIPE})
        assert r.status == 422, r.body

        # -- error reports that quote credentials: stored scrubbed --------------------------------
        report_ids = []
        for message, context in [
                (f"call failed: Authorization: Bearer {CLIENT}", {"token": ADMIN}),
                (f"stripe said no for {STRIPE}", {"headers": {"Authorization": f"Bearer {STRIPE}"}}),
                (f"db down: postgresql://app:{PG_PASSWORD}@db:5432/x", {"password": PG_PASSWORD,
                                                                        "webhook_secret": WHSEC})]:
            rid = str(uuid.uuid4())
            report_ids.append(uuid.UUID(rid))
            r = await api.call("POST", "/v1/errors", token=CLIENT, body={
                "id": rid, "occurred_at": "2026-11-28T12:00:00Z", "service": "shop-web",
                "level": "error", "message": message, "context": context})
            assert r.status == 202, r.body

        # -- Stripe unreachable: the payment service answers 503, and says why without the key --
        payment.kill()
        await eventually(lambda: nobody_answers(nats_url, "payments.intents.create"),
                         what="the killed payment service's subscription gone")
        dead = f"http://127.0.0.1:{free_port()}"
        payment2 = start("payment", STRIPE_API_BASE=dead)
        r = await api.call("POST", "/v1/reservations", token=CLIENT,
                           body={"event_id": event_id, "quantity": 1})
        assert r.status == 201, r.body
        r = await api.call("POST", "/v1/payment_intents", token=CLIENT, key="order-2",
                           body={"reservation_id": r.json["id"]}, timeout=30)
        assert r.status == 503, r.body
        payment2.stop()

        # -- a crash: the payment service SIGKILLs itself at a failpoint ------------------------
        crashing = start("payment", BOXOFFICE_FAILPOINT="before_stripe_call")
        r = await api.call("POST", "/v1/reservations", token=CLIENT,
                           body={"event_id": event_id, "quantity": 1})
        assert r.status == 201, r.body
        r = await api.call("POST", "/v1/payment_intents", token=CLIENT, key="order-3",
                           body={"reservation_id": r.json["id"]}, timeout=30)
        assert r.status in (503, 504), r.body
        await eventually(lambda: not crashing.running, what="the failpoint crash")

    # -- a database that refuses: start-up fails, is logged and reported ------------------------
    no_db = _with_password(database_url).rsplit("/", 1)[0] + "/no_such_database"
    refused = start_service("reaper", wait=False, env=dict(env, DATABASE_URL=no_db))
    procs.append(refused)
    await eventually(lambda: refused.proc is not None and refused.proc.poll() is not None,
                     timeout=60, what="the reaper giving up on a missing database")
    assert refused.proc.returncode != 0
    # -- NATS credentials refused: start-up stops at once, naming the variable ------------------
    wrong_nats = bus_access.with_user(bus_access.without_user(nats_url), "payment", NATS_WRONG)
    refused_bus = start_service("payment", wait=False, env=dict(env, NATS_URL=wrong_nats))
    procs.append(refused_bus)
    await eventually(lambda: refused_bus.proc is not None and refused_bus.proc.poll() is not None,
                     timeout=30, what="the payment service refused by nats-server")
    assert refused_bus.proc.returncode == 1 and "NATS_URL" in refused_bus.logs()
    # -- malformed settings: one line naming the variable, never its value ---------------------
    bad_settings = [("ingress", "ADMIN_API_TOKENS", f"{ADMIN},short", "ADMIN_API_TOKENS"),
                    ("ingress", "CLIENT_API_TOKENS", f"{CLIENT},{ADMIN}", "ADMIN_API_TOKENS"),
                    ("ingress", "STRIPE_WEBHOOK_SECRET", f"{WHSEC},tiny", "STRIPE_WEBHOOK_SECRET"),
                    ("payment", "STRIPE_API_KEY", STRIPE + "!", "STRIPE_API_KEY"),
                    ("payment", "DATABASE_URL", f"mysql://u:{PG_PASSWORD}@h/db", "DATABASE_URL"),
                    ("payment", "DATABASE_URL", f"postgresql://u:{PG_PASSWORD}@h:notaport/db",
                     "DATABASE_URL"),
                    ("payment", "NATS_URL", f"http://payment:{NATS_WRONG}@127.0.0.1:4222",
                     "NATS_URL")]
    for service, var, value, name in bad_settings:
        bad_env = dict(env, **{var: value})
        done = subprocess.run([sys.executable, "-m", "boxoffice.cli", "run", service],
                              env=bad_env, capture_output=True, timeout=60)
        out = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 2 and name in out, (name, done.returncode, out)
        leaks = _find(out, f"the output of a bad {var}")
        assert not leaks, (leaks, out)

    # every report, the crash's and the refused start's included, reaches error_logs
    async def reports_stored() -> bool:
        return await db.fetchval("SELECT count(*) FROM error_logs WHERE id = ANY($1::uuid[])",
                                 report_ids) == len(report_ids)

    await eventually(reports_stored, timeout=30, what="the quoted-credential reports stored")
    # the sink drains the ERRORS stream: everything on it is stored before we look
    async def sink_caught_up() -> bool:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info("ERRORS")
            stored = await db.fetchval("SELECT count(*) FROM error_logs")
            return stored >= info.state.messages
        finally:
            await nc.close()

    await eventually(sink_caught_up, timeout=30, what="the error-sink caught up with ERRORS")
    assert sink.running

    # -- the search ------------------------------------------------------------------------------
    leaks: list[str] = []
    for text in api.seen:
        leaks += _find(text, f"a response: {text[:160]}")
    for proc in procs:
        leaks += _find(proc.logs(), f"the log of {proc.log.name}")
    leaks += _find(nats_server.log.read_text(errors="replace"), "nats-server's log")
    rows = await db.fetch("SELECT * FROM error_logs")
    assert len(rows) >= len(report_ids) + 1  # ours, and at least one from the services' failures
    for row in rows:
        leaks += _find(json.dumps(dict(row), default=str), f"error_logs row {row['id']}")
    for row in await db.fetch("SELECT * FROM error_groups"):
        leaks += _find(json.dumps(dict(row), default=str), "error_groups")
    streams = await _stream_texts(nats_url)
    assert streams["ERRORS"], "nothing was reported"
    for name, text in streams.items():
        for line in text.split("\n"):
            leaks += _find(line, f"stream {name}: {line[:300]}")
    for f in (tmp_path / "spool").rglob("*"):
        if f.is_file():
            leaks += _find(f.read_bytes().decode(errors="replace"), f"spool file {f.name}")
    assert not leaks, "secrets leaked:\n" + "\n".join(sorted(set(leaks)))


def test_reporter_scrubs_before_a_report_leaves_the_process(tmp_path: Path) -> None:
    """A service's own report (here spooled: no bus attached) carries no credential."""
    from boxoffice.report import Reporter

    reporter = Reporter("payment", bus_url="nats://127.0.0.1:1", spool_dir=str(tmp_path))
    try:
        raise ConnectionError(f"cannot reach postgresql://app:{PG_PASSWORD}@db:5432/x "
                              f"with Authorization: Bearer {ADMIN}")
    except ConnectionError as exc:
        assert reporter.report("error", f"stripe refused {STRIPE}", exc=exc, fold=False,
                               context={"api_key": STRIPE, "nested": {"secret": WHSEC},
                                        "note": f"Bearer {CLIENT}"})
    spooled = "".join(f.read_bytes().decode() for f in tmp_path.rglob("*") if f.is_file())
    assert "ConnectionError" in spooled and "stripe refused" in spooled
    assert not _find(spooled, "the spooled report"), spooled
