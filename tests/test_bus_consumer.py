"""The one pull consumer (``boxoffice.consumer.PullConsumer``): batches or single messages
handed over and settled, a failed batch put back at once when asked, and messages fetched but not
handed over nak'ed at stop, so that they come back at once rather than after ``ack_wait``."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.msg import Msg

from boxoffice import bus as busmod
from boxoffice.consumer import PullConsumer, ack_all, pull_consumer, settle
from tests.harness import eventually

STREAM = "ERRORS"
ACK_WAIT = 30.0  # longer than any test waits: what comes back early was nak'ed


async def _consumer(bus: busmod.Bus, n: int) -> tuple[str, str]:
    """A durable of its own on a subject of its own, with ``n`` messages waiting."""
    tag = uuid.uuid4().hex[:12]
    subject, durable = f"errors.t{tag}.error", f"t{tag}"
    await bus.declare_streams(STREAM)
    await bus.declare_consumer(STREAM, durable, filter_subject=subject, ack_wait=ACK_WAIT)
    for i in range(n):
        await bus.publish(subject, str(i).encode(), f"{tag}-{i}")
    return subject, durable


async def test_batches_are_handed_over_and_acked(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        _, durable = await _consumer(bus, 20)
        got: list[bytes] = []
        sizes: list[int] = []  # checked after the run: an assert in a handler would be caught

        async def handle(msgs: list[Msg]) -> None:
            sizes.append(len(msgs))
            for msg in msgs:
                got.append(msg.data)
                await settle(msg, "ack")

        async def all_acked() -> bool:
            info = await bus.js.consumer_info(STREAM, durable)
            return len(got) == 20 and info.num_pending == 0 and info.num_ack_pending == 0

        async with pull_consumer(bus, STREAM, durable, handle, batch=8, lanes=2):
            await eventually(all_acked, 10, "20 messages acked")
        assert sorted(got, key=int) == [str(i).encode() for i in range(20)]
        assert sizes and all(1 <= n <= 8 for n in sizes), sizes


async def test_single_messages_are_handed_over_one_by_one(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        _, durable = await _consumer(bus, 5)
        got: list[object] = []

        async def handle(msg: Msg) -> None:
            got.append(msg)
            await settle(msg, "term" if msg.data == b"3" else "ack")

        async def all_settled() -> bool:
            info = await bus.js.consumer_info(STREAM, durable)
            return len(got) == 5 and info.num_ack_pending == 0

        async with pull_consumer(bus, STREAM, durable, handle, batched=False):
            await eventually(all_settled, 10, "5 messages settled")
        assert all(isinstance(m, Msg) for m in got)  # one message a call, not a list
        assert [m.data for m in got] == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_failed_batch_is_put_back_at_once(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        _, durable = await _consumer(bus, 3)
        deliveries: list[bytes] = []
        failed = False

        async def handle(msgs: list[Msg]) -> None:
            nonlocal failed
            deliveries.extend(m.data for m in msgs)
            if not failed:
                failed = True
                raise ConnectionResetError("the database went away")
            for msg in msgs:
                await settle(msg, "ack")

        async def all_acked() -> bool:
            info = await bus.js.consumer_info(STREAM, durable)
            return failed and info.num_pending == 0 and info.num_ack_pending == 0

        async with pull_consumer(bus, STREAM, durable, handle, batch=10, nak_delay=0.1):
            # well before ack_wait: they were nak'ed
            await eventually(all_acked, 10, "the nak'ed batch back and acked")
        assert sorted(deliveries) == [b"0", b"0", b"1", b"1", b"2", b"2"]


async def test_what_was_fetched_but_not_handed_over_is_naked_at_close(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        subject, durable = await _consumer(bus, 1)
        lane = PullConsumer(bus, STREAM, durable, lambda _msgs: asyncio.sleep(0))
        first = await lane.fetch(batch=10, wait=3.0)
        assert [m.data for m in first] == [b"0"]
        # the pull request still asks for 9 more: these arrive after the batch was handed over
        for i in (1, 2):
            await bus.publish(subject, str(i).encode(), f"{durable}-late-{i}")
        await asyncio.sleep(0.3)
        await lane.close()
        await settle(first[0], "ack")

        again = PullConsumer(bus, STREAM, durable, lambda _msgs: asyncio.sleep(0))
        try:
            back = await again.fetch(batch=10, wait=2.0)
        finally:
            await again.close()
        assert sorted(m.data for m in back) == [b"1", b"2"]  # not after ack_wait: nak'ed


async def test_ack_all_acks_each_message_of_a_batch_in_one_write(nats_url: str) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        _, durable = await _consumer(bus, 300)
        lane = PullConsumer(bus, STREAM, durable, lambda _msgs: asyncio.sleep(0))
        try:
            first = await lane.fetch(batch=200, wait=3.0)
            second = await lane.fetch(batch=200, wait=3.0)
            assert len(first) == 200 and len(second) == 100
            await ack_all(bus, second)  # the later batch first: only its messages are acked

            async def acked(pending: int) -> bool:
                info = await bus.js.consumer_info(STREAM, durable)
                return info.num_pending == 0 and info.num_ack_pending == pending

            await eventually(lambda: acked(200), 10, "the second batch acked, the first not")
            await ack_all(bus, first)
            await eventually(lambda: acked(0), 10, "every message acked")
            assert await lane.fetch(batch=10, wait=0.5) == []  # nothing comes back
        finally:
            await lane.close()


async def test_a_lane_keeps_its_subscriptions_accounts(nats_url: str) -> None:
    """The lane takes messages from nats-py's queue itself: the subscription's pending bytes
    go back to zero (else its byte limit would drop messages as a slow consumer) and each message
    is marked done (else a drain of the subscription or the connection waits forever)."""
    async with busmod.connect(nats_url, "test") as bus:
        _, durable = await _consumer(bus, 50)
        lane = PullConsumer(bus, STREAM, durable, lambda _msgs: asyncio.sleep(0))
        try:
            got = await lane.fetch(batch=50, wait=3.0)
            assert len(got) == 50
            sub = lane._sub
            assert sub is not None and sub.pending_msgs == 0 and sub.pending_bytes == 0
            await asyncio.wait_for(sub.drain(), 5)
        finally:
            await lane.close()
