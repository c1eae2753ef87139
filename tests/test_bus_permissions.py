"""Least privilege on the bus, enforced by nats-server itself: no anonymous connection, each
service's user allowed what the service does and refused a sample of what it must not do,
the reporter's user able to report an error and nothing else, and the configuration that
deploy/nats/nats.conf and ``boxoffice up`` run being the one generated from
``boxoffice.bus_access``.

The services themselves run with their own users in every test that starts one (the harness
gives each its user; the ``nats_server`` fixture fails a test whose server refused anything),
so the whole suite proves that the permissions suffice; the end-to-end test here runs all five.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import nats.errors
import psutil
import pytest
import yaml

from boxoffice import bus as busmod
from boxoffice import bus_access, config, errors, scrub
from boxoffice.embedded import NatsServer, venv_bin
from boxoffice.wire.subjects import ERROR_SINK_CONSUMER, WEBHOOK_CONSUMER, error_report
from tests.bus_support import connected, connection_refused
from tests.checkout_support import Api
from tests.compose_support import COMPOSE_NAMES, compose_config
from tests.harness import ADMIN_TOKEN, NATS_PASSWORDS, eventually
from tests.webhooks_support import deliver, event, payment_intent

ROOT = Path(__file__).resolve().parent.parent
OUTBOX_SUBJECTS = sorted({s for a in bus_access.ACCESS.values() for s in a.relays})


@pytest.fixture
def server(tmp_path: Path):
    """A nats-server with every user, for tests that provoke refusals on purpose."""
    srv = NatsServer(tmp_path / "refusing", sync_always=False, passwords=NATS_PASSWORDS).start()
    try:
        yield srv
    finally:
        srv.kill()


async def _streams(server: NatsServer) -> None:
    async with busmod.connect(server.url, "operator") as bus:
        await bus.declare_streams()
        for stream, durable in (ERROR_SINK_CONSUMER, WEBHOOK_CONSUMER):
            await bus.declare_consumer(stream, durable)


async def _messages(server: NatsServer, stream: str) -> int:
    async with connected(server, bus_access.OPERATOR) as op:
        return (await op.js.stream_info(stream)).state.messages


# -- the configuration ------------------------------------------------------------------------

def test_deploy_configuration_is_the_generated_one_and_nats_server_accepts_it(
        tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    assert bus_access.authorization() in text  # regenerate: python -m boxoffice.bus_access
    assert "$NATS_PAYMENT_PASSWORD" in text and "password: \"" not in text  # no password in it
    conf = tmp_path / "nats.conf"
    conf.write_text(text.replace("/data/jetstream", str(tmp_path / "js")))
    env = {bus_access.password_variable(u): f"pw-{u}" for u in bus_access.USERS}
    check = subprocess.run([venv_bin("nats-server"), "-c", str(conf), "-t"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    # without its passwords it does not start at all (no user without one, no anonymous access)
    del env["NATS_REAPER_PASSWORD"]
    check = subprocess.run([venv_bin("nats-server"), "-c", str(conf), "-t"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode != 0 and "NATS_REAPER_PASSWORD" in check.stdout + check.stderr


def test_compose_gives_each_service_its_own_user_with_the_servers_password() -> None:
    cfg = compose_config(every_profile=False)
    nats_env = cfg["services"]["nats"]["environment"]
    assert set(nats_env) >= {bus_access.password_variable(u) for u in bus_access.USERS}
    for service, name in COMPOSE_NAMES.items():
        url = cfg["services"][name]["environment"]["NATS_URL"]
        assert bus_access.user_of(url) == service, (service, url)
        assert f":{nats_env[bus_access.password_variable(service)]}@" in url, service
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in COMPOSE_NAMES.values():  # from the variable, with a development default ...
        assert "_PASSWORD:-" in raw["services"][name]["environment"]["NATS_URL"], name
    production = {"DATABASE_URL": "postgresql://svc:Production-secret-1@db:5432/boxoffice",
                  "STRIPE_API_KEY": "sk_live_" + "x" * 24, "STRIPE_API_BASE": "",
                  "STRIPE_WEBHOOK_SECRET": "whsec_" + "w" * 32, "CLIENT_API_TOKENS": "c" * 40,
                  "ADMIN_API_TOKENS": "a" * 40}
    for service, name in COMPOSE_NAMES.items():  # ... that BOXOFFICE_ENV=production refuses
        env = {k: str(v) for k, v in cfg["services"][name]["environment"].items()}
        env.update({k: v for k, v in production.items() if k in env})  # all else set for real
        with pytest.raises(config.ConfigError, match="NATS_URL holds a development default"):
            config.refuse_development_settings(config.load(service, env), env)


def test_the_table_allows_each_relay_exactly_its_outbox_subjects() -> None:
    for service, access in bus_access.ACCESS.items():
        for subject in OUTBOX_SUBJECTS:
            assert bus_access.may_publish(service, subject) == (subject in access.relays), (
                service, subject)
    assert bus_access.may_publish("ingress", "errors.payment.error")
    assert not bus_access.may_publish("payment", "errors.webhook.error")


# -- who may connect --------------------------------------------------------------------------

async def test_no_connection_without_a_users_own_password(server: NatsServer) -> None:
    assert "Authorization Violation" in await connection_refused(server.address)
    wrong = bus_access.with_user(server.address, "payment", NATS_PASSWORDS["ingress"])
    assert "Authorization Violation" in await connection_refused(wrong)
    # a service with such a URL stops at once, naming the variable, never its value
    started = time.monotonic()
    with pytest.raises(errors.ServiceUnavailable) as refused:
        async with busmod.connect(wrong, "payment"):
            pass
    assert time.monotonic() - started < 5
    assert "NATS_URL" in refused.value.detail
    assert NATS_PASSWORDS["ingress"] not in refused.value.detail


# -- what each user is refused (a sample), and the allowed counterpart ------------------------

async def test_only_ingress_and_reconciliation_publish_stripe_events(server: NatsServer) -> None:
    await _streams(server)
    forged = "stripe.events.payment_intent.succeeded"
    for user in ("payment", "error_sink", "reaper", bus_access.REPORTER):
        async with connected(server, user) as conn:
            assert not await conn.may_publish(forged), user
    assert await _messages(server, "STRIPE_EVENTS") == 0  # nothing forged was stored
    for user in ("ingress", "webhook"):  # signature checked / read from Stripe's own API
        async with connected(server, user) as conn:
            assert await conn.may_publish(forged), user
    assert await _messages(server, "STRIPE_EVENTS") == 2


async def test_only_payment_answers_reservation_requests(server: NatsServer) -> None:
    async with connected(server, "error_sink") as sink, connected(server, "ingress") as ingress, \
            connected(server, "payment") as payment:
        async def impostor(msg) -> None:
            await msg.respond(b"held by the error-sink")

        await sink.nc.subscribe("reservations.hold", queue="payment", cb=impostor)
        await sink.refusal("reservations.hold")
        with pytest.raises(nats.errors.NoRespondersError):
            await ingress.nc.request("reservations.hold", b"{}", timeout=2)

        async def answer(msg) -> None:
            await msg.respond(b"held")
            # one reply per request: a second one, or any other publish, is refused
            await msg.respond(b"held again")
            await payment.nc.publish(msg.reply.rsplit(".", 1)[0] + ".forged", b"x")

        await payment.nc.subscribe("reservations.hold", queue="payment", cb=answer)
        await busmod.flushed(payment.nc)
        reply = await ingress.nc.request("reservations.hold", b"{}", timeout=2)
        assert reply.data == b"held"
        assert reply.subject.startswith(bus_access.inbox_prefix("ingress") + ".")
        await payment.refusal(reply.subject)
        assert not payment.nc.is_closed


async def test_ingress_cannot_subscribe_to_everything(server: NatsServer) -> None:
    async with connected(server, "ingress") as ingress, \
            connected(server, bus_access.OPERATOR) as op:
        seen: list[str] = []

        async def keep(msg) -> None:
            seen.append(msg.subject)

        await ingress.nc.subscribe(">", cb=keep)
        await ingress.refusal(">")
        await ingress.nc.subscribe("errors.>", cb=keep)
        await ingress.refusal("errors.>")
        for subject in ("reservations.events.held", "errors.payment.error", "admin.payment.x"):
            await op.nc.publish(subject, b"{}")
        await busmod.flushed(op.nc)
        await asyncio.sleep(0.3)
        assert seen == []


async def test_only_the_error_sink_consumes_errors(server: NatsServer) -> None:
    await _streams(server)
    stream, durable = ERROR_SINK_CONSUMER
    async with connected(server, bus_access.REPORTER) as reporter:
        assert await reporter.may_publish("errors.shop-web.error")
    for user in ("ingress", "payment", "webhook", "reaper", bus_access.REPORTER):
        async with connected(server, user) as conn:
            js = conn.nc.jetstream(timeout=0.5)  # (a refused request is never answered)
            sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=0.5)  # the sink's own consumer
            await conn.refusal(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}")
            with pytest.raises(nats.errors.TimeoutError):  # a consumer of its own
                await js.add_consumer(stream, durable_name=f"spy-{user.replace('_', '-')}")
            forged_ack = f"$JS.ACK.{stream}.{durable}.1.1.1.{time.time_ns()}.0"
            await conn.nc.publish(forged_ack, b"+ACK")  # acknowledging for the sink
            await conn.refusal(forged_ack)
            await conn.nc.subscribe("errors.>")
            await conn.refusal("errors.>")
            if user == "reaper":  # the self-audit reads single reports, never consumes them
                assert (await js.get_msg(stream, 1)).subject == "errors.shop-web.error"
                continue
            with pytest.raises(nats.errors.TimeoutError):  # one message straight from the stream
                await js.get_msg(stream, 1)
            await conn.refusal(f"$JS.API.STREAM.MSG.GET.{stream}")
    async with connected(server, "error_sink") as sink:
        info = await sink.js.consumer_info(stream, durable)
        assert info.ack_floor.stream_seq == 0 and info.num_pending == 1  # untouched by them
        sub = await sink.js.pull_subscribe_bind(durable=durable, stream=stream)
        (msg,) = await sub.fetch(1, timeout=2)
        assert msg.subject == "errors.shop-web.error"
        await msg.ack_sync()
        info = await sink.js.consumer_info(stream, durable)
        assert info.ack_floor.stream_seq == 1 and not sink.refused
    async with connected(server, bus_access.OPERATOR) as op:  # no consumer but the sink's
        assert [c.name for c in await op.js.consumers_info(stream)] == [durable]


def test_the_self_audit_reads_through_the_consumer_the_table_names() -> None:
    from boxoffice.reaper import audit_streams

    assert audit_streams.AUDIT == bus_access.AUDIT_READER
    assert bus_access.may_publish("reaper", f"$JS.API.CONSUMER.CREATE.ERRORS.{audit_streams.AUDIT}")
    assert not bus_access.may_publish("reaper", "$JS.API.CONSUMER.CREATE.ERRORS.error-sink")
    assert not bus_access.may_publish("reaper", "$JS.API.CONSUMER.DELETE.ERRORS.error-sink")


async def test_no_service_reads_another_services_replies(server: NatsServer) -> None:
    async with connected(server, "payment") as payment, connected(server, "ingress") as ingress, \
            connected(server, "reaper") as reaper:
        stolen: list[bytes] = []

        async def steal(msg) -> None:
            stolen.append(msg.data)

        for inbox in (bus_access.inbox_prefix("ingress") + ".>", "_INBOX.>"):
            await payment.nc.subscribe(inbox, cb=steal)
            await payment.refusal(inbox)

        async def stats(msg) -> None:
            await msg.respond(b"the reaper's answer")

        await reaper.nc.subscribe("admin.reaper.stats", queue="reaper", cb=stats)
        await busmod.flushed(reaper.nc)
        assert (await ingress.nc.request("admin.reaper.stats", b"{}", timeout=2)).data \
            == b"the reaper's answer"
        await asyncio.sleep(0.2)
        assert stolen == []


async def test_each_relay_publishes_only_its_own_outbox_subjects(server: NatsServer) -> None:
    await _streams(server)
    for service, access in bus_access.ACCESS.items():
        async with connected(server, service) as conn:
            for subject in OUTBOX_SUBJECTS:
                assert await conn.may_publish(subject) == (subject in access.relays), (
                    service, subject)
    expected = sum(subject.startswith("reservations.") for a in bus_access.ACCESS.values()
                   for subject in a.relays)
    assert await _messages(server, "RESERVATIONS") == expected


async def test_the_reporter_reports_an_error_and_does_nothing_else(server: NatsServer) -> None:
    await _streams(server)
    reporter_url = server.url_for(bus_access.REPORTER)
    # any process: a JetStream publish with its acknowledgement, on the reporter's inbox prefix
    async with connected(server, bus_access.REPORTER) as reporter:
        ack = await reporter.js.publish("errors.shop-web.error", b'{"message": "cart failed"}',
                                        headers={"Nats-Msg-Id": str(uuid.uuid4())})
        assert ack.stream == "ERRORS" and ack.seq == 1
        for subject in ("stripe.events.charge.refunded", "reservations.events.held", "alerts.fatal"):
            assert not await reporter.may_publish(subject)
        with pytest.raises(nats.errors.TimeoutError):  # the request never leaves
            await reporter.nc.request("reservations.hold", b"{}", timeout=0.5)
        await reporter.refusal("reservations.hold")
        for subject in ("errors.>", "_INBOX.>", bus_access.inbox_prefix("ingress") + ".>"):
            await reporter.nc.subscribe(subject)
            await reporter.refusal(subject)
        with pytest.raises(nats.errors.TimeoutError):
            await reporter.nc.jetstream(timeout=0.5).stream_info("ERRORS")
        await reporter.refusal("$JS.API.STREAM.INFO.ERRORS")
    # boxoffice's own bus client (the inbox prefix follows from the URL's user)
    async with busmod.connect(reporter_url, "some-process") as bus:
        assert await bus.publish("errors.shop-web.warning", b"{}", str(uuid.uuid4()))
    assert await _messages(server, "ERRORS") == 2


async def test_only_ingress_publishes_sealed_error_reports(server: NatsServer) -> None:
    """A sealed report (``errors.<service>.<level>.<seal>``) is stored without a second scrub:
    nats-server refuses that subject to every user but ingress (and the operator), whatever the
    service or level in it."""
    await _streams(server)
    sealed = error_report("shop-web", "error", scrub.SEAL)
    for user in (bus_access.REPORTER, "payment", "webhook", "reaper", "error_sink"):
        async with connected(server, user) as conn:
            own = user if user in bus_access.ACCESS else "shop-web"
            assert await conn.may_publish(error_report(own, "error"))  # its own reports: yes
            for subject in (sealed, error_report(own, "error", scrub.SEAL),
                            error_report(own, "error", "scrubbed-0"), f"errors.{own}.a.b.c"):
                assert not await conn.may_publish(subject), (user, subject)
    async with connected(server, "ingress") as ingress:
        assert await ingress.may_publish(sealed)
    assert await _messages(server, "ERRORS") == 6


# -- the services, each with its own user, doing their jobs -----------------------------------

@pytest.mark.timeout(120)
async def test_every_service_does_its_job_as_its_own_user(
        start_service, localstripe, nats_server: NatsServer, db: asyncpg.Pool) -> None:
    procs = {s: start_service(s, STRIPE_API_BASE=localstripe.url, RESERVATION_TTL_SECONDS="1")
             for s in ("payment", "webhook", "error_sink", "reaper", "ingress")}
    for service, proc in procs.items():  # the credentials it really runs with
        url = psutil.Process(proc.proc.pid).environ()["NATS_URL"]
        assert url == nats_server.url_for(service), service
    async with aiohttp.ClientSession() as http:
        api = Api(http, procs["ingress"].url)
        event_id = await api.create_event(capacity=5)  # payment; the action logged by the reaper
        r = await api.call("POST", "/v1/reservations", body={"event_id": event_id, "quantity": 2})
        assert r.status == 201, r.body
        paid = r.json["id"]
        pi = f"pi_{uuid.uuid4().hex[:24]}"
        await deliver(http, procs["ingress"].url,
                      event("payment_intent.succeeded", payment_intent(pi, paid, amount=5000)))
        r = await api.call("POST", "/v1/reservations", body={"event_id": event_id, "quantity": 1})
        assert r.status == 201, r.body  # left to expire (a 1 s hold)
        report = {"id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
                  "service": "shop-web", "level": "critical", "message": "checkout broke"}
        r = await api.call("POST", "/v1/errors", body=report)
        assert r.status == 202, r.body

        async def subjects(stream: str) -> set[str]:
            async with connected(nats_server, bus_access.OPERATOR) as op:
                info = await op.js.stream_info(stream)
                return {(await op.js.get_msg(stream, seq)).subject
                        for seq in range(info.state.first_seq, info.state.last_seq + 1)}

        async def every_event_out() -> bool:
            return await subjects("RESERVATIONS") >= {
                "reservations.events.held", "reservations.events.completed",
                "reservations.events.expired"}

        # each relay published its own events: payment's hold, webhook's sale, reaper's expiry
        await eventually(every_event_out, 30, "every service's events on RESERVATIONS")
        assert "payments.events.succeeded" in await subjects("PAYMENTS")
        await eventually(lambda: db.fetchval("SELECT 1 FROM error_logs WHERE id = $1",
                                           uuid.UUID(report["id"])), 20, "the report stored")
        assert await subjects("ALERTS") == {"alerts.critical"}  # the error-sink's alert
        for path in ("/v1/admin/errors?limit=5", "/v1/admin/webhooks/events?limit=5",
                     "/v1/admin/reservations/stats", "/v1/admin/payments?limit=5",
                     f"/v1/admin/events/{event_id}"):  # every owner answers ingress
            r = await api.call("GET", path, token=ADMIN_TOKEN)
            assert r.status == 200, (path, r.body)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    for proc in procs.values():
        assert proc.stop() == 0
    # (the nats_server fixture then checks that nats-server refused none of them anything)
