"""The error report every process publishes to ``errors.<service>.<level>`` (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

Level = Literal["debug", "info", "warning", "error", "critical", "fatal"]
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical", "fatal")


class ErrorReport(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")]
    occurred_at: datetime
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    level: Level
    message: Annotated[str, msgspec.Meta(max_length=65536)]
    error_type: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    stacktrace: Annotated[str, msgspec.Meta(max_length=262144)] | None = None
    context: dict[str, Any] | None = None
    fingerprint: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=32)] | None = None
    environment: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    release: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    request_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    count: Annotated[int, msgspec.Meta(ge=1)] = 1
