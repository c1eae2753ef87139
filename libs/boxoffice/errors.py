"""The one root exception of boxoffice and its stable codes.

A ``BoxofficeError`` carries a stable ``code``, an HTTP ``status`` and a human ``detail``.
It is translated to problem+json in one ingress middleware and to bus replies in one helper
(``boxoffice.bus``); nowhere else.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BoxofficeError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        body = {"type": f"https://boxoffice.dev/problems/{self.code}", "title": self.title,
                "status": self.status, "code": self.code, "detail": self.detail}
        body.update(self.extra)
        return body


def _error(name: str, code: str, status: int, title: str) -> type[BoxofficeError]:
    cls = type(name, (BoxofficeError,), {"code": code, "status": status, "title": title})
    ERRORS_BY_CODE[code] = cls
    return cls


ERRORS_BY_CODE: dict[str, type[BoxofficeError]] = {"internal_error": BoxofficeError}

BadRequest = _error("BadRequest", "bad_request", 400, "Bad request")
InvalidJSON = _error("InvalidJSON", "invalid_json", 400, "Body is not valid JSON")
ValidationFailed = _error("ValidationFailed", "validation_failed", 422, "Validation failed")
Unauthorized = _error("Unauthorized", "unauthorized", 401, "Missing or invalid credentials")
Forbidden = _error("Forbidden", "forbidden", 403, "Not allowed")
NotFound = _error("NotFound", "not_found", 404, "Not found")
# a kind of thing that is not there has one code and one wording, whoever finds it missing
WebhookEventNotFound = _error("WebhookEventNotFound", "webhook_event_not_found", 404,
                              "No such webhook event")
MethodNotAllowed = _error("MethodNotAllowed", "method_not_allowed", 405, "Method not allowed")
Conflict = _error("Conflict", "conflict", 409, "Conflict")
PayloadTooLarge = _error("PayloadTooLarge", "payload_too_large", 413, "Payload too large")
UnsupportedMediaType = _error("UnsupportedMediaType", "unsupported_media_type", 415,
                              "Unsupported media type")
RateLimited = _error("RateLimited", "rate_limited", 429, "Too many requests")
ServiceUnavailable = _error("ServiceUnavailable", "service_unavailable", 503,
                            "Service temporarily unavailable")
ServiceTimeout = _error("ServiceTimeout", "service_timeout", 504, "Service did not answer in time")
DatabaseUnavailable = _error("DatabaseUnavailable", "database_unavailable", 503,
                             "Database temporarily unavailable")
UpstreamUnavailable = _error("UpstreamUnavailable", "upstream_unavailable", 503,
                             "Payment provider temporarily unavailable")
NotMigrated = _error("NotMigrated", "not_migrated", 500, "Database schema is not migrated")


def from_code(code: str, detail: str, status: int | None = None, **extra: Any) -> BoxofficeError:
    """Rebuild an error from its wire form (a bus reply)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = type("RemoteError", (BoxofficeError,),
                   {"code": code, "status": status or 500, "title": code.replace("_", " ")})
    return cls(detail, **extra)


def define(name: str, code: str, status: int, title: str) -> type[BoxofficeError]:
    """Declare a new stable error code (used by services for their domain errors)."""
    return ERRORS_BY_CODE.get(code) or _error(name, code, status, title)
