"""Faults: the bus stopped while Stripe delivers, the webhook service SIGKILLed mid-stream,
PostgreSQL stopped mid-stream. Every accepted event is applied, and applied once."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import asyncpg

from boxoffice import bus as busmod
from boxoffice import migrate
from boxoffice.embedded import NatsServer, Postgres
from tests.harness import base_env, eventually
from tests.sql_support import inventory
from tests.webhooks_support import event, new_pi, payment_intent, post, relayed, sign


async def make_holds(conn: asyncpg.Pool | asyncpg.Connection, n: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    ev = await conn.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'big', $1, 2500, "
                             "'eur', 64)", n)
    ids = await conn.fetch("SELECT (hold_tickets($1, 1, 'client', 3600)).id FROM generate_series(1, $2)",
                           ev, n)
    return ev, [r["id"] for r in ids]


def succeeded_events(holds: list[uuid.UUID]) -> list[bytes]:
    return [event("payment_intent.succeeded", payment_intent(new_pi(), r, amount=2500))
            for r in holds]


async def publish_all(nats_url: str, bodies: list[bytes], suffix: str = "") -> None:
    async with busmod.connect(nats_url, "stripe-feed") as bus:
        await bus.declare_streams("STRIPE_EVENTS")
        for i in range(0, len(bodies), 500):
            await asyncio.gather(*(bus.publish("stripe.events.payment_intent.succeeded", b,
                                               json.loads(b)["id"] + suffix)
                                   for b in bodies[i:i + 500]))


async def processed(conn: asyncpg.Pool | asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM webhook_events_log "
                               "WHERE processing_status = 'processed'")


async def assert_applied_once(conn: asyncpg.Pool | asyncpg.Connection, nats_url: str,
                              ev: uuid.UUID, holds: list[uuid.UUID]) -> None:
    n = len(holds)
    assert await conn.fetchval("SELECT count(*) FROM webhook_events_log") == n
    assert await processed(conn) == n
    assert await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'completed' "
                               "AND id = ANY($1::uuid[])", holds) == n
    assert await conn.fetchval("SELECT count(*) FROM payments WHERE status = 'succeeded'") == n
    assert await inventory(conn, ev) == (0, n)  # every ticket sold once, none twice
    await eventually(lambda: relayed(conn), 30, "the outbox relay")
    async with busmod.connect(nats_url, "probe") as bus:
        pay = await bus.js.stream_info("PAYMENTS", subjects_filter=">")
        res = await bus.js.stream_info("RESERVATIONS", subjects_filter="reservations.events.completed")
    assert pay.state.subjects == {"payments.events.succeeded": n}
    assert res.state.subjects == {"reservations.events.completed": n}


async def test_bus_stopped_while_stripe_delivers(db: asyncpg.Pool, start_service,
                                                 nats_server: NatsServer, nats_url: str) -> None:
    start_service("webhook")
    ingress = start_service("ingress")
    ev, holds = await make_holds(db, 300)
    bodies = succeeded_events(holds)
    statuses: dict[int, int] = {}
    retry_after: set[str] = set()

    async def stripe_delivers(s: aiohttp.ClientSession, i: int) -> None:
        try:
            status, _data, headers = await post(s, ingress.url, bodies[i], sign(bodies[i]))
        except aiohttp.ClientError:
            status, headers = 0, {}
        statuses[i] = status
        if status == 503:
            retry_after.add(headers.get("Retry-After", ""))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        await asyncio.gather(*(stripe_delivers(s, i) for i in range(100)))
        nats_server.stop()  # the bus goes away in the middle of the deliveries
        await asyncio.gather(*(stripe_delivers(s, i) for i in range(100, 200)))
        nats_server.start()
        await asyncio.gather(*(stripe_delivers(s, i) for i in range(200, 300)))
        refused = sorted(i for i, st in statuses.items() if st != 200)
        assert refused and all(statuses[i] == 503 for i in range(100, 200))
        assert retry_after and all(v.isdigit() for v in retry_after)
        # Stripe delivers what was refused again, later, until it is accepted
        for _ in range(50):
            await asyncio.gather(*(stripe_delivers(s, i) for i in refused))
            refused = [i for i in refused if statuses[i] != 200]
            if not refused:
                break
            await asyncio.sleep(0.3)
        assert not refused
    await eventually(lambda: _count_is(db, 300), 60, "all 300 events applied")
    await assert_applied_once(db, nats_url, ev, holds)


async def _count_is(conn: asyncpg.Pool | asyncpg.Connection, n: int) -> bool:
    return await processed(conn) >= n


async def test_webhook_service_killed_mid_stream(db: asyncpg.Pool, start_service,
                                                 nats_url: str) -> None:
    ev, holds = await make_holds(db, 5000)
    bodies = succeeded_events(holds)
    await publish_all(nats_url, bodies)
    await publish_all(nats_url, bodies[:500], suffix="-again")  # redeliveries from Stripe too
    webhook = start_service("webhook")
    await eventually(lambda: _count_is(db, 1000), 60, "a first part to be applied")
    webhook.kill()  # SIGKILL: whatever was in flight is neither acked nor (maybe) committed
    done_at_kill = await processed(db)
    assert done_at_kill < 5000, "the kill came too late to test anything"
    webhook.start()
    await eventually(lambda: _count_is(db, 5000), 90, "all 5,000 events after the restart")
    async with busmod.connect(nats_url, "probe") as bus:
        async def idle() -> bool:
            info = await bus.js.consumer_info("STRIPE_EVENTS", "webhook")
            return info.num_pending == 0 and info.num_ack_pending == 0
        await eventually(idle, 30, "the consumer to drain")
    await assert_applied_once(db, nats_url, ev, holds)


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_postgres_stopped_mid_stream(tmp_path: Path, start_service, nats_url: str) -> None:
    pg = Postgres(tmp_path / "pg" / "data").start(create_db="boxoffice")
    try:
        url = pg.url("boxoffice")
        await asyncio.to_thread(migrate.run, url, "up")
        conn = await asyncpg.connect(url)
        try:
            ev, holds = await make_holds(conn, 1500)
        finally:
            await conn.close()
        webhook = start_service("webhook", env=base_env(nats_url, url))
        await publish_all(nats_url, succeeded_events(holds))
        conn = await asyncpg.connect(url)
        try:
            await eventually(lambda: _count_is(conn, 200), 60, "a first part to be applied")
        finally:
            await conn.close()
        pg.stop()  # mid-stream
        await asyncio.sleep(3)  # events wait; nothing is dropped or marked failed
        assert webhook.running
        assert await asyncio.to_thread(_ready, webhook.url) == 503
        pg.start(create_db=None)  # same data, same port
        conn = await asyncpg.connect(url)
        try:
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                      schema="pg_catalog")
            await eventually(lambda: _count_is(conn, 1500), 90,
                             "every event once PostgreSQL is back")
            assert await conn.fetchval("SELECT count(*) FROM webhook_events_log "
                                       "WHERE processing_status = 'failed'") == 0
            await assert_applied_once(conn, nats_url, ev, holds)
        finally:
            await conn.close()
        assert await asyncio.to_thread(_ready, webhook.url) == 200
        assert "postgres unreachable" in webhook.logs()
    finally:
        pg.stop()
