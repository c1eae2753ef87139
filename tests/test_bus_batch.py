"""Publishing a batch at once (``bus_batch.publish_all``, the outbox relay's path: atomic batches,
and ``publish_each`` when JetStream refuses one): it returns only once every message is kept,
and raises ``ServiceUnavailable`` (the outbox rows stay) when any one is not."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy

from boxoffice import bus as busmod
from boxoffice import bus_batch, errors, outbox
from boxoffice.wire.subjects import error_report, payment_event, reservation_event

HELD = (reservation_event("held"),)
SUBJECT = reservation_event("held")


async def stream_headers(bus: busmod.Bus, n: int, subject: str = SUBJECT,
                         header: str = "Nats-Msg-Id") -> list[str | None]:
    """``header`` of the first ``n`` messages of ``subject``, in stream order (None: absent)."""
    sub = await bus.js.pull_subscribe(subject, durable=None,  # (no ack: no limit of pending)
                                      config=ConsumerConfig(ack_policy=AckPolicy.NONE))
    values: list[str | None] = []
    while len(values) < n:
        values += [(m.headers or {}).get(header)
                   for m in await sub.fetch(min(500, n - len(values)), timeout=5)]
    await sub.unsubscribe()
    return values


async def stream_ids(bus: busmod.Bus, n: int) -> list[str | None]:
    """The ``Nats-Msg-Id`` of the first ``n`` messages on RESERVATIONS, in stream order."""
    return await stream_headers(bus, n)


async def test_every_message_kept_once_in_order_duplicates_counted(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        batch = [(SUBJECT, b'{"n": %d}' % n, f"m{n}") for n in range(700)]
        assert await bus_batch.publish_all(bus, batch) == 0
        # published again (a relay that crashed before its commit): each one a duplicate
        assert await bus_batch.publish_all(bus, [*batch[:200], (SUBJECT, b"{}", "new")]) == 200
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 701
        assert await stream_ids(bus, 701) == [f"m{n}" for n in range(700)] + ["new"]
        assert await bus_batch.publish_all(bus, []) == 0


async def test_a_subject_without_a_stream_is_unavailable(nats_url: str) -> None:
    """No stream takes the subject: NATS answers 'no responders' for that message alone, and the
    whole batch fails, though its neighbours were kept."""
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        batch = [(SUBJECT, b"{}", "a"), ("nowhere.at.all", b"{}", "b"), (SUBJECT, b"{}", "c")]
        with pytest.raises(errors.ServiceUnavailable, match="503"):  # answered, not timed out
            await bus_batch.publish_all(bus, batch, timeout=30)


async def test_no_bus_is_unavailable_within_the_timeout(nats_server) -> None:
    async with busmod.connect(nats_server.url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        nats_server.kill()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(errors.ServiceUnavailable):
            await bus_batch.publish_all(bus, [(SUBJECT, b"{}", str(n)) for n in range(50)],
                                        timeout=1)
        assert loop.time() - started < 30  # not forever (the 1 s itself is not asserted)
        nats_server.start()


async def test_one_refused_message_keeps_every_row(nats_url: str, db: asyncpg.Pool) -> None:
    """JetStream keeps the first 5 messages of a batch of 10 and refuses the rest (a full stream
    that discards new messages): the relay's batch fails, all 10 rows stay; once the stream has
    room, the next batch publishes all 10 again and the first 5 are dropped as duplicates."""
    async with busmod.connect(nats_url, "test") as bus:
        full = dataclasses.replace(busmod.stream_config("RESERVATIONS"), max_msgs=5,
                                   discard=DiscardPolicy.NEW)
        await bus.js.add_stream(full)
        await db.execute("INSERT INTO outbox (subject, payload) SELECT $1, "
                         "jsonb_build_object('n', g) FROM generate_series(1, 10) g", SUBJECT)
        ids = [r["id"] for r in await db.fetch("SELECT id FROM outbox ORDER BY id")]
        with pytest.raises(errors.ServiceUnavailable, match="maximum messages"):
            await outbox.publish_batch(db, bus, HELD)
        assert await db.fetchval("SELECT count(*) FROM outbox") == 10
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 5
        await bus.declare_streams("RESERVATIONS")  # our configuration: no limit
        assert await outbox.publish_batch(db, bus, HELD) == 10
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 10
        assert await stream_ids(bus, 10) == [str(i) for i in ids]


async def test_a_refusal_is_raised_once_every_message_is_answered(nats_url: str) -> None:
    """A stream that takes 5 messages and refuses the rest: publish_each raises only after the
    server answered all 5,000 (the later ones are not left in its hands), so lifting the limit
    right after the failure stores none of them, and publishing again keeps them in order.
    (Raised at the first refusal, as it was, about a thousand of them were stored late here.)"""
    async with busmod.connect(nats_url, "test") as bus:
        full = dataclasses.replace(busmod.stream_config("RESERVATIONS"), max_msgs=5,
                                   discard=DiscardPolicy.NEW)
        await bus.js.add_stream(full)
        batch = [(SUBJECT, b"{}", str(n)) for n in range(5000)]
        with pytest.raises(errors.ServiceUnavailable, match="did not keep 4995 of 5000"):
            await bus_batch.publish_each(bus, batch, timeout=30)
        await bus.declare_streams("RESERVATIONS")  # our configuration: no limit
        await asyncio.sleep(0.2)  # a late message of the failed batch would be stored by now
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 5
        assert await bus_batch.publish_each(bus, batch) == 5  # the first 5: duplicates
        assert await stream_ids(bus, 5000) == [str(n) for n in range(5000)]


async def test_an_atomic_batch_is_kept_whole_or_not_at_all(nats_url: str) -> None:
    """A batch holding an id the stream keeps (the relay publishing again after a crash between
    the PubAck and its commit) is refused whole, and publish_all then keeps its new messages
    one by one, after the old ones, in order."""
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        assert (await bus.js.stream_info("RESERVATIONS")).config.allow_atomic
        first = [(SUBJECT, b'{"n": %d}' % n, f"m{n}") for n in range(100)]
        assert await bus_batch.publish_atomic(bus, first)
        again = [*first[50:], *[(SUBJECT, b"{}", f"new{n}") for n in range(50)]]
        assert not await bus_batch.publish_atomic(bus, again)
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 100  # none of it
        assert await bus_batch.publish_all(bus, again) == 50
        assert await stream_ids(bus, 150) == [f"m{n}" for n in range(100)] + [
            f"new{n}" for n in range(50)]


async def test_each_stream_gets_its_own_batches(nats_url: str) -> None:
    """Messages of two atomic streams and one other, interleaved, as one relay pass may hold
    them (and more than an atomic batch may: 1,000): each stream keeps its own, in order."""
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS", "PAYMENTS", "ERRORS")
        subjects = [SUBJECT, payment_event("created"), error_report("payment", "error")]
        batch = [(subjects[n % 3], b"{}", f"x{n}") for n in range(3300)]
        assert await bus_batch.publish_all(bus, batch) == 0
        for stream in ("RESERVATIONS", "PAYMENTS", "ERRORS"):
            assert (await bus.js.stream_info(stream)).state.messages == 1100
        assert await stream_ids(bus, 1100) == [f"x{n}" for n in range(0, 3300, 3)]
        # kept as atomic batches of at most 1,000 (the server's limit): two a stream; ERRORS's
        # messages one by one
        for subject, batches in ((SUBJECT, 2), (subjects[1], 2), (subjects[2], 0)):
            seen = await stream_headers(bus, 1100, subject, "Nats-Batch-Id")
            assert len({b for b in seen if b}) == batches
            assert seen.count(None) == (1100 if batches == 0 else 0)
        assert await bus_batch.publish_all(bus, batch) == 3300  # again: all duplicates


async def test_a_stream_that_refuses_atomic_batches_keeps_each_message_once(
        nats_url: str) -> None:
    """RESERVATIONS as a version before atomic batches declared it: the batch is refused and
    every message published on its own instead."""
    async with busmod.connect(nats_url, "test") as bus:
        await bus.js.add_stream(dataclasses.replace(busmod.stream_config("RESERVATIONS"),
                                                    allow_atomic=None))
        batch = [(SUBJECT, b"{}", f"m{n}") for n in range(200)]
        assert not await bus_batch.publish_atomic(bus, batch)
        assert await bus_batch.publish_all(bus, batch) == 0
        assert await bus_batch.publish_all(bus, batch) == 200
        assert await stream_ids(bus, 200) == [f"m{n}" for n in range(200)]
        assert (await bus.js.stream_info("RESERVATIONS")).state.messages == 200
