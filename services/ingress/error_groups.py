"""The operators' error groups (admin token), answered by the error-sink over the bus: the
groups, a group with its recent reports, resolve and ignore. What the Sentry protocol brings
besides (feedback, attachments, monitors, releases, what was dropped) is ``sentry_admin``."""

from __future__ import annotations

from aiohttp import web

from boxoffice.ingress.http import json_response, operate, read_query, require_admin
from boxoffice.ingress.routing import UUID, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import errors as w

routes = Routes()


def setup(app: web.Application) -> None:
    routes.setup(app)


@routes.get("/v1/admin/errors", "Error groups", "admin", query=w.ListGroups,
            ok=(200, w.GroupList))
async def list_groups(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.ListGroups)
    return json_response(await request.app[BUS].request(w.GROUPS_LIST, q, w.GroupList))


@routes.get("/v1/admin/errors/{group_id}", "An error group and its recent reports", "admin",
            query=w.GetGroup, ok=(200, w.GroupDetail), path_params={"group_id": UUID})
async def get_group(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.GetGroup, group_id=request.match_info["group_id"])
    return json_response(await request.app[BUS].request(w.GROUPS_GET, q, w.GroupDetail))


@routes.post("/v1/admin/errors/{group_id}/{action:resolve|ignore}",
             "Resolve or ignore an error group", "operate", ok=(200, w.ErrorGroup),
             path_params={"group_id": UUID,
                          "action": {"type": "string", "enum": ["resolve", "ignore"]}})
@operate
async def set_status(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.SetGroupStatus, group_id=request.match_info["group_id"])
    subject = w.GROUPS_RESOLVE if request.match_info["action"] == "resolve" else w.GROUPS_IGNORE
    return json_response(await request.app[BUS].request(subject, q, w.ErrorGroup))
