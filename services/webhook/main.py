"""The webhook service: build and run."""

from __future__ import annotations

import sys

from boxoffice import bus as busmod
from boxoffice import db, outbox, runtime
from boxoffice.webhook import consumer
from boxoffice.wire.subjects import WEBHOOK_CONSUMER


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=16))
    bus = await svc.stack.enter_async_context(busmod.connect(cfg.nats_url, "webhook"))
    await bus.declare_streams("STRIPE_EVENTS", "PAYMENTS", "RESERVATIONS", "ERRORS")
    stream, durable = WEBHOOK_CONSUMER
    await bus.declare_consumer(stream, durable, ack_wait=30.0, max_deliver=consumer.MAX_DELIVER)
    await svc.stack.enter_async_context(outbox.relay(cfg.database_url, pool, bus))
    handle = consumer.Handler(pool)
    await svc.stack.enter_async_context(busmod.pull_consumer(bus, stream, durable, handle))
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("webhook", build)


if __name__ == "__main__":
    sys.exit(main())
