"""The operators' console at ``/console``: a page, its script and styles (shipped in the
package, nothing from elsewhere), sign-in and sign-out, and a live feed of inventory.

The page calls the admin JSON API of this same origin with its session cookie and, for every
action, the session's CSRF token (``boxoffice.ingress.sessions``); no query is written twice.
The feed (``GET /console/stream``, server-sent events) follows the ``RESERVATIONS`` and
``PAYMENTS`` subjects while a console is open: every change of an event's inventory marks it,
and at most every ``FEED_INTERVAL`` seconds each marked event is read once and its counts sent to
every open console, however many holds a sell-out makes and however many consoles watch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from boxoffice import errors
from boxoffice.bus import Bus
from boxoffice.ingress import sessions
from boxoffice.ingress.http import CONFIG, json_response, read_json
from boxoffice.ingress.routing import Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import admin
from boxoffice.wire.subjects import STREAMS

log = logging.getLogger("boxoffice.ingress.console")

FEED_SUBJECTS = (*STREAMS["RESERVATIONS"], *STREAMS["PAYMENTS"])
FEED_INTERVAL = 0.25  # seconds: coalesces a sell-out's thousands of holds into a few reads
KEEPALIVE = 15.0  # seconds between comments on a quiet stream (proxies close idle ones)
STREAM_LIFETIME = 600.0  # then the browser reconnects, and the session is checked again
QUEUE_SIZE = 256  # updates waiting for one slow console before it is dropped
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
ASSETS = {"console.html": "text/html", "app.js": "text/javascript", "console.css": "text/css"}


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /console/session``."""

    token: str


class SessionInfo(msgspec.Struct):
    """The signed-in console: its admin id, scope, CSRF token (sent back as ``X-CSRF-Token``
    with every action) and when it expires (unix seconds)."""

    actor: str
    scope: str
    csrf_token: str
    expires: int


class _Change(msgspec.Struct):
    event_id: str | None = None
    reservation_id: str | None = None
    payment_intent_id: str | None = None


class Feed:
    """The live inventory feed: subscribed to the domain events only while someone watches."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.clients: set[asyncio.Queue[bytes | None]] = set()
        self._subs: list[Subscription] = []
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def join(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_SIZE)
        async with self._lock:
            self.clients.add(queue)
            if not self._subs:
                for subject in FEED_SUBJECTS:
                    self._subs.append(await self.bus.nc.subscribe(subject, cb=self._on_message))
                self._task = asyncio.create_task(self._send_changes(), name="console feed")
        return queue

    async def leave(self, queue: asyncio.Queue[bytes | None]) -> None:
        async with self._lock:
            self.clients.discard(queue)
            if not self.clients and self._subs:
                await self._stop()

    async def close(self) -> None:
        """Ends every open stream (ingress is shutting down)."""
        async with self._lock:
            for queue in self.clients:
                _offer(queue, None)
            self.clients.clear()
            await self._stop()

    async def _stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _on_message(self, msg: Msg) -> None:
        try:
            change = msgspec.json.decode(msg.data, type=_Change)
        except msgspec.DecodeError:  # not ours to judge here; the stream's consumers do
            return
        if change.event_id:
            self._dirty.add(change.event_id)
            self._wake.set()
        if msg.subject.startswith("payments."):
            kind = msg.subject.rsplit(".", 1)[-1]
            self.broadcast("payment", msgspec.json.encode(
                {"kind": kind, "payment_intent_id": change.payment_intent_id,
                 "reservation_id": change.reservation_id}))

    async def _send_changes(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for event_id in dirty:
                try:
                    event = await self.bus.request(admin.EVENTS_GET, admin.GetEvent(
                        event_id=event_id), admin.TicketedEvent)
                except errors.BoxofficeError as exc:
                    log.info("console feed: event %s not read (%s)", event_id, exc.code)
                    continue
                except Exception:  # the feed outlives one bad read
                    log.warning("console feed: event %s not read", event_id, exc_info=True)
                    continue
                self.broadcast("inventory", msgspec.json.encode(event))
            await asyncio.sleep(FEED_INTERVAL)

    def broadcast(self, kind: str, data: bytes) -> None:
        frame = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        for queue in list(self.clients):
            if not _offer(queue, frame):  # too slow: its stream ends, the browser reconnects
                self.clients.discard(queue)
                _offer(queue, None, force=True)


def _offer(queue: asyncio.Queue[bytes | None], item: bytes | None, force: bool = False) -> bool:
    if force and queue.full():
        queue.get_nowait()
    try:
        queue.put_nowait(item)
        return True
    except asyncio.QueueFull:
        return False


FEED = web.AppKey("console_feed", Feed)
PAGES = web.AppKey("console_assets", dict)


routes = Routes()


def _asset(name: str) -> bytes:
    return resources.files("boxoffice.ingress").joinpath("console_assets", name).read_bytes()


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Cache-Control": "no-cache"}


def _session(request: web.Request) -> sessions.Session:
    value = request.cookies.get(sessions.COOKIE)
    if not value:
        raise errors.Unauthorized("sign in to the console first")
    return sessions.read(request.app[CONFIG], value)


def _info(session: sessions.Session) -> SessionInfo:
    return SessionInfo(actor=session.actor, scope=session.scope, csrf_token=session.csrf,
                       expires=session.expires)


def _same_origin(request: web.Request) -> None:
    """A browser's request from another site never signs in or out (login CSRF)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise errors.Forbidden("the console signs in from its own origin only")


@routes.get("/console", "The operators' console (a page)", ok=(200, "html"), tag="console")
async def page(request: web.Request) -> web.Response:
    """The console (signed in or not: the page asks ``/console/session``)."""
    return web.Response(body=request.app[PAGES]["console.html"], content_type="text/html",
                        charset="utf-8", headers=_page_headers())


def _static(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=request.app[PAGES][name], content_type=ASSETS[name],
                            charset="utf-8", headers=_page_headers())
    serve.__name__ = f"console_{name.replace('.', '_')}"
    return serve


routes.get("/console/app.js", "The console's script", ok=(200, "text/javascript"),
           tag="console")(_static("app.js"))
routes.get("/console/console.css", "The console's styles", ok=(200, "text/css"),
           tag="console")(_static("console.css"))


@routes.post("/console/session", "Sign in with an admin token: sets the session cookie",
             body=SignIn, ok=(201, SessionInfo), tag="console")
async def sign_in(request: web.Request) -> web.Response:
    _same_origin(request)
    cfg = request.app[CONFIG]
    body = await read_json(request, SignIn)
    token = body.token.strip()
    scope = sessions.scope_of(cfg, token) if token.isascii() and token.isprintable() else None
    if scope is None:
        raise errors.Unauthorized("not an admin token (ADMIN_API_TOKENS, ADMIN_READ_API_TOKENS)")
    value, session = sessions.issue(token, scope)
    log.info("console: %s signed in (%s)", session.actor, scope)
    resp = json_response(_info(session), status=201, headers={"Cache-Control": "no-store"})
    resp.set_cookie(sessions.COOKIE, value, max_age=sessions.LIFETIME,
                    **sessions.cookie_attributes(cfg))
    return resp


@routes.get("/console/session", "The signed-in session (its CSRF token)", "session",
            ok=(200, SessionInfo), tag="console")
async def current(request: web.Request) -> web.Response:
    return json_response(_info(_session(request)), headers={"Cache-Control": "no-store"})


@routes.delete("/console/session", "Sign out (X-CSRF-Token required)", "session",
               ok=(204, None), tag="console")
async def sign_out(request: web.Request) -> web.Response:
    _same_origin(request)
    session = _session(request)
    sessions.check_csrf(session, request.method, request.headers.get(sessions.CSRF_HEADER))
    resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
    attrs = sessions.cookie_attributes(request.app[CONFIG])
    resp.del_cookie(sessions.COOKIE, path="/", secure=bool(attrs["secure"]), httponly=True,
                    samesite="Strict")
    return resp


@routes.hidden("GET", "/console/stream", "the console's live feed: an endless text/event-stream "
               "for the page's session (no JSON answer to describe or to test)")
async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``inventory`` (a ticketed event's counts) and ``payment``."""
    _session(request)
    feed = request.app[FEED]
    queue = await feed.join()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n: connected\n\n")
        loop = asyncio.get_running_loop()
        ends = loop.time() + STREAM_LIFETIME
        while (left := ends - loop.time()) > 0:
            try:
                frame = await asyncio.wait_for(queue.get(), min(KEEPALIVE, left))
            except TimeoutError:
                frame = b": keepalive\n\n"
            if frame is None:
                break
            await resp.write(frame)
    except ConnectionResetError:
        pass  # the console went away
    finally:
        await feed.leave(queue)
    return resp


def setup(app: web.Application) -> None:
    """The console's routes, its files read once, and its feed (closed on shutdown)."""
    app[PAGES] = {name: _asset(name) for name in ASSETS}

    async def feed_ctx(app: web.Application) -> AsyncIterator[None]:
        app[FEED] = Feed(app[BUS])
        yield
        await app[FEED].close()

    async def end_streams(app: web.Application) -> None:
        if FEED in app:
            await app[FEED].close()

    app.cleanup_ctx.append(feed_ctx)
    app.on_shutdown.append(end_streams)
    routes.setup(app)
