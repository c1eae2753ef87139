"""The Sentry envelope protocol: parse an envelope, turn its events into error reports.

An envelope is one JSON header line, then items: a JSON item-header line (``type``, optional
``length``) and a payload of ``length`` bytes, or up to the next newline. Event items become
``ErrorReport``s; every other item type (transactions, sessions, attachments, client reports,
replays, ...) is skipped. Limits: ``MAX_EVENT`` per event, ``MAX_ENVELOPE`` per envelope.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import msgspec

from boxoffice import errors, scrub
from boxoffice.wire.errors import LEVELS, ErrorReport

MAX_EVENT = 1 << 20
MAX_ENVELOPE = 20 << 20

InvalidEnvelope = errors.define("InvalidEnvelope", "invalid_envelope", 400,
                                "Malformed Sentry envelope")
EventTooLarge = errors.define("EventTooLarge", "event_too_large", 413, "Event too large")

_SERVICE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_LEVEL = {"warn": "warning", "log": "info", "critical": "critical", "fatal": "fatal"}


def json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise InvalidEnvelope(f"{what} is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise InvalidEnvelope(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidEnvelope(f"{what} must be a JSON object")
    return obj


def parse(body: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """(envelope header, [(item type, payload)]); raises ``InvalidEnvelope`` or ``EventTooLarge``."""
    end = body.find(b"\n")
    header = json_object(body if end < 0 else body[:end], "the envelope header")
    pos = len(body) if end < 0 else end + 1
    items: list[tuple[str, bytes]] = []
    while pos < len(body):
        end = body.find(b"\n", pos)
        line = body[pos:] if end < 0 else body[pos:end]
        pos = len(body) if end < 0 else end + 1
        if not line.strip():
            continue
        item = json_object(line, "an item header")
        kind, length = item.get("type"), item.get("length")
        if not isinstance(kind, str) or not kind:
            raise InvalidEnvelope("an item header has no type")
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise InvalidEnvelope("an item length must be a non-negative integer")
            if pos + length > len(body):
                raise InvalidEnvelope("an item is shorter than its length")
            payload = body[pos:pos + length]
            pos += length
            if body[pos:pos + 1] == b"\n":
                pos += 1
        else:
            end = body.find(b"\n", pos)
            payload = body[pos:] if end < 0 else body[pos:end]
            pos = len(body) if end < 0 else end + 1
        if kind == "event" and len(payload) > MAX_EVENT:
            raise EventTooLarge(f"an event is larger than {MAX_EVENT} bytes")
        items.append((kind, payload))
    return header, items


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # logentry / message objects
        for key in ("formatted", "message"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _when(value: Any) -> datetime:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, str):
            ts = msgspec.convert(value, datetime, strict=False)
            return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    except (msgspec.ValidationError, ValueError, OverflowError, OSError):
        pass
    return datetime.now(timezone.utc)


def _frames(stacktrace: Any) -> list[str]:
    frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
    out = []
    for f in frames if isinstance(frames, list) else []:
        if not isinstance(f, dict):
            continue
        where = f.get("abs_path") or f.get("filename") or f.get("module") or "?"
        line = f"  File \"{where}\", line {f.get('lineno') or 0}, in {f.get('function') or '?'}"
        if isinstance(f.get("context_line"), str):
            line += "\n    " + f["context_line"].strip()
        out.append(line)
    return out


def _exceptions(event: dict[str, Any]) -> list[dict[str, Any]]:
    exc = event.get("exception")
    values = exc.get("values") if isinstance(exc, dict) else exc
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def to_report(event: dict[str, Any], *, project_id: str, fallback_id: str | None) -> ErrorReport:
    """One Sentry event as an error report (fields cut to the report's limits)."""
    raw_id = event.get("event_id") or fallback_id
    try:
        report_id = str(uuid.UUID(raw_id)) if isinstance(raw_id, str) else str(uuid.uuid4())
    except ValueError:
        report_id = str(uuid.uuid4())
    values = _exceptions(event)
    last = values[-1] if values else {}
    error_type = last.get("type") if isinstance(last.get("type"), str) else None
    message = (f"{error_type}: {last.get('value')}" if error_type and last.get("value")
               else _text(last.get("value")) or _text(event.get("logentry"))
               or _text(event.get("message")) or error_type or "(no message)")
    stack = []
    for v in values:  # chained exceptions, oldest first, each with its frames (oldest call first)
        frames = _frames(v.get("stacktrace"))
        if frames:
            stack.append("Traceback (most recent call last):\n" + "\n".join(frames))
        stack.append(f"{v.get('type') or 'Error'}: {v.get('value') or ''}")
    if not values:
        threads = event.get("threads")
        for t in (threads.get("values") if isinstance(threads, dict) else None) or []:
            if isinstance(t, dict) and _frames(t.get("stacktrace")):
                stack.append("\n".join(_frames(t.get("stacktrace"))))
                break
    tags = event.get("tags")
    if isinstance(tags, list):  # [[key, value], ...]
        tags = {str(t[0]): t[1] for t in tags if isinstance(t, list) and len(t) == 2}
    tags = tags if isinstance(tags, dict) else {}
    platform = str(event.get("platform") or "other")
    service = _SERVICE_CHARS.sub("-", str(tags.get("service") or f"sentry-{platform}"))[:64].strip("-")
    level = str(event.get("level") or "error").lower()
    level = _LEVEL.get(level, level if level in LEVELS else "error")
    sdk = event.get("sdk") if isinstance(event.get("sdk"), dict) else {}
    context: dict[str, Any] = {"sentry": {
        "project_id": project_id, "platform": platform,
        "sdk": f"{sdk.get('name', '?')}/{sdk.get('version', '?')}",
        **{k: event[k] for k in ("logger", "transaction", "server_name", "culprit")
           if isinstance(event.get(k), str)}}}
    if tags:
        context["tags"] = tags
    for key in ("extra", "contexts", "request"):
        if isinstance(event.get(key), dict):
            context[key] = event[key]
    user = event.get("user")
    if isinstance(user, dict) and user.get("id") is not None:
        context["user"] = {"id": str(user["id"])[:128]}  # no e-mail, ip or name: personal data
    fingerprint = event.get("fingerprint")
    fingerprint = [str(x)[:512] for x in fingerprint[:32]] \
        if isinstance(fingerprint, list) and fingerprint else None
    trace = (event.get("contexts") or {}).get("trace") if isinstance(event.get("contexts"), dict) else None
    request_id = trace.get("trace_id") if isinstance(trace, dict) else None
    return ErrorReport(
        id=report_id, occurred_at=_when(event.get("timestamp")), service=service or "sentry",
        level=level,  # type: ignore[arg-type]
        message=scrub.truncate(message, 65536),
        error_type=scrub.truncate(error_type, 512) if error_type else None,
        stacktrace=scrub.truncate("\n".join(stack), 262144) if stack else None,
        context=scrub.clean(context, 8192, 100),
        fingerprint=fingerprint,
        environment=str(event["environment"])[:64] if event.get("environment") else None,
        release=str(event["release"])[:128] if event.get("release") else None,
        request_id=str(request_id)[:128] if request_id else None)
