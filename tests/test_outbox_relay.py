"""Replicas of an outbox relay share the rows (SKIP LOCKED) and publish each row once."""

from __future__ import annotations

import asyncio

import asyncpg

from boxoffice import bus as busmod
from boxoffice import outbox
from boxoffice.wire.subjects import reservation_event
from tests.harness import eventually
from tests.sql_support import rows_read

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
            await _published(bus, 1, 5, "the row published without a sweep")
        finally:
            stopping.set()
            wake.set()
            await task
    assert calls >= 2


async def test_a_pass_takes_the_smallest_ids_of_its_subjects_in_order(db: asyncpg.Pool) -> None:
    subjects = [reservation_event("held"), reservation_event("cancelled")]
    ids = [await db.fetchval("INSERT INTO outbox (subject, payload) VALUES ($1, '{}') "
                             "RETURNING id", subject)
           for subject in [subjects[0], reservation_event("expired"), subjects[1], subjects[1],
                           subjects[0], subjects[1], subjects[0]]]
    async with db.acquire() as conn, conn.transaction():
        got = await conn.fetch(outbox.CLAIM, subjects, 4)
        # the expired row is not one of them; the four smallest of the other six, in id order
        assert [r["id"] for r in got] == [ids[0], ids[2], ids[3], ids[4]]
    async with db.acquire() as conn, conn.transaction():
        assert [r["id"] for r in await conn.fetch(outbox.CLAIM, subjects, 2)] == [ids[0], ids[2]]
        async with db.acquire() as other, other.transaction():
            # a replica's pass meanwhile: what the first pass locked (up to its limit of each
            # subject: ids 0, 2, 3 and 4) is skipped, and the rest taken, in id order
            rest = await other.fetch(outbox.CLAIM, subjects, 2)
            assert [r["id"] for r in rest] == [ids[5], ids[6]]


async def test_a_pass_does_not_read_a_backlog_of_other_subjects(db: asyncpg.Pool) -> None:
    # 20,000 expiry events waiting (the reaper's) before 30 rows of payment's subjects: a pass of
    # payment's relay reads its 30 (through the outbox's index on (subject, id)), with the
    # planner's statistics gathered as autovacuum would. Through the primary key, filtering on
    # the subject, it read all 20,030 (10 ms for 100,000)
    await db.execute("INSERT INTO outbox (subject, payload) SELECT $1, jsonb_build_object('n', g) "
                     "FROM generate_series(1, 20000) g", reservation_event("expired"))
    await db.execute(ROWS, 30)
    await db.execute("ANALYZE outbox")
    subjects = [reservation_event("held"), reservation_event("cancelled")]
    async with db.acquire() as conn, conn.transaction():
        before = await rows_read(conn, "outbox")
        got = await conn.fetch(outbox.CLAIM, subjects, 500)
        assert len(got) == 30
        assert await rows_read(conn, "outbox") - before <= 100
        # and the reaper's pass reads the 500 it takes of its 20,000, not all of them to sort
        before = await rows_read(conn, "outbox")
        got = await conn.fetch(outbox.CLAIM, [reservation_event("expired")], 500)
        assert len(got) == 500
        assert await rows_read(conn, "outbox") - before <= 600


async def _messages(bus: busmod.Bus) -> int:
    return (await bus.js.stream_info("RESERVATIONS")).state.messages


async def _published(bus: busmod.Bus, n: int, timeout: float, what: str) -> None:
    """Wait until RESERVATIONS holds ``n`` messages."""
    async def there() -> bool:
        return await _messages(bus) == n
    await eventually(there, timeout=timeout, what=what)


async def test_a_pass_makes_way_for_the_gates_work_until_it_ends(nats_url: str,
                                                                   db: asyncpg.Pool) -> None:
    """Rows written and announced while the gate's work runs stay unpublished until that work
    ends (all of it, when pieces overlap); then they go out at once (no sweep: the relay's sweep
    is a minute away)."""
    gate = outbox.Gate(most=30)
    wake, stopping = asyncio.Event(), asyncio.Event()
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        task = asyncio.create_task(
            outbox.run_relay(db, bus, HELD, stopping, wake, sweep_interval=60, gate=gate))
        try:
            # two pieces of work overlapping, the first to begin ends first: the gate opens
            # when the last one ends
            first, second = gate.busy(), gate.busy()
            first.__enter__()
            await db.execute(ROWS, 40)
            wake.set()
            second.__enter__()
            await asyncio.sleep(0.3)
            first.__exit__(None, None, None)
            await asyncio.sleep(0.5)
            assert await _messages(bus) == 0
            assert await db.fetchval("SELECT count(*) FROM outbox") == 40
            second.__exit__(None, None, None)
            ended = asyncio.get_running_loop().time()

            await _published(bus, 40, 5, "the rows published once the work ended")
            assert asyncio.get_running_loop().time() - ended < 3
        finally:
            stopping.set()
            wake.set()
            await task


async def test_the_gate_holds_a_pass_back_at_most_its_bound(nats_url: str,
                                                            db: asyncpg.Pool) -> None:
    """Work that outlasts ``most`` no longer holds the rows back: they are published while it
    still runs, not before ``most`` seconds after it began."""
    gate = outbox.Gate(most=2.0)
    wake, stopping = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        task = asyncio.create_task(
            outbox.run_relay(db, bus, HELD, stopping, wake, sweep_interval=60, gate=gate))
        try:
            with gate.busy():
                began = loop.time()
                await db.execute(ROWS, 10)
                wake.set()

                await _published(bus, 10, 10, "the rows published during the work")
                assert loop.time() - began >= 2.0
                # and later rows during the same work go out at once, not a bound later
                more = loop.time()
                await db.execute(ROWS, 5)
                wake.set()

                await _published(bus, 15, 10, "later rows published")
                assert loop.time() - more < 1.5
        finally:
            stopping.set()
            wake.set()
            await task


async def test_a_relay_behind_does_not_wait_for_the_next_piece_of_work(nats_url: str,
                                                                         db: asyncpg.Pool,
                                                                         monkeypatch) -> None:
    """Work back to back (a sweep right after a sweep) would hold a relay to one pass per piece
    if each piece held it back anew: a relay whose last pass was full does not wait, so the
    backlog goes out at once, not a bound per pass later."""
    gate = outbox.Gate(most=2.0)
    real = outbox.publish_batch
    passes: list[float] = []
    first, second = gate.busy(), gate.busy()
    loop = asyncio.get_running_loop()

    async def counted(pool, bus, subjects, limit=500):  # type: ignore[no-untyped-def]
        n = await real(pool, bus, subjects, limit)
        passes.append(loop.time())
        if len(passes) == 1:  # the first piece of work ends, the next begins at once
            first.__exit__(None, None, None)
            second.__enter__()
        return n

    monkeypatch.setattr(outbox, "publish_batch", counted)
    wake, stopping = asyncio.Event(), asyncio.Event()
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        task = asyncio.create_task(outbox.run_relay(db, bus, HELD, stopping, wake,
                                                    sweep_interval=60, gate=gate, batch=10))
        try:
            first.__enter__()
            await db.execute(ROWS, 35)
            wake.set()

            async def four_passes() -> bool:
                return len(passes) == 4
            await eventually(four_passes, timeout=15, what="the backlog published")
            assert await _messages(bus) == 35
            # the first pass waited for the first piece's bound; the other three did not wait
            # for the second piece's
            assert passes[-1] - passes[0] < 1.5
        finally:
            second.__exit__(None, None, None)
            stopping.set()
            wake.set()
            await task
