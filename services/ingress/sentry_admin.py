"""The operators' routes (admin token) for what Sentry SDKs send besides errors, answered by the
error-sink over the bus: what was dropped, users' feedback, an attachment's file, cron monitors,
release health and source maps."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import msgspec
from aiohttp import web

from boxoffice import errors, scrub
from boxoffice.ingress.http import json_response, operate, read_query, require_admin
from boxoffice.ingress.routing import ANY, UUID, Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import sentry_items as si
from boxoffice.wire.words import describe

routes = Routes()
MAX_SOURCE_MAP = 6 << 20


class SourceMapName(msgspec.Struct, forbid_unknown_fields=True):
    """A source map upload's query: the minified file it is for."""

    name: Annotated[str, msgspec.Meta(min_length=1)]


def setup(app: web.Application) -> None:
    routes.setup(app)


routes.ask("GET /v1/admin/errors/dropped", "What Sentry SDKs and ingress dropped, by reason",
           "admin", si.DROPPED, si.ListDropped, si.DroppedList)
routes.ask("GET /v1/admin/monitors", "Cron monitors: schedule, status, last and next check-in",
           "admin", si.MONITORS, si.ListMonitors, si.MonitorList)
routes.ask("POST /v1/admin/monitors", "Create or change a cron monitor", "operate",
           si.MONITOR_SET, si.SetMonitor, si.Monitor, status=201)
routes.ask("GET /v1/admin/releases", "Release health: sessions, crash-free rates", "admin",
           si.RELEASES, si.ListReleases, si.ReleaseList)


@routes.post("/v1/admin/releases/{release}/sourcemaps",
             "Upload a release's source map for one minified file (?name=URL or ~/path)",
             "operate", "application/json", ok=(201, si.SourceMapInfo),
             path_params={"release": ANY})
@operate
async def upload_source_map(request: web.Request) -> web.Response:
    """A release's source map for one minified file (``?name=`` its URL or ``~/path``); the
    body is the map (JSON), at most 6 MiB."""
    require_admin(request)
    try:
        name = read_query(request, SourceMapName).name
    except errors.ValidationFailed:
        raise errors.ValidationFailed("name (the minified file's URL or ~/path) is required, "
                                      "once") from None
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


routes.ask("GET /v1/admin/feedback", "Users' feedback sent through Sentry SDKs", "admin",
           si.FEEDBACK_LIST, si.ListFeedback, si.FeedbackList)


@routes.get("/v1/admin/attachments/{attachment_id}", "An attachment, as a download", "admin",
            query=si.GetAttachment, from_path=("id",), ok=(200, "application/octet-stream"),
            path_params={"attachment_id": UUID})
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
