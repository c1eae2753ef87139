"""The reaper's part of the self-audit: inventory, money against tickets, timeliness, errors.

These checks read the database and the bus, nothing else; the reaper already reads across the
domains for retention and runs on timers, and it holds no Stripe key, so the check of our books
against Stripe's runs in the webhook service (``boxoffice.webhook.audit``). The audit has a
small pool of its own, so a long full pass never takes a connection the expiry timer needs.

Bus subjects: ``admin.reaper.audit`` (run these checks now) and ``admin.reaper.invariants``
(the last run of every check, the Stripe check's included, and the open findings).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from boxoffice import audit, db
from boxoffice.bus import Bus
from boxoffice.config import Config
from boxoffice.reaper.audit_errors import Errors
from boxoffice.reaper.audit_inventory import Inventory
from boxoffice.reaper.audit_money import Money
from boxoffice.reaper.audit_timeliness import Timeliness
from boxoffice.wire import audit as wire

QUEUE = "reaper"
RUN_TIMEOUT = 540.0  # ingress waits 600 s for an answer


@contextlib.asynccontextmanager
async def running(cfg: Config, bus: Bus) -> AsyncIterator[audit.Auditor]:
    """Audit on the timer and answer the audit's subjects; stop both on exit."""
    assert cfg.database_url is not None
    async with db.pool(cfg.database_url, min_size=1, max_size=3) as pool:
        checks = [Inventory(pool), Money(pool),
                  Timeliness(pool, bus, grace=cfg.audit_grace_seconds),
                  Errors(pool, bus, retention_days=cfg.error_retention_days)]
        auditor = audit.Auditor(pool, checks, interval=cfg.audit_interval_seconds)
        async with audit.running(auditor):
            await register(bus, auditor)
            yield auditor


async def register(bus: Bus, auditor: audit.Auditor) -> None:
    async def run(req: wire.RunRequest) -> wire.Invariants:
        return await db.guarded(auditor.run(req.full, timeout=RUN_TIMEOUT))

    async def invariants(req: wire.InvariantsRequest) -> wire.Invariants:
        return await db.guarded(audit.invariants(auditor.pool, wire.CHECKS, req.limit))

    await bus.serve(wire.RUN_REAPER, wire.RunRequest, run, queue=QUEUE)
    await bus.serve(wire.INVARIANTS, wire.InvariantsRequest, invariants, queue=QUEUE)

