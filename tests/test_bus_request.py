"""Bus.request's own reply path (one reply subscription per Bus, a future per request): many
requests in flight answered out of order, a timeout among them, a reply after its timeout
dropped, cancellation, no responders, and the reply subscription kept across a reconnect, with
the services' own NATS users (the fixture fails a test whose server refused anything)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.msg import Msg

from boxoffice import bus as busmod
from boxoffice import errors, logs, wire
from boxoffice.embedded import NatsServer


class Ask(msgspec.Struct):
    n: int


class Answer(msgspec.Struct):
    n: int


def _answer(n: int) -> bytes:
    return wire.encode(wire.Reply(ok=True, data=msgspec.Raw(wire.encode(Answer(n * 10)))))


async def test_requests_answered_out_of_order_with_a_timeout_and_a_late_reply(
        nats_server: NatsServer) -> None:
    """64 requests held by a raw responder, then answered in reverse order; one of them times
    out first and its reply, sent afterwards, is dropped; each caller gets its own answer, its
    request id travels, and no entry is left behind."""
    held: list[Msg] = []
    all_in = asyncio.Event()
    late = 7  # the request whose caller gives up before any answer

    async with busmod.connect(nats_server.url_for("payment"), "payment") as server, \
            busmod.connect(nats_server.url_for("ingress"), "ingress") as client:

        async def hold(msg: Msg) -> None:
            held.append(msg)
            if len(held) == 64:
                all_in.set()

        await server.nc.subscribe("reservations.hold", queue="payment", cb=hold)
        await busmod.flushed(server.nc)

        async def ask(n: int) -> Answer:
            logs.REQUEST_ID.set(f"req-{n}")
            return await client.request("reservations.hold", Ask(n), Answer,
                                        timeout=0.5 if n == late else 10)

        calls = [asyncio.create_task(ask(n)) for n in range(64)]
        await asyncio.wait_for(all_in.wait(), 10)
        assert {m.headers[busmod.REQUEST_ID_HEADER] for m in held if m.headers} == \
            {f"req-{n}" for n in range(64)}
        with pytest.raises(errors.ServiceTimeout):
            await calls[late]
        assert len(client._waiting) == 63  # the timed-out request's entry is gone
        for msg in reversed(held):  # out of order, the late one's reply too
            await server.nc.publish(msg.reply, _answer(wire.decode(msg.data, Ask).n))
        answers = await asyncio.wait_for(asyncio.gather(*(c for n, c in enumerate(calls)
                                                          if n != late)), 10)
        assert [a.n for a in answers] == [n * 10 for n in range(64) if n != late]
        assert client._waiting == {}
        # the late reply went nowhere: the next request on the same Bus gets its own answer
        nxt = asyncio.create_task(client.request("reservations.hold", Ask(100), Answer, timeout=10))
        for _ in range(500):
            if len(held) == 65:
                break
            await asyncio.sleep(0.01)
        await server.nc.publish(held[-1].reply, _answer(100))
        assert (await asyncio.wait_for(nxt, 10)).n == 1000


async def test_cancelled_request_leaves_nothing_and_no_responders_is_unavailable(
        nats_server: NatsServer) -> None:
    async with busmod.connect(nats_server.url_for("payment"), "payment") as server, \
            busmod.connect(nats_server.url_for("ingress"), "ingress") as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(errors.ServiceUnavailable, match="no service answers"):
            await client.request("reservations.hold", Ask(1), Answer, timeout=5)
        # retried briefly (NO_RESPONDER_RETRIES), not until the timeout
        assert loop.time() - started < 4.5
        assert client._waiting == {}

        got = asyncio.Event()

        async def silent(_msg: Msg) -> None:
            got.set()

        await server.nc.subscribe("reservations.hold", queue="payment", cb=silent)
        await busmod.flushed(server.nc)
        call = asyncio.create_task(client.request("reservations.hold", Ask(2), Answer, timeout=10))
        await asyncio.wait_for(got.wait(), 10)
        assert len(client._waiting) == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert client._waiting == {}


async def test_reply_subscription_survives_a_reconnect(nats_server: NatsServer) -> None:
    async def handle(req: Ask) -> Answer:
        return Answer(req.n + 1)

    async with busmod.connect(nats_server.url_for("ingress"), "ingress") as client:
        async with busmod.connect(nats_server.url_for("payment"), "payment") as server:
            await server.serve("reservations.hold", Ask, handle, queue="payment")
            assert (await client.request("reservations.hold", Ask(1), Answer)).n == 2
            nats_server.kill()
            nats_server.start()
            for _ in range(300):  # both clients back (reconnect_time_wait 0.5 s)
                if all(b.connected and b.nc.stats["reconnects"] for b in (client, server)):
                    break
                await asyncio.sleep(0.05)
            assert all(b.connected and b.nc.stats["reconnects"] for b in (client, server))
            # the served subject may take a moment to be known again: no responders is retried
            assert (await client.request("reservations.hold", Ask(5), Answer, timeout=10)).n == 6
            assert client._waiting == {}
