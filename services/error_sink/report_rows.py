"""Persists error reports from ERRORS into ``error_logs`` and ``error_groups``, in batches.

Every message the bus accepted becomes a row: a report that does not fit the schema (other
languages, other versions) is coerced field by field, and even a body that is not JSON is kept
as a report saying so. Before anything is written, secrets are scrubbed and big fields cut
(``boxoffice.scrub``), and the report's group is computed (``grouping``). A report whose subject
carries ``scrub.SEAL`` (``errors.<service>.<level>.<seal>``, which only ingress may publish) was
scrubbed by its publisher with these same rules, and is only cut here.

One transaction per batch (``store.write``): COPY straight into ``error_logs``; if a report of
the batch is already there (a redelivery after a crash), that transaction is rolled back and the
batch goes, in another, through a staging table and ``INSERT ... ON CONFLICT (id) DO NOTHING``,
so a report is stored once. Then the groups of the new rows are upserted with their counts and
alerts decided. Messages are acked only after the commit; a failed batch is nak'ed for a
prompt redelivery (``report_intake``).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg

from boxoffice import scrub
from boxoffice.error_sink import grouping
from boxoffice.wire.errors import LEVELS, stored_id

_SERVICE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_MESSAGE = 8192
MAX_STACK = 65536
MAX_CONTEXT_JSON = 65536
_LEVELS = frozenset(LEVELS)
_json = msgspec.json.Encoder()


class _Report(msgspec.Struct):
    """A report as published by anyone: unknown fields ignored, no length limits (we cut)."""

    id: str | None = None
    occurred_at: datetime | None = None
    service: str | None = None
    level: str | None = None
    message: str | None = None
    error_type: str | None = None
    stacktrace: str | None = None
    context: dict[str, Any] | None = None
    fingerprint: list[str] | None = None
    environment: str | None = None
    release: str | None = None
    request_id: str | None = None
    count: int = 1


_decoder = msgspec.json.Decoder(_Report, strict=False)


class Row(msgspec.Struct):
    """One report, ready to store: ``record`` is what COPY writes (``COLUMNS``, in order)."""

    record: tuple[Any, ...]
    id: str
    timestamp: datetime
    service: str
    function_name: str
    severity: str
    error_message: str
    error_type: str | None
    stacktrace: str | None
    context: bytes | None  # scrubbed, as JSON (the jsonb codec of ``store`` copies it as it is)
    fingerprint: list[str] | None  # the report's own; the group keeps the computed one
    environment: str | None
    release: str | None
    request_id: str | None
    occurrences: int
    group_id: str
    # not copied: what the group needs
    fingerprint_hash: str
    group_fingerprint: tuple[str, ...]


COLUMNS = ("id", "timestamp", "service", "function_name", "severity", "error_message",
           "error_type", "stacktrace", "context", "fingerprint", "environment", "release",
           "request_id", "occurrences", "group_id")


def _str(v: str | None, limit: int) -> str | None:
    return scrub.truncate(scrub.text(v), limit) if v else None


def _cut(v: str | None, limit: int) -> str | None:
    """``_str`` for a sealed report: scrubbed by its publisher."""
    return scrub.truncate(v, limit) if v else None


# Hex digits and dashes (uuids, digests: most request ids, many releases) hold none of the
# keywords the scrubber looks for (each has a letter after "f", a "_", a ":" or a space), so
# only a card number could be in them: 13 or more digits and dashes in a row, then the string is
# scrubbed in full. (Messages are not tried: they are hardly ever hex.)
_HEX_DASH = b"0123456789abcdefABCDEF-"
_DIGITS_DASH = bytes(48 if b in b"0123456789-" else 120 for b in range(256))
_CARD_RUN = b"0" * 13


def _id_str(v: str | None, limit: int) -> str | None:
    """``_str`` for what is most often an id."""
    if not v:
        return None
    raw = v.encode()
    if not raw.translate(None, _HEX_DASH) and _CARD_RUN not in raw.translate(_DIGITS_DASH):
        return scrub.truncate(v, limit)
    return scrub.truncate(scrub.text(v), limit)


@functools.lru_cache(maxsize=1024)
def _service(name: str) -> str:
    return _SERVICE.sub("-", name)[:64].strip("-")


def _coerce(raw: bytes) -> _Report:
    """Last resort for a body that does not fit ``_Report``: keep what can be kept."""
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _Report(message="[undecodable error report] "
                               + raw[:4096].decode("utf-8", errors="replace"),
                       error_type="UndecodableReport")
    if not isinstance(obj, dict):
        return _Report(message="[error report is not an object] " + raw[:4096].decode(errors="replace"),
                       error_type="MalformedReport")
    r = _Report()
    for field in ("id", "service", "level", "message", "error_type", "stacktrace", "environment",
                  "release", "request_id"):
        v = obj.get(field)
        if v is not None:
            setattr(r, field, v if isinstance(v, str) else _json.encode(v).decode())
    ctx = obj.get("context")
    r.context = ctx if isinstance(ctx, dict) else ({"value": ctx} if ctx is not None else None)
    fp = obj.get("fingerprint")
    if isinstance(fp, list):
        r.fingerprint = [x if isinstance(x, str) else _json.encode(x).decode() for x in fp]
    try:
        r.occurred_at = msgspec.convert(obj.get("occurred_at"), datetime, strict=False)
    except msgspec.ValidationError:
        pass
    count = obj.get("count")
    r.count = count if isinstance(count, int) and not isinstance(count, bool) else 1
    return r


def _kind_of(service: str, error_type: str | None, stacktrace: str | None, sealed: bool = False
             ) -> tuple[str | None, str | None, tuple[str, ...] | None, tuple[str, str] | None]:
    """What every report of one kind shares: its scrubbed and cut type and stacktrace, and,
    when its frames group it (they do unless it has none in the app), its fingerprint and
    (hash, group id)."""
    cut = _cut if sealed else _str
    error_type, stacktrace = cut(error_type, 256), cut(stacktrace, MAX_STACK)
    fp = grouping.by_frames(error_type, stacktrace) if error_type and stacktrace else None
    return error_type, stacktrace, fp, (grouping.group_key(service, fp) if fp else None)


# A batch repeats a few dozen kinds of error: one lookup instead of two scrubs, a fingerprint
# and a group key. Keys are the raw strings (their hash is one pass in C); long stacktraces are
# rare and not kept (at most 1024 x 2 x 16 KiB held).
_kind_cached = functools.lru_cache(maxsize=1024)(_kind_of)
MAX_CACHED_STACK = 16384


def _report_id(r: _Report, msg: Msg) -> str:
    return stored_id(r.id, (msg.headers or {}).get("Nats-Msg-Id"), msg.subject, msg.data)


def prepare(msg: Msg, now: datetime) -> Row:
    """One message into one scrubbed, grouped row. Never raises on the message's content."""
    tokens = msg.subject.split(".")
    # sealed: scrubbed by its publisher (only ingress may publish these subjects). A NUL, which
    # PostgreSQL cannot store, would stop the stream here: such a body is scrubbed (NUL mapped).
    sealed = len(tokens) == 4 and tokens[3] == scrub.SEAL and b"\\u0000" not in msg.data
    try:
        r = _decoder.decode(msg.data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        r, sealed = _coerce(msg.data), False
    service = _service(r.service) if r.service else ""
    if not service:
        service = tokens[1] if len(tokens) > 2 else "unknown"
    level = r.level if r.level in _LEVELS else (r.level or "").lower()
    if level not in _LEVELS:
        token = tokens[2] if sealed else tokens[-1]
        level = token if token in _LEVELS else "error"
    ts = r.occurred_at or now
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    cut, id_cut = (_cut, _cut) if sealed else (_str, _id_str)
    message = cut(r.message, MAX_MESSAGE) or "(no message)"
    kind = _kind_cached if r.stacktrace is None or len(r.stacktrace) <= MAX_CACHED_STACK else _kind_of
    error_type, stacktrace, frames_fp, frames_key = kind(service, r.error_type, r.stacktrace, sealed)
    ctx = None
    function_name = service
    if r.context:
        cleaned = r.context if sealed else scrub.clean(r.context)
        ctx = _json.encode(cleaned)  # encoded once: measured here, copied as it is
        if len(ctx) > MAX_CONTEXT_JSON:
            cleaned = scrub.clean(cleaned, 256, 20)
            ctx = _json.encode(cleaned)
        fn = cleaned.get("function")
        if isinstance(fn, str) and fn:
            function_name = fn[:200]
    own = [cut(x, 256) or "" for x in r.fingerprint[:32]] if r.fingerprint else None
    if own is None and frames_fp is not None and frames_key is not None:
        fp, (fhash, gid) = frames_fp, frames_key  # what grouping.fingerprint would find
    else:
        fp = grouping.fingerprint(error_type, stacktrace, message, own)
        fhash, gid = grouping.group_key(service, fp)
    record = (_report_id(r, msg), ts, service, function_name, level, message, error_type,
              stacktrace, ctx, own, cut(r.environment, 64), id_cut(r.release, 128),
              id_cut(r.request_id, 128), max(1, min(r.count, 1 << 30)), gid)
    return Row(record, *record, fhash, fp)
