"""The error-sink: build and run.

Resources in order (torn down in reverse): the pool, the bus, the alert relay, the consumer
lanes writing ERRORS into error_logs, the operator queries on admin.errors.*.
"""

from __future__ import annotations

import gc
import sys

from boxoffice import db, runtime
from boxoffice.error_sink import admin, alerts, items, report_intake, store
from boxoffice.wire.subjects import ERROR_SINK_CONSUMER

LANES = 3
# Reports per transaction. Each batch upserts its groups' rows (a few dozen for any size), whose
# row locks the other lanes wait on until it commits, and pays a commit: bench.errors, alternated
# runs, 1,000 a batch stored 36,675 and 41,601 reports a second, 2,000 a batch 42,707 and 43,995,
# with 10 against 9 us of PostgreSQL CPU a report.
BATCH = 2000
# A batch takes well under a second; a report delivered to a sink that was killed comes back
# after ack_wait. max_ack_pending bounds what is out to all replicas at once.
ACK_WAIT = 15.0
MAX_ACK_PENDING = 20_000
# Every report allocates a few dozen objects (the bus message, the decoded report, the row), and
# up to MAX_ACK_PENDING messages wait in memory: with the default thresholds (700, 10, 10) the
# cyclic collector ran ~500 times per 100,000 reports and took ~5% of the sink's CPU, walking
# objects that hold no cycles. What exists once started is frozen out of its walks.
GC_THRESHOLD = (20_000, 20, 20)


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=4))
    bus = await svc.connect_bus("error-sink", "ERRORS", "ALERTS")
    stream, durable = ERROR_SINK_CONSUMER
    await bus.declare_consumer(stream, durable, ack_wait=ACK_WAIT, max_ack_pending=MAX_ACK_PENDING)
    wake_alerts = await svc.stack.enter_async_context(
        alerts.relay(pool, bus, cfg.alert_webhook_url, cfg.alert_webhook_secret))
    writers = await svc.stack.enter_async_context(store.writer_pool(cfg.database_url, LANES))
    policy = store.AlertPolicy(rate_per_minute=cfg.alert_rate_per_minute,
                               window_seconds=cfg.alert_window_seconds)
    await svc.stack.enter_async_context(
        report_intake.lanes(bus, writers, stream, durable, policy, wake_alerts.set,
                            count=LANES, batch=BATCH))
    await svc.stack.enter_async_context(items.keeping(bus, pool))
    await admin.register(bus, pool)
    await items.register(bus, pool)
    svc.stack.push_async_callback(bus.stop_serving)
    runtime.standard_checks(svc, bus=bus, pool=pool)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main() -> int:
    return runtime.run("error_sink", build)


if __name__ == "__main__":
    sys.exit(main())
