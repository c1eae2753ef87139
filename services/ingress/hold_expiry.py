"""Operator routes (admin token) of holds' expiry, answered by the reaper: hold statistics,
manual expiry, how late holds were released, the reaper's runs."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.routing import Routes
from boxoffice.wire import reaper

routes = Routes()

CLEANUP_TIMEOUT = 120.0  # a flash sale's worth of overdue holds, in bounded batches


def setup(app: web.Application) -> None:
    routes.setup(app)


routes.ask("GET /v1/admin/reservations/stats", "Holds by status, overdue, next expiry", "admin",
           reaper.STATS, reaper.StatsRequest, reaper.ReservationStats)
routes.ask("POST /v1/admin/reservations/cleanup", "Expire every overdue hold now", "operate",
           reaper.CLEANUP, reaper.CleanupRequest, reaper.CleanupResult, body_required=False,
           timeout=CLEANUP_TIMEOUT)
routes.ask("GET /v1/admin/reservations/expiry-lag",
           "How late holds were released, per minute (?minutes=, 60 by default)", "admin",
           reaper.EXPIRY_LAG, reaper.ExpiryLagRequest, reaper.ExpiryLag)
routes.ask("GET /v1/admin/reaper/runs", "The reaper's runs", "admin", reaper.RUNS,
           reaper.RunsRequest, reaper.ReaperRuns)
