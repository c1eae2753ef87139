"""Operator routes (admin token): ticketed events and their inventory, answered by the payment
service."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.routing import ANY, Routes
from boxoffice.wire import admin

routes = Routes()


def setup(app: web.Application) -> None:
    routes.setup(app)


routes.ask("GET /v1/admin/events", "Ticketed events and their inventory, newest first", "admin",
           admin.EVENTS_LIST, admin.ListEvents, admin.TicketedEvents)
routes.ask("POST /v1/admin/events", "Create a ticketed event", "operate", admin.EVENTS_CREATE,
           admin.CreateEvent, admin.TicketedEvent, status=201)
routes.ask("GET /v1/admin/events/{event_id}", "A ticketed event's inventory", "admin",
           admin.EVENTS_GET, admin.GetEvent, admin.TicketedEvent, path_params={"event_id": ANY})
