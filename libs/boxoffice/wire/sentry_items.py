"""What Sentry SDKs send besides errors, on the ``SENTRY_ITEMS`` stream (``sentry.items.<kind>``):
published by ingress, kept by the error-sink; and the operators' queries about them.

Each message's ``Nats-Msg-Id`` is its ``id``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

STREAM = "SENTRY_ITEMS"
SUBJECTS = "sentry.items.>"
CONSUMER = (STREAM, "error-sink")
FEEDBACK, ATTACHMENT, DISCARDS = "feedback", "attachment", "discards"
CHECK_IN, SESSIONS = "check_in", "sessions"


def subject(kind: str) -> str:
    return f"sentry.items.{kind}"


class Feedback(msgspec.Struct, omit_defaults=True):
    """A user's feedback: the ``feedback`` item, the older ``user_report`` or the endpoint."""

    id: str
    occurred_at: datetime
    service: str
    project_id: str
    source: Literal["feedback", "user_report", "endpoint"]
    message: str
    event_id: str | None = None  # the error it is about (error_logs.id, a uuid)
    name: str | None = None
    email: str | None = None
    url: str | None = None
    environment: str | None = None
    release: str | None = None


class Attachment(msgspec.Struct, omit_defaults=True):
    id: str
    service: str
    project_id: str
    filename: str
    content_type: str
    attachment_type: str
    data: bytes  # base64 in JSON
    event_id: str | None = None


class Discarded(msgspec.Struct):
    reason: str
    category: str
    quantity: int


class Discards(msgspec.Struct):
    """What was dropped: an SDK's client report (``origin`` client) or what ingress left out
    of an envelope (``origin`` server)."""

    id: str
    service: str
    project_id: str
    origin: Literal["client", "server"]
    discarded: list[Discarded]


class MonitorConfig(msgspec.Struct, omit_defaults=True):
    schedule_type: Literal["crontab", "interval"]
    schedule_value: str  # the crontab, or the interval's count
    schedule_unit: str | None = None
    checkin_margin: int | None = None  # minutes
    max_runtime: int | None = None  # minutes
    timezone: str | None = None


class CheckIn(msgspec.Struct, omit_defaults=True):
    """A cron job's check-in; ``config`` creates or updates its monitor."""

    id: str  # the check-in's id: an in_progress one and its end share it
    service: str
    project_id: str
    monitor_slug: str
    status: Literal["in_progress", "ok", "error"]
    received_at: datetime
    duration: float | None = None  # seconds
    environment: str | None = None
    config: MonitorConfig | None = None


class SessionCount(msgspec.Struct, omit_defaults=True):
    """One session (``sid``) in its latest state, or an aggregate bucket (``sid`` None)."""

    release: str
    environment: str
    started: datetime
    sid: str | None = None
    did: str | None = None
    status: str = "ok"
    errors: int = 0
    exited: int = 0
    errored: int = 0
    abnormal: int = 0
    crashed: int = 0


class Sessions(msgspec.Struct):
    id: str
    service: str
    project_id: str
    sessions: list[SessionCount]


# -- operator queries, served by the error-sink ------------------------------------------------

FEEDBACK_LIST = "admin.errors.feedback"
ATTACHMENT_GET = "admin.errors.attachment"
DROPPED = "admin.errors.dropped"
_UUID = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z"


class ListFeedback(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_-]+\Z")] | None = None
    since: datetime | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class FeedbackItem(msgspec.Struct):
    id: str
    received_at: datetime
    service: str
    source: str
    message: str
    event_id: str | None = None
    group_id: str | None = None
    name: str | None = None
    email: str | None = None
    url: str | None = None
    environment: str | None = None
    release: str | None = None


class FeedbackList(msgspec.Struct):
    feedback: list[FeedbackItem]


class AttachmentInfo(msgspec.Struct):
    id: str
    event_id: str | None
    filename: str
    content_type: str
    size: int
    received_at: datetime


class GetAttachment(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=_UUID)]


class AttachmentData(msgspec.Struct):
    info: AttachmentInfo
    data: bytes


class ListDropped(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    since: datetime | None = None  # default: the last 24 hours
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_-]+\Z")] | None = None


class DroppedCount(msgspec.Struct):
    service: str
    origin: str
    reason: str
    category: str
    quantity: int


class DroppedList(msgspec.Struct):
    since: datetime
    dropped: list[DroppedCount]


MONITORS = "admin.errors.monitors"
RELEASES = "admin.errors.releases"


class ListMonitors(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_-]+\Z")] | None = None


class Monitor(msgspec.Struct):
    service: str
    slug: str
    schedule_type: str
    schedule_value: str
    schedule_unit: str | None
    checkin_margin: int
    max_runtime: int
    timezone: str | None
    status: str  # new, ok, error, in_progress, missed, timeout
    last_checkin_at: datetime | None
    last_checkin_status: str | None
    next_expected_at: datetime | None
    last_duration: float | None = None


class MonitorList(msgspec.Struct):
    monitors: list[Monitor]


class ListReleases(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_-]+\Z")] | None = None
    since: datetime | None = None  # default: the last 30 days


class Release(msgspec.Struct):
    service: str
    release: str
    environment: str
    sessions: int
    crashed: int
    errored: int
    abnormal: int
    crash_free_rate: float | None
    users: int
    crash_free_users_rate: float | None


class ReleaseList(msgspec.Struct):
    releases: list[Release]


SOURCE_MAP_UPLOAD = "admin.errors.sourcemap"


class SourceMapUpload(msgspec.Struct, forbid_unknown_fields=True):
    release: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]  # URL or ~/path
    map: bytes


class SourceMapInfo(msgspec.Struct):
    release: str
    name: str
    size: int
    sources: list[str]


MONITOR_SET = "admin.errors.monitor_set"
_NAME = r"^[A-Za-z0-9_-]+\Z"


class SetMonitor(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A monitor created or changed by an operator (a check-in's monitor_config does the same)."""

    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_NAME)]
    slug: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_NAME)]
    schedule_type: Literal["crontab", "interval"]
    schedule_value: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    schedule_unit: Literal["minute", "hour", "day", "week", "month", "year"] | None = None
    checkin_margin: Annotated[int, msgspec.Meta(ge=0, le=1440)] = 1
    max_runtime: Annotated[int, msgspec.Meta(ge=1, le=10080)] = 30
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
