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


routes.ask("GET /v1/admin/errors", "Error groups", "admin", w.GROUPS_LIST, w.ListGroups,
           w.GroupList)
routes.ask("GET /v1/admin/errors/{group_id}", "An error group and its recent reports", "admin",
           w.GROUPS_GET, w.GetGroup, w.GroupDetail, path_params={"group_id": UUID})


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
