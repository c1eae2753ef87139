"""What every service tells Prometheus about itself besides its own work: its build, the backlog
of its outbox relay and the lag of its durable consumers.

The backlog and the lag are read when Prometheus scrapes (``refresh``), so a scrape costs one
indexed count per relay and one consumer-info request per durable, and the figures are never
older than the scrape. What each service relays and consumes is ``bus_access.ACCESS``: the same
table that grants it those subjects.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client

from boxoffice import __version__, bus_access

log = logging.getLogger("boxoffice.observe")

BUILD_INFO = prometheus_client.Gauge(
    "boxoffice_build_info", "Always 1: the running build", ["service", "version", "python"])
OUTBOX_BACKLOG = prometheus_client.Gauge(
    "boxoffice_outbox_backlog", "Outbox rows of this service's subjects not yet published",
    ["service"])
OUTBOX_OLDEST = prometheus_client.Gauge(
    "boxoffice_outbox_oldest_seconds", "Age of the oldest unpublished outbox row (0: none)",
    ["service"])
CONSUMER_PENDING = prometheus_client.Gauge(
    "boxoffice_consumer_pending", "Messages of the stream not yet delivered to the durable",
    ["stream", "durable"])
CONSUMER_ACK_PENDING = prometheus_client.Gauge(
    "boxoffice_consumer_ack_pending", "Messages delivered to the durable and not yet acknowledged",
    ["stream", "durable"])
CONSUMER_REDELIVERED = prometheus_client.Gauge(
    "boxoffice_consumer_redelivered", "Messages delivered to the durable more than once and not "
    "yet acknowledged", ["stream", "durable"])
SCRAPE_ERRORS = prometheus_client.Counter(
    "boxoffice_metrics_refresh_errors_total", "Figures that could not be read at a scrape",
    ["figure"])

Refresh = Callable[[], Awaitable[None]]
TIMEOUT = 2.0


def watch(service: str, *, bus: Any = None, pool: Any = None) -> list[Refresh]:
    """Set the build info; return what to read at each scrape: ``service``'s relay and durables."""
    BUILD_INFO.labels(service, __version__, platform.python_version()).set(1)
    access = bus_access.ACCESS.get(service)
    out: list[Refresh] = []
    if access is None:
        return out
    if pool is not None and access.relays:
        subjects = [s for s in access.relays]

        async def outbox() -> None:
            row = await pool.fetchrow(
                "SELECT count(*) AS n, coalesce(extract(epoch FROM clock_timestamp() - "
                "min(created_at)), 0) AS age FROM outbox WHERE subject = ANY($1::text[])",
                subjects, timeout=TIMEOUT)
            OUTBOX_BACKLOG.labels(service).set(row["n"])
            OUTBOX_OLDEST.labels(service).set(float(row["age"]))
        out.append(outbox)
    if bus is not None:
        for stream, durable in access.consumes:
            out.append(_consumer(bus, stream, durable))
    return out


def _consumer(bus: Any, stream: str, durable: str) -> Refresh:
    async def lag() -> None:
        info = await bus.js.consumer_info(stream, durable, timeout=TIMEOUT)
        CONSUMER_PENDING.labels(stream, durable).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(stream, durable).set(info.num_ack_pending or 0)
        CONSUMER_REDELIVERED.labels(stream, durable).set(info.num_redelivered or 0)
    lag.__name__ = f"consumer {stream}/{durable}"
    return lag


async def refresh(refreshers: list[Refresh]) -> None:
    """Read every figure now; one that cannot be read keeps its last value and is counted."""
    async def one(r: Refresh) -> None:
        try:
            await asyncio.wait_for(r(), TIMEOUT + 0.5)
        except Exception as exc:  # noqa: BLE001 - a scrape never fails for one figure
            SCRAPE_ERRORS.labels(r.__name__).inc()
            log.debug("metrics: %s not read (%s)", r.__name__, type(exc).__name__)
    await asyncio.gather(*(one(r) for r in refreshers))
