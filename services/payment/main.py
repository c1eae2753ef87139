"""The payment service: build and run."""

from __future__ import annotations

import gc
import logging
import os
import sys

from boxoffice import db, runtime
from boxoffice.payment import handlers, intents, stripe_client

log = logging.getLogger("boxoffice.payment")

# As ingress (boxoffice.ingress.main): start-up's objects frozen out of full collections, and a
# first threshold that the objects of the holds in flight do not pass every few dozen requests.
# At CPython's defaults, 15,680 holds made 623 young, 57 middle and 5 full collections here
# (650 ms of pauses, the longest 127 ms).
GC_THRESHOLD = (5_000, 10, 10)


def failpoints() -> frozenset[str]:
    """BOXOFFICE_FAILPOINT (test only): comma-separated crash points, see intents.FAILPOINTS."""
    raw = os.environ.get("BOXOFFICE_FAILPOINT", "")
    points = frozenset(p.strip() for p in raw.split(",") if p.strip())
    unknown = points - set(intents.FAILPOINTS)
    if unknown:
        raise SystemExit("boxoffice payment: BOXOFFICE_FAILPOINT has unknown points "
                         f"{sorted(unknown)}")
    if points:
        log.warning("test failpoints armed: %s", ", ".join(sorted(points)))
    return points


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    assert cfg.database_url is not None
    points = failpoints()
    pool = await svc.stack.enter_async_context(db.pool(cfg.database_url, max_size=20))
    gateway = await svc.stack.enter_async_context(stripe_client.gateway(cfg))
    bus = await svc.connect_bus("payment", "RESERVATIONS", "PAYMENTS", "ERRORS")
    relay_wake = await svc.relay_outbox(pool, bus)
    deps = intents.Deps(pool=pool, stripe=gateway, failpoints=points, relay_wake=relay_wake)
    await handlers.register(bus, pool, deps, reservation_ttl_seconds=cfg.reservation_ttl_seconds)
    svc.stack.push_async_callback(bus.stop_serving)  # first: stop taking requests, finish in-flight
    runtime.standard_checks(svc, bus=bus, pool=pool)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main() -> int:
    return runtime.run("payment", build)


if __name__ == "__main__":
    sys.exit(main())
