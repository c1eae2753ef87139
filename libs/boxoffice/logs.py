"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import contextvars
import logging
import sys
import traceback
from datetime import UTC, datetime

import msgspec

# The attributes every LogRecord has: anything else on a record came from ``extra=``.
RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_enc = msgspec.json.Encoder()

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
"""The id of the HTTP request being worked on (ingress's ``X-Request-Id``), carried over the bus
in the ``Boxoffice-Request-Id`` header (``boxoffice.bus``): every log line and error report of
every service written while working on it names it."""


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """What the caller added to ``record`` (``extra=``), private (``_``) attributes left out."""
    return {k: v for k, v in vars(record).items() if k not in RESERVED and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(extra_fields(record))
        if "request_id" not in out and (rid := REQUEST_ID.get()):
            out["request_id"] = rid
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["stack"] = "".join(traceback.format_exception(*record.exc_info))[-8000:]
        return _enc.encode(out).decode()


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # quiet chatty libraries
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("nats").setLevel(logging.WARNING)
