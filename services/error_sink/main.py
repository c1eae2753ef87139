"""The error-sink: build and run."""

from __future__ import annotations

import sys

from boxoffice import bus as busmod
from boxoffice import db, runtime
from boxoffice.error_sink import sink
from boxoffice.wire.subjects import ERROR_SINK_CONSUMER


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=8))
    bus = await svc.stack.enter_async_context(busmod.connect(cfg.nats_url, "error-sink"))
    await bus.declare_streams("ERRORS", "ALERTS")
    stream, durable = ERROR_SINK_CONSUMER
    await bus.declare_consumer(stream, durable, ack_wait=30.0)
    await svc.stack.enter_async_context(
        busmod.pull_consumer(bus, stream, durable, sink.Writer(pool), batch=1000))
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("error_sink", build)


if __name__ == "__main__":
    sys.exit(main())
