"""Operator routes (admin token) of holds' expiry, answered by the reaper: hold statistics,
manual expiry, how late holds were released, the reaper's runs."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, operate, read_json, read_query, require_admin
from boxoffice.ingress.routing import Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import reaper

routes = Routes()

CLEANUP_TIMEOUT = 120.0  # a flash sale's worth of overdue holds, in bounded batches


def setup(app: web.Application) -> None:
    routes.setup(app)


@routes.get("/v1/admin/reservations/stats", "Holds by status, overdue, next expiry", "admin",
            ok=(200, reaper.ReservationStats))
async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    result = await request.app[BUS].request(reaper.STATS, reaper.StatsRequest(),
                                            reaper.ReservationStats)
    return json_response(result)


@routes.post("/v1/admin/reservations/cleanup", "Expire every overdue hold now", "operate",
             reaper.CleanupRequest, ok=(200, reaper.CleanupResult), body_required=False)
@operate
async def cleanup(request: web.Request) -> web.Response:
    require_admin(request)
    body = (await read_json(request, reaper.CleanupRequest) if request.body_exists
            else reaper.CleanupRequest())
    result = await request.app[BUS].request(reaper.CLEANUP, body, reaper.CleanupResult,
                                            timeout=CLEANUP_TIMEOUT)
    return json_response(result)


@routes.get("/v1/admin/reservations/expiry-lag", "How late holds were released, per minute",
            "admin", query=reaper.ExpiryLagRequest, ok=(200, reaper.ExpiryLag))
async def expiry_lag(request: web.Request) -> web.Response:
    """How late holds were released, per minute (``?minutes=``, 60 by default)."""
    require_admin(request)
    req = read_query(request, reaper.ExpiryLagRequest)
    return json_response(await request.app[BUS].request(reaper.EXPIRY_LAG, req, reaper.ExpiryLag))


@routes.get("/v1/admin/reaper/runs", "The reaper's runs", "admin", query=reaper.RunsRequest,
            ok=(200, reaper.ReaperRuns))
async def runs(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, reaper.RunsRequest)
    return json_response(await request.app[BUS].request(reaper.RUNS, req, reaper.ReaperRuns))
