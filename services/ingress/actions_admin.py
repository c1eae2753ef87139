"""The operators' action log (admin token, read scope): ``GET /v1/admin/audit``, answered by the
reaper, which keeps ``admin_actions``."""

from __future__ import annotations

import msgspec
from aiohttp import web

from boxoffice import errors
from boxoffice.ingress.http import json_response, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import admin_actions as wire
from boxoffice.wire.words import describe

routes = web.RouteTableDef()


@routes.get("/v1/admin/audit")
async def list_actions(request: web.Request) -> web.Response:
    require_admin(request)
    query = dict(request.query)
    if len(query) != len(request.query):
        raise errors.ValidationFailed("each query parameter may be given once")
    try:
        req = msgspec.convert(query, wire.ListRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(describe(exc)) from None
    return json_response(await request.app[BUS].request(wire.LIST, req, wire.Actions))
