"""The webhook service: build and run.

Torn down in reverse: stop fetching (the batch in hand is finished and acked), stop answering
operators, stop auditing, stop reconciling with Stripe, stop the Stripe action worker and the
outbox relay, close the Stripe client, drain NATS, close the pool.
"""

from __future__ import annotations

import sys

from boxoffice import db, runtime
from boxoffice.consumer import pull_consumer
from boxoffice.webhook import actions, audit, handlers, reconcile, refunds, stripe_events
from boxoffice.wire.subjects import WEBHOOK_CONSUMER

BATCH = 512
CONCURRENCY = 32
# Stripe events are applied on this many connections, in batches: a batch holds the buckets of
# its holds until its commit, so more lanes than PostgreSQL has cores to run them only wait
# (measured on two cores: 2 lanes applied 1.2 to 1.7 times the events/s of 4 or 32)
LANES = 2


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=CONCURRENCY + 4))
    bus = await svc.connect_bus("webhook", "STRIPE_EVENTS", "PAYMENTS", "RESERVATIONS", "ERRORS")
    stream, durable = WEBHOOK_CONSUMER
    # No max_deliver: a delivery that fails because PostgreSQL is down must never be the last
    # one. Attempts that fail for the event's own sake are counted in webhook_events_log and
    # end with the row marked failed (stripe_events.py); back-off is the nak delay.
    await bus.declare_consumer(stream, durable, ack_wait=stripe_events.ACK_WAIT, max_deliver=-1,
                               max_ack_pending=20000)
    stripe = await svc.stack.enter_async_context(refunds.client(cfg))
    relay_wake = await svc.relay_outbox(pool, bus)
    # refunds and cancels decided in the database are made at Stripe by this worker
    await svc.stack.enter_async_context(actions.worker(cfg.database_url, pool, stripe))
    # what webhooks missed is recovered from Stripe's own records (reconcile.py)
    await svc.stack.enter_async_context(reconcile.running(reconcile.Reconciler(
        pool, bus, stripe.client, reconcile.Settings(cfg.stripe_reconcile_interval_seconds,
                                                     cfg.stripe_reconcile_grace_seconds))))
    live = (cfg.stripe_api_key or "").startswith(("sk_live_", "rk_live_"))
    processor = stripe_events.Processor(pool, cfg.webhook_retry_delays, relay_wake, live=live)
    await handlers.register(bus, processor)
    # the self-audit's check of our books against Stripe's (audit.py)
    await svc.stack.enter_async_context(audit.running(cfg, bus, stripe.client))
    svc.stack.push_async_callback(bus.stop_serving)
    handle = await svc.stack.enter_async_context(
        stripe_events.running(stripe_events.Consumer(processor, concurrency=LANES,
                                                     backlog=BATCH // 2,
                                                     batch_size=cfg.webhook_batch_size)))
    await svc.stack.enter_async_context(
        pull_consumer(bus, stream, durable, handle, batch=BATCH))
    runtime.standard_checks(svc, bus=bus, pool=pool)


def main() -> int:
    return runtime.run("webhook", build)


if __name__ == "__main__":
    sys.exit(main())
