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
