"""The operators' action log (admin token, read scope): ``GET /v1/admin/audit``, answered by the
reaper, which keeps ``admin_actions``."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.routing import Routes
from boxoffice.wire import admin_actions as wire

routes = Routes()


def setup(app: web.Application) -> None:
    routes.setup(app)


routes.ask("GET /v1/admin/audit", "The operators' action log", "admin", wire.LIST,
           wire.ListRequest, wire.Actions)
