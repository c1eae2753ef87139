"""The operators' action log (admin token, read scope): ``GET /v1/admin/audit``, answered by the
reaper, which keeps ``admin_actions``."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, read_query, require_admin
from boxoffice.ingress.routing import Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import admin_actions as wire

routes = Routes()


def setup(app: web.Application) -> None:
    routes.setup(app)


@routes.get("/v1/admin/audit", "The operators' action log", "admin", query=wire.ListRequest,
            ok=(200, wire.Actions))
async def list_actions(request: web.Request) -> web.Response:
    require_admin(request)
    req = read_query(request, wire.ListRequest)
    return json_response(await request.app[BUS].request(wire.LIST, req, wire.Actions))
