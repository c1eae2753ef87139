"""The payment service: build and run."""

from __future__ import annotations

import sys

from boxoffice import bus as busmod
from boxoffice import db, outbox, runtime
from boxoffice.payment import handlers


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=20))
    bus = await svc.stack.enter_async_context(busmod.connect(cfg.nats_url, "payment"))
    await bus.declare_streams("RESERVATIONS", "PAYMENTS", "ERRORS")
    await svc.stack.enter_async_context(outbox.relay(cfg.database_url, pool, bus))
    await handlers.register(bus, pool)
    svc.stack.push_async_callback(bus.stop_serving)  # first: stop taking requests, finish in-flight
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("payment", build)


if __name__ == "__main__":
    sys.exit(main())
