"""The reaper: build and run.

Resources in start order (torn down in reverse): the pool, the bus, the outbox relay that
publishes expiry events (making way for the expiry sweeps, ``outbox.Gate``), the expiry timer
and its listener, retention, the operators' action log (kept from the AUDIT stream), the cron
monitors' watch, the admin handlers, the self-audit.
"""

from __future__ import annotations

import sys

from boxoffice import db, outbox, runtime
from boxoffice.reaper import admin_actions, audit, expiry, handlers, monitors, retention


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=6))
    bus = await svc.connect_bus("reaper", "RESERVATIONS", "ERRORS")
    gate = outbox.Gate()  # the relay of expiry events makes way for the sweeps that write them
    await svc.relay_outbox(pool, bus, gate, expiry.EVENTS_BATCH)
    settings = expiry.Settings(batch=cfg.reaper_batch_size, sweep_seconds=cfg.reaper_sweep_seconds,
                               arm_seconds=cfg.reaper_arm_seconds)
    await svc.stack.enter_async_context(expiry.run(pool, cfg.database_url, settings, gate))
    ages = retention.Ages(idempotency_key_hours=cfg.idempotency_key_ttl_hours,
                          webhook_log_days=cfg.webhook_log_retention_days,
                          error_days=cfg.error_retention_days)
    await svc.stack.enter_async_context(
        retention.run(pool, ages, cfg.reaper_retention_interval_seconds))
    await svc.stack.enter_async_context(admin_actions.keeping(bus, pool))
    await svc.stack.enter_async_context(monitors.watching(pool, bus))
    await handlers.register(bus, pool, cfg.reaper_batch_size)
    await svc.stack.enter_async_context(audit.running(cfg, bus))
    svc.stack.push_async_callback(bus.stop_serving)  # first: stop taking requests, finish in-flight
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("reaper", build)


if __name__ == "__main__":
    sys.exit(main())
