"""The webhook service's part of the self-audit: our books against Stripe's.

It runs here because this service already holds the Stripe key and owns what it compares
(payments, refunds, Stripe's events); the reaper, which runs the other checks, has no Stripe key
and should not get one. It shares the audit's tables, timer and rules with the reaper
(``boxoffice.audit``) and has a small pool of its own, so a long pass never takes a connection
the event consumer needs.

Bus subject: ``admin.webhook.audit`` (run the Stripe check now); the reaper answers
``admin.reaper.invariants`` for every check, this one included.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import stripe

from boxoffice import audit, db
from boxoffice.bus import Bus
from boxoffice.config import Config
from boxoffice.webhook.audit_stripe import StripeCheck
from boxoffice.webhook.audit_stripe_reads import StripeReads
from boxoffice.wire import audit as wire

QUEUE = "webhook"
RUN_TIMEOUT = 540.0  # ingress waits 600 s for an answer


@contextlib.asynccontextmanager
async def running(cfg: Config, bus: Bus, client: stripe.StripeClient
                  ) -> AsyncIterator[audit.Auditor]:
    """Audit on the timer and answer ``admin.webhook.audit``; stop both on exit."""
    assert cfg.database_url is not None
    async with db.pool(cfg.database_url, min_size=1, max_size=3) as pool:
        check = StripeCheck(pool, StripeReads(client), grace=cfg.audit_grace_seconds)
        auditor = audit.Auditor(pool, [check], interval=cfg.audit_interval_seconds)
        async with audit.running(auditor):
            async def run(req: wire.RunRequest) -> wire.Invariants:
                return await db.guarded(auditor.run(req.full, timeout=RUN_TIMEOUT))

            await bus.serve(wire.RUN_WEBHOOK, wire.RunRequest, run, queue=QUEUE)
            yield auditor
