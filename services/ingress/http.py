"""HTTP plumbing of ingress: problem+json in one middleware, auth, JSON bodies."""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from boxoffice import errors, logs, tokens
from boxoffice.config import Config
from boxoffice.ingress import sessions
from boxoffice.ingress.sessions import actor_id
from boxoffice.wire.words import describe

log = logging.getLogger("boxoffice.ingress")
T = TypeVar("T")

CONFIG = web.AppKey("config", Config)
REQUEST_ID = "request_id"
PROBLEM = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(exc: errors.BoxofficeError, request_id: str | None = None) -> web.Response:
    body = exc.problem()
    if request_id:
        body["request_id"] = request_id
    headers = {}
    if exc.status in (429, 503, 504) or exc.code == "idempotency_key_in_use":
        headers["Retry-After"] = str(exc.extra.get("retry_after", 1))
        body.pop("retry_after", None)
    return web.Response(status=exc.status, body=json.dumps(body), content_type=PROBLEM,
                        headers=headers)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves ingress as problem+json with a stable code; nothing else does this."""
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.isascii() and rid.isprintable()):
        rid = os.urandom(16).hex()  # 32 random hex digits, without building a UUID
    request[REQUEST_ID] = rid
    logs.REQUEST_ID.set(rid)  # carried on the bus to every service's logs and error reports
    try:
        resp = await handler(request)
    except errors.BoxofficeError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %s %s", request.method, request.path, exc.status, exc.code)
        resp = problem_response(exc, rid)
    except web.HTTPRequestEntityTooLarge:
        resp = problem_response(errors.PayloadTooLarge("request body is too large"), rid)
    except (HttpProcessingError, RequestPayloadError):
        # a body that cannot be read: broken chunking or Content-Encoding (gzip that is not gzip)
        resp = problem_response(errors.BadRequest("the body could not be read or decompressed"),
                                rid)
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            raise
        # the client went away mid-body: nothing to answer, and not an error of ours
        log.info("client closed the connection on %s %s", request.method, request.path,
                 extra={"request_id": rid})
        resp = problem_response(errors.BadRequest("the client closed the connection"), rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = {404: errors.NotFound("no such route"),
               405: errors.MethodNotAllowed(f"{request.method} is not allowed here"),
               413: errors.PayloadTooLarge("request body is too large")}.get(exc.status)
        if err is None:
            err = errors.from_code(f"http_{exc.status}", exc.reason or "error", exc.status)
        resp = problem_response(err, rid)
    except Exception:  # nothing crashes ingress; the error is logged and reported
        log.exception("unhandled error on %s %s", request.method, request.path,
                      extra={"request_id": rid})
        resp = problem_response(errors.BoxofficeError("internal error"), rid)
    resp.headers["X-Request-Id"] = rid
    return resp


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("an Authorization: Bearer <token> header is required")
    token = token.strip()
    if not (token.isascii() and token.isprintable()):  # tokens are printable ASCII (config)
        raise errors.Unauthorized("unknown token")
    return token


def client_id(request: web.Request) -> str:
    """The caller's client identity (a stable, non-secret digest of its token)."""
    cfg = request.app[CONFIG]
    token = _bearer(request)
    match = tokens.match(token, cfg.client_api_tokens)
    if match is None:
        if tokens.match(token, cfg.admin_api_tokens):
            raise errors.Forbidden("an admin token cannot be used on client routes")
        raise errors.Unauthorized("unknown token")
    return _client_digest(match)


@functools.cache
def _client_digest(token: str) -> str:
    """The client id of a configured token (one HMAC per token and process, not per request;
    the cache holds only tokens that ``tokens.match`` found in the configuration)."""
    return "c_" + hmac.new(b"boxoffice-client", token.encode(), "sha256").hexdigest()[:24]


def require_admin(request: web.Request, scope: str = "read") -> str:
    """The caller's admin id if its token has ``scope``: ``read`` (lists, stats) is granted by
    ``ADMIN_READ_API_TOKENS`` and ``ADMIN_API_TOKENS``, ``operate`` (acting) by the latter only.

    Without an ``Authorization`` header, the console's session cookie stands for the token it
    was opened with (its scope kept); an action by cookie also needs the session's CSRF token."""
    cfg = request.app[CONFIG]
    if "Authorization" not in request.headers and sessions.COOKIE in request.cookies:
        session = sessions.read(cfg, request.cookies[sessions.COOKIE])
        if scope != "read" and session.scope != "operate":
            raise errors.Forbidden("this session may read but not act (its scope is read)")
        sessions.check_csrf(session, request.method, request.headers.get(sessions.CSRF_HEADER))
        return session.actor
    token = _bearer(request)
    operator = tokens.match(token, cfg.admin_api_tokens)
    reader = tokens.match(token, cfg.admin_read_api_tokens)
    if operator is not None:
        return actor_id(operator)
    if reader is not None:
        if scope != "read":
            raise errors.Forbidden("this token may read but not act (its scope is read)")
        return actor_id(reader)
    if tokens.match(token, cfg.client_api_tokens):
        raise errors.Forbidden("this route needs an admin token")
    raise errors.Unauthorized("unknown token")


def operate(handler: Handler) -> Handler:
    """An operator's action: an operate-scoped token, recorded on the AUDIT stream before it is
    carried out (if JetStream does not acknowledge the record, the action is refused with 503 and
    nothing is done) and its outcome after."""
    from boxoffice import wire as codec
    from boxoffice.ingress.state import BUS
    from boxoffice.wire import admin_actions as wire

    @functools.wraps(handler)
    async def acted(request: web.Request) -> web.StreamResponse:
        actor = require_admin(request, "operate")
        route = request.match_info.route.resource
        template = route.canonical if route is not None else request.path
        bus = request.app[BUS]
        action_id = uuid.uuid4().hex
        await bus.publish(wire.BEGUN, codec.encode(wire.Begun(
            id=action_id, at=codec.now(), actor=actor, action=f"{request.method} {template}"[:200],
            target=request.path[:2000], request_id=request.get(REQUEST_ID, ""))), action_id)
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except errors.BoxofficeError as exc:
            status = exc.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            try:
                await bus.publish(wire.FINISHED, codec.encode(wire.Finished(
                    id=action_id, at=codec.now(), status=status)), f"{action_id}-finished")
            except errors.BoxofficeError as exc:  # the action happened; its begin is on record
                log.warning("action %s: outcome not recorded (%s)", action_id, exc.code)

    return acted


async def read_json(request: web.Request, type_: type[T]) -> T:
    """Decode the body strictly into ``type_``: 400 for bad JSON, 422 for wrong fields."""
    # The body must be JSON whatever Content-Type says (curl's default form type included).
    body = await request.read()
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(describe(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise errors.InvalidJSON("the body is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise errors.InvalidJSON("the body is nested too deeply") from None


def read_query(request: web.Request, type_: type[T], **extra: object) -> T:
    """Decode the query string (plus ``extra``, e.g. path parameters) into ``type_``: 422 for a
    repeated parameter or a wrong one, in words."""
    params: dict[str, object] = dict(request.query)
    if len(params) != len(request.query):
        raise errors.ValidationFailed("each query parameter may be given once")
    params.update(extra)
    try:
        return msgspec.convert(params, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(describe(exc)) from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status,
                        content_type="application/json", headers=headers)
