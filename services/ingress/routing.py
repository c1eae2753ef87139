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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

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

    def hidden(self, method: str, path: str, reason: str) -> Callable[[H], H]:
        """A route left out of the document, with the reason."""
        def register(handler: H) -> H:
            self.table.route(method, path)(handler)
            self.undocumented[(method, canonical(path))] = reason
            return handler
        return register

    def setup(self, app: web.Application) -> None:
        app.router.add_routes(self.table)
