"""Operator routes (admin token): ticketed events and their inventory, answered by the payment
service."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, operate, read_json, read_query, require_admin
from boxoffice.ingress.routing import ANY, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import admin

routes = Routes()


def setup(app: web.Application) -> None:
    routes.setup(app)


@routes.get("/v1/admin/events", "Ticketed events and their inventory, newest first", "admin",
            query=admin.ListEvents, ok=(200, admin.TicketedEvents))
async def list_events(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, admin.ListEvents)
    return json_response(await request.app[BUS].request(admin.EVENTS_LIST, req,
                                                        admin.TicketedEvents))


@routes.post("/v1/admin/events", "Create a ticketed event", "operate", admin.CreateEvent,
             ok=(201, admin.TicketedEvent))
@operate
async def create_event(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json(request, admin.CreateEvent)
    event = await request.app[BUS].request(admin.EVENTS_CREATE, body, admin.TicketedEvent)
    return json_response(event, status=201)


@routes.get("/v1/admin/events/{event_id}", "A ticketed event's inventory", "admin",
            ok=(200, admin.TicketedEvent), path_params={"event_id": ANY})
async def get_event(request: web.Request) -> web.Response:
    require_admin(request)
    req = admin.GetEvent(event_id=request.match_info["event_id"])
    return json_response(await request.app[BUS].request(admin.EVENTS_GET, req, admin.TicketedEvent))
