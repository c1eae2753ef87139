"""``bus.flushed``: once it returns, nats-server knows every subscription made before it, so a
request from another connection finds its responder (``Bus.serve`` relies on it before a service
says ready). nats-py's own ``flush()`` lets its PING overtake a SUB still queued for the
client's flusher; with it alone this test saw no responders in 4 rounds of 200."""

from __future__ import annotations

import nats.errors

from boxoffice import bus as busmod
from boxoffice.embedded import NatsServer
from tests.bus_support import connected

ROUNDS = 1000


async def test_a_subscription_is_known_to_the_server_once_flushed(nats_server: NatsServer) -> None:
    async with connected(nats_server, "payment") as payment, \
            connected(nats_server, "ingress") as ingress:
        async def answer(msg) -> None:
            await msg.respond(b"held")

        missed = []
        for n in range(ROUNDS):
            sub = await payment.nc.subscribe("reservations.hold", queue="payment", cb=answer)
            await busmod.flushed(payment.nc)
            try:
                await ingress.nc.request("reservations.hold", b"{}", timeout=2)
            except nats.errors.NoRespondersError:
                missed.append(n)
            await sub.unsubscribe()
            await busmod.flushed(payment.nc)
        assert missed == [], f"no responders in rounds {missed} of {ROUNDS}"
