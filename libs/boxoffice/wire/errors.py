"""The error report every process publishes to ``errors.<service>.<level>`` (see the README)."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import msgspec

from boxoffice.wire.sentry_items import AttachmentInfo, FeedbackItem

# Severity levels, least to most severe (the order ranks a group's level and alerts).
Level = Literal["debug", "info", "warning", "error", "critical", "fatal"]
LEVELS: tuple[str, ...] = get_args(Level)


_UUID = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z"
_Frame = Annotated[str, msgspec.Meta(max_length=512)]


class ErrorReport(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Annotated[str, msgspec.Meta(pattern=_UUID)]
    occurred_at: datetime
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+\Z")]
    level: Level
    message: Annotated[str, msgspec.Meta(max_length=65536)]
    error_type: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    stacktrace: Annotated[str, msgspec.Meta(max_length=262144)] | None = None
    context: dict[str, Any] | None = None
    fingerprint: Annotated[list[_Frame], msgspec.Meta(max_length=32)] | None = None
    environment: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    release: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    request_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    count: Annotated[int, msgspec.Meta(ge=1)] = 1


_ID_NAMESPACE = uuid.UUID("0b6f7f52-86a4-4b8e-9a55-1d1c7e0a2c11")
_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


def stored_id(body_id: str | None, msg_id: str | None, subject: str, data: bytes) -> str:
    """The ``error_logs`` id of a report on the bus: its own ``id``, else its ``Nats-Msg-Id``
    (kept when a uuid, else mapped to one), else a digest of the message. The error-sink stores
    under it and the audit looks reports up by it, so this is the one place it is computed."""
    for candidate in (body_id, msg_id):
        if candidate:
            if len(candidate) in (32, 36) and _UUID_TEXT.fullmatch(candidate):
                return candidate
            return str(uuid.uuid5(_ID_NAMESPACE, candidate[:512]))
    return str(uuid.uuid5(_ID_NAMESPACE, hashlib.sha256(subject.encode() + data).hexdigest()))


# -- operator queries, served by the error-sink on admin.errors.<verb> -----------------------

GROUPS_LIST = "admin.errors.list"
GROUPS_GET = "admin.errors.get"
GROUPS_RESOLVE = "admin.errors.resolve"
GROUPS_IGNORE = "admin.errors.ignore"

Status = Literal["unresolved", "resolved", "ignored"]
STATUSES: tuple[str, ...] = get_args(Status)
_UUID = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z"


class ListGroups(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    status: Status | None = None
    level: Level | None = None
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_-]+\Z")] | None = None
    since: datetime | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class GetGroup(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    group_id: Annotated[str, msgspec.Meta(pattern=_UUID)]
    events: Annotated[int, msgspec.Meta(ge=0, le=200)] = 20


class SetGroupStatus(msgspec.Struct, forbid_unknown_fields=True):
    group_id: Annotated[str, msgspec.Meta(pattern=_UUID)]


class ErrorGroup(msgspec.Struct):
    id: str
    title: str
    service: str
    level: str
    status: str
    fingerprint: list[str]
    first_seen: datetime
    last_seen: datetime
    count: int
    resolved_at: datetime | None = None
    regressed_at: datetime | None = None
    last_alerted_at: datetime | None = None
    # reports in each of the last 24 hours, oldest first (in lists; empty elsewhere)
    hourly: list[int] = []


class GroupList(msgspec.Struct):
    groups: list[ErrorGroup]


class StoredError(msgspec.Struct):
    """One row of ``error_logs`` (already scrubbed)."""

    id: str
    timestamp: datetime
    received_at: datetime
    service: str
    severity: str
    error_message: str
    occurrences: int
    resolved: bool
    function_name: str | None = None
    error_type: str | None = None
    stacktrace: str | None = None
    context: dict[str, Any] | None = None
    fingerprint: list[str] | None = None
    environment: str | None = None
    release: str | None = None
    request_id: str | None = None


class GroupDetail(msgspec.Struct):
    group: ErrorGroup
    events: list[StoredError]
    # what users said about the group's errors and the files sent with them (wire.sentry_items)
    feedback: list[FeedbackItem] = []
    attachments: list[AttachmentInfo] = []


# -- alerts: published to alerts.<level> (Nats-Msg-Id = id: the group id plus its window) -----

class Alert(msgspec.Struct, omit_defaults=False):
    id: str
    group_id: str
    level: str
    reason: Literal["level", "rate"]
    title: str
    service: str
    count: int
    window_count: int
    first_seen: datetime
    last_seen: datetime
    alerted_at: datetime
