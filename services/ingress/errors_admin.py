"""The operators' error routes (admin token), answered by the error-sink over the bus: groups,
a group with its recent events, feedback and attachments, resolve, ignore; what was dropped;
users' feedback; an attachment's file; cron monitors; release health."""

from __future__ import annotations

from urllib.parse import quote

import msgspec
from aiohttp import web

from boxoffice import errors, scrub
from boxoffice.ingress.http import json_response, operate, read_json, read_query, require_admin
from boxoffice.ingress.state import BUS
from boxoffice.wire import errors as w
from boxoffice.wire import sentry_items as si
from boxoffice.wire.words import describe

routes = web.RouteTableDef()
MAX_SOURCE_MAP = 6 << 20


@routes.get("/v1/admin/errors")
async def list_groups(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.ListGroups)
    return json_response(await request.app[BUS].request(w.GROUPS_LIST, q, w.GroupList))


@routes.get("/v1/admin/errors/dropped")
async def list_dropped(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, si.ListDropped)
    return json_response(await request.app[BUS].request(si.DROPPED, q, si.DroppedList))


@routes.get("/v1/admin/monitors")
async def list_monitors(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, si.ListMonitors)
    return json_response(await request.app[BUS].request(si.MONITORS, q, si.MonitorList))


@routes.post("/v1/admin/monitors")
@operate
async def set_monitor(request: web.Request) -> web.Response:
    require_admin(request)
    m = await read_json(request, si.SetMonitor)
    return json_response(await request.app[BUS].request(si.MONITOR_SET, m, si.Monitor), status=201)


@routes.get("/v1/admin/releases")
async def list_releases(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, si.ListReleases)
    return json_response(await request.app[BUS].request(si.RELEASES, q, si.ReleaseList))


@routes.post("/v1/admin/releases/{release}/sourcemaps")
@operate
async def upload_source_map(request: web.Request) -> web.Response:
    """A release's source map for one minified file (``?name=`` its URL or ``~/path``); the
    body is the map (JSON), at most 6 MiB."""
    require_admin(request)
    name = request.query.get("name", "")
    if len(request.query) != 1 or not name:
        raise errors.ValidationFailed("name (the minified file's URL or ~/path) is required, once")
    body = await request.content.read(MAX_SOURCE_MAP + 1)
    if len(body) > MAX_SOURCE_MAP:
        raise errors.PayloadTooLarge(f"a source map may not exceed {MAX_SOURCE_MAP} bytes")
    try:
        req = msgspec.convert({"release": request.match_info["release"], "name": name, "map": body},
                              si.SourceMapUpload)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(describe(exc)) from None
    return json_response(await request.app[BUS].request(si.SOURCE_MAP_UPLOAD, req, si.SourceMapInfo,
                                                        timeout=15.0), status=201)


@routes.get("/v1/admin/feedback")
async def list_feedback(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, si.ListFeedback)
    return json_response(await request.app[BUS].request(si.FEEDBACK_LIST, q, si.FeedbackList))


@routes.get("/v1/admin/attachments/{attachment_id}")
async def get_attachment(request: web.Request) -> web.Response:
    """The file as it was sent; always as a download (its content type is the sender's word,
    so it is never rendered on this origin), the declared one in ``X-Attachment-Content-Type``."""
    require_admin(request)
    q = read_query(request, si.GetAttachment, id=request.match_info["attachment_id"])
    found = await request.app[BUS].request(si.ATTACHMENT_GET, q, si.AttachmentData, timeout=15.0)
    name = quote(found.info.filename, safe="")
    return web.Response(body=found.data, content_type="application/octet-stream", headers={
        "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
        "X-Content-Type-Options": "nosniff",
        "X-Attachment-Content-Type": scrub.truncate(found.info.content_type, 128).encode(
            "ascii", "replace").decode()})


@routes.get("/v1/admin/errors/{group_id}")
async def get_group(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.GetGroup, group_id=request.match_info["group_id"])
    return json_response(await request.app[BUS].request(w.GROUPS_GET, q, w.GroupDetail))


@routes.post("/v1/admin/errors/{group_id}/{action:resolve|ignore}")
@operate
async def set_status(request: web.Request) -> web.Response:
    require_admin(request)
    q = read_query(request, w.SetGroupStatus, group_id=request.match_info["group_id"])
    subject = w.GROUPS_RESOLVE if request.match_info["action"] == "resolve" else w.GROUPS_IGNORE
    return json_response(await request.app[BUS].request(subject, q, w.ErrorGroup))
