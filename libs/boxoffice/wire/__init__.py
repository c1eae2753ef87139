"""Wire types: one module per family of subjects, one msgspec Struct per message.

Every body on the bus is JSON. ``encode``/``decode`` are the only codecs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes | str, type: type[T]) -> T:
    """Decode strictly: unknown fields and wrong types raise ``msgspec.ValidationError``."""
    return msgspec.json.decode(data, type=type, strict=True)


def now() -> datetime:
    return datetime.now(UTC)


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Base of every message: unknown fields are rejected."""


class Event(msgspec.Struct, omit_defaults=False):
    """Base of domain events (tolerant readers: consumers ignore fields they do not know)."""


class ErrorBody(msgspec.Struct):
    code: str
    status: int
    detail: str
    extra: dict[str, Any] = {}


class Reply(msgspec.Struct, omit_defaults=True):
    """Envelope of every request/reply answer: ``ok`` with ``data``, or an ``error``."""

    ok: bool
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: ErrorBody | None = None
