"""The console's sessions: an admin token exchanged for a signed cookie, and its CSRF token.

A session is stateless, so any replica of ingress reads it: the cookie holds the admin's id
(a digest of the token, as in the logs), the scope, the expiry and a random nonce, signed with
HMAC-SHA256 keyed by the admin token itself. The token never travels in the cookie, and taking a
token out of ``ADMIN_API_TOKENS`` / ``ADMIN_READ_API_TOKENS`` ends every session it opened. The
CSRF token is another HMAC of the nonce: the page reads it once (``GET /console/session``) and
sends it as ``X-CSRF-Token`` with every action; a cookie alone never acts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from boxoffice import errors, tokens
from boxoffice.config import Config

COOKIE = "boxoffice_session"
CSRF_HEADER = "X-CSRF-Token"
LIFETIME = 8 * 3600  # seconds: a working day, then sign in again
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_VERSION = "v1"


@dataclass(frozen=True)
class Session:
    actor: str
    scope: str  # "operate" or "read"
    expires: int  # unix seconds
    nonce: str
    csrf: str


def actor_id(token: str) -> str:
    """An admin token's id in logs and the action log: a digest, never the token."""
    return "a_" + hmac.new(b"boxoffice-admin", token.encode(), "sha256").hexdigest()[:16]


def _mac(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def _scoped_tokens(cfg: Config) -> list[tuple[str, str]]:
    return ([(t, "operate") for t in cfg.admin_api_tokens]
            + [(t, "read") for t in cfg.admin_read_api_tokens])


def scope_of(cfg: Config, token: str) -> str | None:
    """``operate`` or ``read`` for an admin token, else None (compared in constant time)."""
    operator = tokens.match(token, cfg.admin_api_tokens)
    reader = tokens.match(token, cfg.admin_read_api_tokens)
    return "operate" if operator is not None else "read" if reader is not None else None


def issue(token: str, scope: str, now: float | None = None) -> tuple[str, Session]:
    """The cookie value of a new session for ``token`` (already checked) and the session."""
    expires = int(now if now is not None else time.time()) + LIFETIME
    nonce = secrets.token_urlsafe(18)
    body = f"{_VERSION}.{actor_id(token)}.{scope}.{expires}.{nonce}"
    value = f"{body}.{_mac(token, body)}"
    return value, Session(actor_id(token), scope, expires, nonce,
                          _mac(token, f"csrf.{nonce}")[:43])


def read(cfg: Config, value: str, now: float | None = None) -> Session:
    """The session of a cookie value; ``Unauthorized`` if it is forged, expired or its token
    is no longer configured."""
    parts = value.split(".")
    if len(parts) != 6 or parts[0] != _VERSION or not parts[3].isdigit():
        raise errors.Unauthorized("the console session is not valid: sign in again")
    _, actor, scope, expires, nonce, mac = parts
    body = ".".join(parts[:5])
    found: Session | None = None
    for token, token_scope in _scoped_tokens(cfg):
        if token_scope != scope or not hmac.compare_digest(actor_id(token), actor):
            continue
        if hmac.compare_digest(_mac(token, body), mac):
            found = Session(actor, scope, int(expires), nonce, _mac(token, f"csrf.{nonce}")[:43])
    if found is None:
        raise errors.Unauthorized("the console session is not valid: sign in again")
    if found.expires <= (now if now is not None else time.time()):
        raise errors.Unauthorized("the console session has expired: sign in again")
    return found


def check_csrf(session: Session, method: str, header: str | None) -> None:
    """An action (any method but GET, HEAD, OPTIONS) by cookie needs the session's CSRF token."""
    if method in SAFE_METHODS:
        return
    if not header or not hmac.compare_digest(header.encode(), session.csrf.encode()):
        raise errors.Forbidden(f"an action from the console needs its {CSRF_HEADER} header")


def cookie_attributes(cfg: Config) -> dict[str, object]:
    """HttpOnly, SameSite=Strict, and Secure outside development (``BOXOFFICE_ENV``)."""
    return {"path": "/", "httponly": True, "samesite": "Strict",
            "secure": cfg.env != "development"}
