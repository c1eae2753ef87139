"""Operator routes (admin token) answered by the reaper: hold statistics, manual expiry, runs."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, operate, read_json, read_query, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import reaper

routes = web.RouteTableDef()

CLEANUP_TIMEOUT = 120.0  # a flash sale's worth of overdue holds, in bounded batches


@routes.get("/v1/admin/reservations/stats")
async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    result = await request.app[BUS].request(reaper.STATS, reaper.StatsRequest(),
                                            reaper.ReservationStats)
    return json_response(result)


@routes.post("/v1/admin/reservations/cleanup")
@operate
async def cleanup(request: web.Request) -> web.Response:
    require_admin(request)
    body = (await read_json(request, reaper.CleanupRequest) if request.body_exists
            else reaper.CleanupRequest())
    result = await request.app[BUS].request(reaper.CLEANUP, body, reaper.CleanupResult,
                                            timeout=CLEANUP_TIMEOUT)
    return json_response(result)


@routes.get("/v1/admin/reservations/expiry-lag")
async def expiry_lag(request: web.Request) -> web.Response:
    """How late holds were released, per minute (``?minutes=``, 60 by default)."""
    require_admin(request)
    req = read_query(request, reaper.ExpiryLagRequest)
    return json_response(await request.app[BUS].request(reaper.EXPIRY_LAG, req, reaper.ExpiryLag))


@routes.get("/v1/admin/reaper/runs")
async def runs(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, reaper.RunsRequest)
    return json_response(await request.app[BUS].request(reaper.RUNS, req, reaper.ReaperRuns))
