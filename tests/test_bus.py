"""The bus library: idempotent declarations, PubAck-confirmed publish with dedup, typed
request/reply errors, and the outbox relay."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest

from boxoffice import bus as busmod
from boxoffice import errors, outbox
from boxoffice.wire.subjects import STREAMS, reservation_event

HELD = (reservation_event("held"),)


class Ping(msgspec.Struct, forbid_unknown_fields=True):
    n: int


class Pong(msgspec.Struct):
    n: int


async def test_declarations_are_idempotent_and_publish_dedups(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams()
        await bus.declare_streams()  # a second service declaring the same streams is fine
        for name in STREAMS:
            info = await bus.js.stream_info(name)
            assert info.config.subjects == STREAMS[name]
        await bus.declare_consumer("ERRORS", "probe")
        await bus.declare_consumer("ERRORS", "probe")
        msg_id = str(uuid.uuid4())
        assert await bus.publish("errors.test.error", b"{}", msg_id) is True
        assert await bus.publish("errors.test.error", b"{}", msg_id) is False  # duplicate
        info = await bus.js.stream_info("ERRORS")
        assert info.state.messages == 1


async def test_request_reply_typed_errors(nats_url: str) -> None:
    async with busmod.connect(nats_url, "server") as server, busmod.connect(nats_url, "client") as client:
        with pytest.raises(errors.ServiceUnavailable):
            await client.request("test.ping", Ping(1), Pong, timeout=1)

        slow = asyncio.Event()

        async def handle(req: Ping) -> Pong:
            if req.n < 0:
                raise errors.Conflict("negative", hint="x")
            if req.n == 0:
                raise RuntimeError("boom with secret sk_test_123")
            if req.n == 99:
                await slow.wait()
            return Pong(req.n + 1)

        await server.serve("test.ping", Ping, handle, queue="t")
        assert (await client.request("test.ping", Ping(1), Pong)).n == 2
        with pytest.raises(errors.Conflict) as info:
            await client.request("test.ping", Ping(-1), Pong)
        assert info.value.extra == {"hint": "x"}
        with pytest.raises(errors.BoxofficeError) as info:
            await client.request("test.ping", Ping(0), Pong)
        assert info.value.status == 500 and "sk_test" not in info.value.detail
        with pytest.raises(errors.BadRequest):
            await client.request("test.ping", {"n": "x"}, Pong)
        with pytest.raises(errors.ServiceTimeout):
            await client.request("test.ping", Ping(99), Pong, timeout=0.3)
        slow.set()


async def test_stop_serving_finishes_in_flight_work(nats_url: str) -> None:
    async with busmod.connect(nats_url, "server") as server, busmod.connect(nats_url, "client") as client:
        started: set[int] = set()
        all_started = asyncio.Event()

        async def handle(req: Ping) -> Pong:
            started.add(req.n)
            if len(started) == 20:
                all_started.set()
            await asyncio.sleep(0.5)
            return Pong(req.n)

        await server.serve("test.slow", Ping, handle, queue="t")
        pending = [asyncio.create_task(client.request("test.slow", Ping(i), Pong, timeout=5))
                   for i in range(20)]
        await asyncio.wait_for(all_started.wait(), 5)  # every request is in flight
        await server.stop_serving()
        answers = await asyncio.gather(*pending)
        assert sorted(a.n for a in answers) == list(range(20))
        with pytest.raises(errors.ServiceUnavailable):
            await client.request("test.slow", Ping(1), Pong, timeout=1)


async def test_publish_without_bus_raises_unavailable(nats_server) -> None:
    async with busmod.connect(nats_server.url, "test") as bus:
        await bus.declare_streams("ERRORS")
        nats_server.kill()
        with pytest.raises(errors.ServiceUnavailable):
            await bus.publish("errors.test.error", b"{}", "x1", timeout=1)
        nats_server.start()


async def test_outbox_rows_published_once_even_when_relay_repeats(nats_url: str, db) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        async with db.acquire() as conn:
            await conn.executemany(
                "INSERT INTO outbox (subject, payload) VALUES ('reservations.events.held', $1::jsonb)",
                [(f'{{"n": {i}}}',) for i in range(50)])
            ids = [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")]
            assert await outbox.publish_batch(db, bus, HELD) == 50
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
            # a relay that crashed before deleting republishes the same ids: JetStream drops them
            await conn.executemany(
                "INSERT INTO outbox (id, subject, payload) VALUES ($1, 'reservations.events.held', '{}')",
                [(i,) for i in ids[:10]])
            assert await outbox.publish_batch(db, bus, HELD) == 10
        info = await bus.js.stream_info("RESERVATIONS")
        assert info.state.messages == 50


async def test_outbox_relay_waits_out_a_bus_outage(nats_server, db, database_url: str) -> None:
    async with busmod.connect(nats_server.url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        async with outbox.relay(database_url, db, bus, HELD):
            nats_server.kill()
            async with db.acquire() as conn:
                await conn.execute("INSERT INTO outbox (subject, payload) SELECT "
                                   "'reservations.events.held', '{}' FROM generate_series(1, 30)")
            await asyncio.sleep(1.0)
            async with db.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM outbox") == 30  # kept, not lost
            nats_server.start()
            for _ in range(200):
                async with db.acquire() as conn:
                    if await conn.fetchval("SELECT count(*) FROM outbox") == 0:
                        break
                await asyncio.sleep(0.1)
        info = await bus.js.stream_info("RESERVATIONS")
        assert info.state.messages == 30

