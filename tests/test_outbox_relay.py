"""Replicas of an outbox relay share the rows (SKIP LOCKED) and publish each row once."""

from __future__ import annotations

import asyncio

import asyncpg

from boxoffice import bus as busmod
from boxoffice import outbox
from boxoffice.wire.subjects import reservation_event
from tests.harness import eventually

HELD = (reservation_event("held"),)
ROWS = ("INSERT INTO outbox (subject, payload) SELECT 'reservations.events.held', "
        "jsonb_build_object('n', g) FROM generate_series(1, $1) g")


async def test_relay_replicas_publish_every_row_once(nats_url: str, database_url: str,
                                                    db: asyncpg.Pool) -> None:
    """Three relays of the same subjects while rows keep coming: every row on the stream once
    (each a message of its own: the ids are the Nats-Msg-Ids) and the outbox drained, with no
    wake-up but the relays' own sweeps and retries."""
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        async with outbox.relay(database_url, db, bus, HELD), \
                outbox.relay(database_url, db, bus, HELD), \
                outbox.relay(database_url, db, bus, HELD):
            for _ in range(20):
                await db.execute(ROWS, 25)
                await asyncio.sleep(0.02)

            async def drained() -> bool:
                return await db.fetchval("SELECT count(*) FROM outbox") == 0
            await eventually(drained, timeout=20, what="the outbox drained")
        info = await bus.js.stream_info("RESERVATIONS")
        assert info.state.messages == 500
        seen: set[int] = set()
        sub = await bus.js.pull_subscribe("reservations.events.held", durable=None)
        while len(seen) < 500:
            for m in await sub.fetch(100, timeout=5):
                seen.add(int(m.header["Nats-Msg-Id"]))
        assert len(seen) == 500


async def test_a_wake_up_during_an_empty_batch_is_kept(nats_url: str, db: asyncpg.Pool,
                                                       monkeypatch) -> None:
    """A row committed just after a batch read the outbox (its writer wakes the relay while that
    batch is still running, as payment and webhook do) is published at once, not at the next
    sweep: the relay clears its wake-up before a batch reads, never after."""
    real = outbox.publish_batch
    calls = 0

    async def racing(pool, bus, subjects, limit=500):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        n = await real(pool, bus, subjects, limit)
        if calls == 1:  # the first batch read nothing; the row lands, its writer wakes us
            await db.execute(ROWS, 1)
            wake.set()
        return n

    monkeypatch.setattr(outbox, "publish_batch", racing)
    wake = asyncio.Event()
    stopping = asyncio.Event()
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        task = asyncio.create_task(
            outbox.run_relay(db, bus, HELD, stopping, wake, sweep_interval=60))
        try:
            async def published() -> bool:
                return (await bus.js.stream_info("RESERVATIONS")).state.messages == 1
            await eventually(published, timeout=5, what="the row published without a sweep")
        finally:
            stopping.set()
            wake.set()
            await task
    assert calls >= 2
