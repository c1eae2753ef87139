"""A domain module's routes and their description, declared in one place.

Each domain module of ingress has one ``routes = Routes()``; a handler is registered with its
line of the OpenAPI document next to it::

    @routes.get("/v1/admin/events", "Ticketed events, newest first", "admin",
                query=admin.ListEvents, ok=(200, admin.TicketedEvents))
    async def list_events(request): ...

and the module's ``setup(app)`` adds them (``routes.setup(app)``). ``contract`` builds the
document from every domain's ``routes.ops``, so a route and its description cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from boxoffice.ingress import http
from boxoffice.ingress.state import BUS

H = TypeVar("H", bound=Callable[..., Any])

# path parameters' schemas
ANY = {"type": "string", "minLength": 1}
UUID = {"type": "string", "format": "uuid"}


@dataclass(frozen=True)
class Op:
    """One operation of the OpenAPI document."""

    method: str
    path: str                      # as the router's canonical form
    summary: str
    auth: str | None = None        # "client", "admin" (read), "operate", "sentry", "stripe", "session"
    body: Any = None               # a Struct, or a media type name for a raw body
    query: type[msgspec.Struct] | None = None
    ok: tuple[int, Any] = (200, None)
    headers: tuple[tuple[str, dict[str, Any], bool], ...] = ()  # (name, schema, required)
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_path: tuple[str, ...] = ()  # fields of ``query`` that the path gives
    tag: str = "operators"
    body_required: bool = True


def canonical(path: str) -> str:
    """The router's form of ``path``: ``/api/{project_id}/store/`` for
    ``/api/{project_id:\\d{1,18}}/store/``."""
    return web.DynamicResource(path).canonical if "{" in path else path


class Routes:
    """A domain's routes (for aiohttp) and their operations (for the OpenAPI document)."""

    def __init__(self) -> None:
        self.table = web.RouteTableDef()
        self.ops: list[Op] = []
        self.undocumented: dict[tuple[str, str], str] = {}

    def route(self, method: str, path: str, summary: str, auth: str | None = None,
              body: Any = None, **doc: Any) -> Callable[[H], H]:
        def register(handler: H) -> H:
            self.table.route(method, path)(handler)
            self.ops.append(Op(method, canonical(path), summary, auth, body, **doc))
            return handler
        return register

    def at(self, route: str, summary: str, auth: str | None = None, body: Any = None,
           **doc: Any) -> Callable[[H], H]:
        """A route given as ``"POST /v1/reservations"`` (a string used elsewhere as well)."""
        method, path = route.split(" ", 1)
        return self.route(method, path, summary, auth, body, **doc)

    def get(self, path: str, summary: str, auth: str | None = None, **doc: Any) -> Callable[[H], H]:
        return self.route("GET", path, summary, auth, **doc)

    def post(self, path: str, summary: str, auth: str | None = None, body: Any = None,
             **doc: Any) -> Callable[[H], H]:
        return self.route("POST", path, summary, auth, body, **doc)

    def delete(self, path: str, summary: str, auth: str | None = None,
               **doc: Any) -> Callable[[H], H]:
        return self.route("DELETE", path, summary, auth, **doc)

    def options(self, path: str, summary: str, auth: str | None = None,
                **doc: Any) -> Callable[[H], H]:
        return self.route("OPTIONS", path, summary, auth, **doc)

    def ask(self, route: str, summary: str, auth: str, subject: str,
            request: type[msgspec.Struct], answer: type[msgspec.Struct], *,
            status: int = 200, timeout: float | None = None, body_required: bool = True,
            **doc: Any) -> None:
        """A route whose whole work is to ask the service that owns ``subject`` over the bus,
        its handler built from this one description (so the route and its document agree):

        - the token: ``auth`` "admin" reads, "operate" acts and is recorded (``http.operate``);
        - the request: ``request`` decoded from the query string for GET, from the JSON body
          otherwise (no body at all is ``request()`` when not ``body_required``), with the path
          parameters named like its fields;
        - the answer: the reply, decoded as ``answer``, as JSON with ``status``.
        """
        method, path = route.split(" ", 1)
        if auth not in ("admin", "operate"):
            raise ValueError(f"{route}: ask serves operators' routes, not {auth!r}")
        reads_query = method == "GET"
        from_path = [name for name in re.findall(r"\{(\w+)", path)
                     if name in request.__struct_fields__]
        if from_path and not reads_query:
            raise ValueError(f"{route}: a body and path parameters both make the request")
        wait = {"timeout": timeout} if timeout else {}

        async def handler(req: web.Request) -> web.Response:
            if auth == "admin":  # operate's own check runs first, in its wrapper
                http.require_admin(req)
            message: msgspec.Struct
            if reads_query:
                message = http.read_query(req, request,
                                          **{name: req.match_info[name] for name in from_path})
            elif not body_required and not req.body_exists:
                message = request()
            else:
                message = await http.read_json(req, request)
            reply = await req.app[BUS].request(subject, message, answer, **wait)
            return http.json_response(reply, status=status)

        self.route(method, path, summary, auth,
                   None if reads_query else request, body_required=body_required,
                   ok=(status, answer), **({"query": request} if reads_query else {}), **doc,
                   )(http.operate(handler) if auth == "operate" else handler)

    def hidden(self, method: str, path: str, reason: str) -> Callable[[H], H]:
        """A route left out of the document, with the reason."""
        def register(handler: H) -> H:
            self.table.route(method, path)(handler)
            self.undocumented[(method, canonical(path))] = reason
            return handler
        return register

    def setup(self, app: web.Application) -> None:
        app.router.add_routes(self.table)
