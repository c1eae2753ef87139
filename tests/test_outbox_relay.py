"""The outbox relay holds no transaction open while it waits for NATS (a running xid would hold
back the removal of dead row versions everywhere, the hot inventory rows' first), and its
replicas still publish each row once: one at a time, under a session advisory lock."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from boxoffice import bus as busmod
from boxoffice import outbox
from boxoffice.wire.subjects import reservation_event
from tests.harness import eventually

HELD = (reservation_event("held"),)
ROWS = ("INSERT INTO outbox (subject, payload) SELECT 'reservations.events.held', "
        "jsonb_build_object('n', g) FROM generate_series(1, $1) g")


class GatedBus:
    """A real bus whose publishes wait for ``gate`` (so a test can look at PostgreSQL while a
    relay waits for its PubAcks)."""

    def __init__(self, bus: busmod.Bus) -> None:
        self.bus, self.gate, self.waiting = bus, asyncio.Event(), asyncio.Event()

    async def publish(self, *args: Any, **kw: Any) -> Any:
        self.waiting.set()
        await self.gate.wait()
        return await self.bus.publish(*args, **kw)


async def test_no_transaction_is_open_while_the_relay_waits_for_nats(nats_url: str,
                                                                     db: asyncpg.Pool) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        await db.execute(ROWS, 20)
        gated = GatedBus(bus)
        task = asyncio.create_task(outbox.publish_batch(db, gated, HELD))  # type: ignore[arg-type]
        await asyncio.wait_for(gated.waiting.wait(), 5)
        # the relay's connection: idle, outside any transaction, no xid, holding its lock
        row = await db.fetchrow(
            "SELECT a.state, a.backend_xid::text AS xid, a.backend_xmin::text AS xmin "
            "FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted")
        assert row is not None and dict(row) == {"state": "idle", "xid": None, "xmin": None}
        # a second relay of the same subjects finds it busy and publishes nothing
        assert await outbox.publish_batch(db, bus, HELD) == outbox.BUSY
        gated.gate.set()
        assert await task == 20
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        assert await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        # the lock is free again: the next batch (empty) runs
        assert await outbox.publish_batch(db, bus, HELD) == 0
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 20


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
