"""Operator queries answered by the reaper (``admin.reaper.<verb>``), routed by ingress."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from boxoffice.wire import Message

STATS = "admin.reaper.stats"
CLEANUP = "admin.reaper.cleanup"
RUNS = "admin.reaper.runs"
EXPIRY_LAG = "admin.reaper.expiry_lag"

RunKind = Literal["expiry", "retention", "manual"]
Uuid = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")]


class StatsRequest(Message):
    pass


class ReservationStats(msgspec.Struct):
    """``get_reservation_stats()`` plus the holds overdue right now (should stay near 0)."""

    active: int
    expired: int
    completed: int
    cancelled: int
    overdue: int
    oldest_active_hold: datetime | None
    next_expiry: datetime | None


class CleanupRequest(Message):
    """Expire every overdue hold now (optionally of one event)."""

    event_id: Uuid | None = None


class CleanupResult(msgspec.Struct):
    expired: int
    run_id: int


class RunsRequest(Message):
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 20
    kind: RunKind | None = None
    errors: bool = False


class ReaperRun(msgspec.Struct):
    id: int
    kind: RunKind
    replica: str | None
    started_at: datetime
    finished_at: datetime | None
    expired: int
    purged: dict[str, Any] | None
    error: str | None


class ReaperRuns(msgspec.Struct):
    runs: list[ReaperRun]


class ExpiryLagRequest(Message):
    minutes: Annotated[int, msgspec.Meta(ge=1, le=1440)] = 60


class LagPoint(msgspec.Struct):
    """The holds expired in one minute and how long past their ``expires_at`` they were
    released (seconds)."""

    minute: datetime
    holds: int
    max_seconds: float
    avg_seconds: float


class ExpiryLag(msgspec.Struct):
    """Expiry lag per minute over the last ``minutes`` (minutes without expiries left out)."""

    minutes: int
    points: list[LagPoint]
