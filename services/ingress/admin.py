"""Operator routes (admin token): ticketed events and their inventory."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, operate, read_json, read_query, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import admin

routes = web.RouteTableDef()


@routes.get("/v1/admin/events")
async def list_events(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, admin.ListEvents)
    return json_response(await request.app[BUS].request(admin.EVENTS_LIST, req,
                                                        admin.TicketedEvents))


@routes.post("/v1/admin/events")
@operate
async def create_event(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json(request, admin.CreateEvent)
    event = await request.app[BUS].request(admin.EVENTS_CREATE, body, admin.TicketedEvent)
    return json_response(event, status=201)


@routes.get("/v1/admin/events/{event_id}")
async def get_event(request: web.Request) -> web.Response:
    require_admin(request)
    req = admin.GetEvent(event_id=request.match_info["event_id"])
    return json_response(await request.app[BUS].request(admin.EVENTS_GET, req, admin.TicketedEvent))
