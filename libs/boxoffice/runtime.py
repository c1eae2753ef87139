"""The runtime every service runs in.

``run(service, build)`` loads the configuration (exiting with one line on a bad variable), sets
up logs, builds the service inside an ``AsyncExitStack`` (resources are registered in order and
torn down in reverse: stop taking work, finish in-flight work, drain NATS, close the pool), serves
``/healthz``, ``/readyz`` and ``/metrics`` on the service's health port (ingress serves its public
app on ``INGRESS_PORT`` besides, with ``/healthz`` and ``/readyz`` but never ``/metrics``), and on
SIGTERM or SIGINT shuts down and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import prometheus_client
import stamina.instrumentation
from aiohttp import web

from boxoffice import bus as busmod
from boxoffice import bus_access, errors, logs, observe, outbox, report
from boxoffice import config as configmod

log = logging.getLogger("boxoffice.runtime")

ReadyCheck = Callable[[], Awaitable[bool]]


@dataclass
class Service:
    """What a service's ``build`` fills in: readiness checks, and an optional public HTTP app of
    its own (ingress), served on ``INGRESS_PORT`` beside the health app."""

    config: configmod.Config
    stack: contextlib.AsyncExitStack
    stopping: asyncio.Event
    checks: dict[str, ReadyCheck] = field(default_factory=dict)
    scrape: list[observe.Refresh] = field(default_factory=list)  # figures read at each scrape
    app: web.Application | None = None

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(await asyncio.wait_for(check(), 3))
            except Exception:  # noqa: BLE001 - a readiness check that fails in any way is not ready
                results[name] = False
        return (all(results.values()) and not self.stopping.is_set()), results

    async def connect_bus(self, name: str, *streams: str) -> busmod.Bus:
        """The service's NATS connection as user ``name``, drained at exit (after what is
        registered later has stopped), with ``streams`` declared."""
        cfg = self.config
        bus = await self.stack.enter_async_context(
            busmod.connect(cfg.nats_url, name, ca_file=cfg.nats_ca_file,
                           stream_replicas=cfg.nats_stream_replicas))
        await bus.declare_streams(*streams)
        return bus

    async def relay_outbox(self, pool: asyncpg.Pool, bus: busmod.Bus,
                           gate: outbox.Gate | None = None,
                           batch: int = outbox.BATCH) -> asyncio.Event:
        """Relay the service's outbox subjects (``bus_access``) for its lifetime, ``batch`` rows
        a pass at most, making way for the work of ``gate`` (``outbox.Gate``); returns the
        relay's wake-up event."""
        assert self.config.database_url is not None
        return await self.stack.enter_async_context(outbox.relay(
            self.config.database_url, pool, bus, bus_access.ACCESS[self.config.service].relays,
            gate, batch))


Build = Callable[[Service], Awaitable[None]]


def add_health_routes(app: web.Application, svc: Service, *, metrics: bool = True) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": svc.config.service})

    async def readyz(_: web.Request) -> web.Response:
        ok, results = await svc.ready()
        return web.json_response({"ready": ok, "checks": results}, status=200 if ok else 503)

    async def prometheus_metrics(_: web.Request) -> web.Response:
        await observe.refresh(svc.scrape)
        return web.Response(body=prometheus_client.generate_latest(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics:  # not on a public listener: metrics tell an outsider how the system is doing
        app.router.add_get("/metrics", prometheus_metrics)


async def serve(service: str, build: Build, cfg: configmod.Config) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with contextlib.AsyncExitStack() as stack:
        svc = Service(config=cfg, stack=stack, stopping=stopping)
        build_task = asyncio.ensure_future(build(svc))
        stop_task = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({build_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not build_task.done():  # asked to stop while still starting
            build_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await build_task
            return 0
        stop_task.cancel()
        build_task.result()  # raise a start-up failure
        health = web.Application()
        add_health_routes(health, svc)
        apps = [(health, cfg.health_port, False)]
        if svc.app is not None:
            apps.append((svc.app, cfg.ingress_port, cfg.ingress_reuse_port))
        for app, port, shared in apps:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=15)
            await runner.setup()
            site = web.TCPSite(runner, "0.0.0.0", port, reuse_address=True,
                               reuse_port=shared or None)
            await site.start()
            stack.push_async_callback(runner.cleanup)  # first torn down: stop taking HTTP work
        log.info("%s ready", service, extra={"port": cfg.health_port})
        await stopping.wait()
        log.info("%s stopping", service)
    log.info("%s stopped", service)
    return 0


def run(service: str, build: Build) -> int:
    try:
        cfg = configmod.load(service)
    except configmod.ConfigError as exc:
        print(f"boxoffice {service}: {exc}", file=sys.stderr)
        return 2
    logs.setup(service, cfg.log_level)
    # retries are counted (stamina_retries_total); our loops log their own, naming what waits
    stamina.instrumentation.set_on_retry_hooks([stamina.instrumentation.PrometheusOnRetryHook])
    reporter = report.install(cfg)  # ERROR logs, crashes and loop errors go to the bus

    async def main() -> int:
        await reporter.start()
        try:
            return await serve(service, build, cfg)
        finally:
            await reporter.close()  # what could not be sent waits in the spool for the next start

    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        runner = asyncio.Runner()
    try:
        with runner:
            return runner.run(main())
    except errors.BoxofficeError as exc:
        log.error("%s cannot start: %s", service, exc.detail, extra={"code": exc.code})
        print(f"boxoffice {service}: cannot start: {exc.detail}", file=sys.stderr)
        return 1


def standard_checks(svc: Service, *, bus: object | None = None, pool: object | None = None) -> None:
    """Ready means: NATS connected (when used) and PostgreSQL answering (when used)."""
    from boxoffice import db

    svc.scrape += observe.watch(svc.config.service, bus=bus, pool=pool)

    if bus is not None:
        async def nats_ok() -> bool:
            return bool(bus.connected)  # type: ignore[attr-defined]
        svc.checks["nats"] = nats_ok
        reporter = report.current()
        if reporter is not None:
            reporter.attach(bus)

            async def flush_reports() -> None:  # runs before the bus drains
                await reporter.flush()
                reporter.attach(None)  # errors during the rest of shutdown wait in the spool
            svc.stack.push_async_callback(flush_reports)
    if pool is not None:
        async def pg_ok() -> bool:
            return await db.ping(pool)
        svc.checks["postgres"] = pg_ok
