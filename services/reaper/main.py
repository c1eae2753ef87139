"""The reaper: build and run."""

from __future__ import annotations

import sys

from boxoffice import bus as busmod
from boxoffice import db, outbox, runtime
from boxoffice.reaper import expiry


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=4))
    bus = await svc.stack.enter_async_context(busmod.connect(cfg.nats_url, "reaper"))
    await bus.declare_streams("RESERVATIONS", "ERRORS")
    await svc.stack.enter_async_context(outbox.relay(cfg.database_url, pool, bus))
    await svc.stack.enter_async_context(expiry.run(pool))
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("reaper", build)


if __name__ == "__main__":
    sys.exit(main())
