"""Ingress: build the aiohttp app and run it.

Ingress holds no database credentials and no Stripe secret key: every state change is a request
to the service that owns the state, every accepted event a JetStream publish.
"""

from __future__ import annotations

import gc
import sys

from aiohttp import web

from boxoffice import bus as busmod
from boxoffice import runtime
from boxoffice.config import Config
from boxoffice.ingress import contract, domains, http_metrics
from boxoffice.ingress.http import CONFIG, problems
from boxoffice.ingress.state import BUS

# The collector's first threshold: at CPython's 700, the objects of 64 requests in flight passed
# it every few dozen requests (about 200 young and one full collection per 8,000 webhooks, 83 ms
# of pauses); at 5,000 a young collection is rare (one in the same load) and still short (~1 ms).
GC_THRESHOLD = (5_000, 10, 10)


def create_app(cfg: Config, bus: busmod.Bus, svc: runtime.Service) -> web.Application:
    app = web.Application(middlewares=[http_metrics.measure, problems],
                          client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[BUS] = bus
    runtime.add_health_routes(app, svc, metrics=False)  # /metrics: on HEALTH_PORT only
    for domain in domains.ALL:
        domain.setup(app)
    contract.setup(app)  # /openapi.json, /asyncapi.json, /docs: of the domains above
    return app


async def build(svc: runtime.Service) -> None:
    cfg = svc.config
    bus = await svc.stack.enter_async_context(
        busmod.connect(cfg.nats_url, "ingress", ca_file=cfg.nats_ca_file,
                       stream_replicas=cfg.nats_stream_replicas))
    await bus.declare_streams("STRIPE_EVENTS", "ERRORS", "AUDIT", "SENTRY_ITEMS")
    runtime.standard_checks(svc, bus=bus)
    svc.app = create_app(cfg, bus, svc)
    # What start-up built (modules, routes, the API document: ~50,000 objects) lives as long as
    # the process: frozen, a full collection no longer walks it (30-40 ms each on this machine,
    # in the middle of answering requests), only what came after it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main() -> int:
    return runtime.run("ingress", build)


if __name__ == "__main__":
    sys.exit(main())
