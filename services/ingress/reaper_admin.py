"""Operator routes (admin token) answered by the reaper: hold statistics, manual expiry, runs."""

from __future__ import annotations

import msgspec
from aiohttp import web

from boxoffice import errors
from boxoffice.ingress.http import json_response, operate, read_json, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import reaper
from boxoffice.wire.words import describe

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


@routes.get("/v1/admin/reaper/runs")
async def runs(request: web.Request) -> web.Response:
    require_admin(request)
    query = dict(request.query)
    if len(query) != len(request.query):
        raise errors.ValidationFailed("each query parameter may be given once")
    try:
        req = msgspec.convert(query, reaper.RunsRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(describe(exc)) from None
    return json_response(await request.app[BUS].request(reaper.RUNS, req, reaper.ReaperRuns))
