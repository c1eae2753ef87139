"""The Sentry envelope protocol: parse an envelope, turn its events into error reports.

An envelope is one JSON header line, then items: a JSON item-header line (``type``, optional
``length``) and a payload of ``length`` bytes, or up to the next newline. Event items become
``ErrorReport``s (``to_report``), keeping what an operator needs to read the error: breadcrumbs,
each frame's local variables, the exception mechanism (handled or not), ``dist``; all of it is
scrubbed like the rest of the report. Limits: ``MAX_EVENT`` per event, ``MAX_ENVELOPE`` per
envelope.

Grouping of a Sentry event is decided here, where its frames are still structured: the
exception type and its in-app frames as ``module:function`` (``fingerprint``), so neither the
path a machine checked the code out to nor a bundle's content hash splits a group.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from boxoffice import errors, scrub
from boxoffice.wire.errors import LEVELS, ErrorReport

MAX_EVENT = 1 << 20
MAX_ENVELOPE = 20 << 20  # kept in memory; skipped items do not count
MAX_WIRE = 200 << 20  # read at most, skipped items included (Sentry's envelope limit)
MAX_ITEMS = 1000  # items in one envelope, skipped ones included (an SDK sends a handful)

InvalidEnvelope = errors.define("InvalidEnvelope", "invalid_envelope", 400,
                                "Malformed Sentry envelope")
EventTooLarge = errors.define("EventTooLarge", "event_too_large", 413, "Event too large")

# whole lines of nothing but whitespace between items: skipped in one step, not line by line (20 MiB
# of newlines cost 8 s of CPU read one line at a time). A line of more than 64 spaces is read the
# slow way, so that a failed match never scans more than 65 bytes.
_BLANK_LINES = re.compile(rb"(?:[ \t\r\x0b\x0c]{0,64}\n)+")
_SERVICE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_LEVEL = {"warn": "warning", "log": "info", "critical": "critical", "fatal": "fatal"}
DEFAULT_FINGERPRINT = "{{ default }}"
# a content hash in a bundle's file name: main.3f2a1b9c.js, chunk-5e6f7a8b.js, app.min.js?v=12
_BUNDLE_HASH = re.compile(r"[.-](?=[0-9a-f]*\d)[0-9a-f]{6,}(?=[.-])", re.I)
_URL_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/]*", re.I)
MAX_BREADCRUMBS = 100
MAX_FRAMES = 30


def as_dict(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (what SDKs send is checked, not trusted)."""
    return value if isinstance(value, dict) else {}


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


class Dropped(msgspec.Struct):
    """An item left out of an envelope while it was read: its type, size and why."""

    kind: str
    size: int
    reason: str
    filename: str | None = None


class Item(msgspec.Struct):
    kind: str
    header: dict[str, Any]
    payload: bytes


class Parser:
    """Reads an envelope as it arrives (``feed`` each chunk, then ``finish``), keeping at most
    ``MAX_ENVELOPE`` bytes: an item whose declared ``length`` is over ``max_item`` (an
    attachment, a replay) is skipped without being held in memory and listed in ``dropped``,
    so the event beside it is kept. Raises ``InvalidEnvelope``, ``EventTooLarge`` or
    ``errors.PayloadTooLarge``."""

    def __init__(self, max_item: int = MAX_ENVELOPE):
        self.max_item = max_item
        self.header: dict[str, Any] | None = None
        self.items: list[Item] = []
        self.dropped: list[Dropped] = []
        self._buf = bytearray()
        self._scanned = 0  # the buffer's first bytes known to hold no newline
        self._kept = 0
        self._skip = 0
        self._pending: dict[str, Any] | None = None  # an item header whose payload comes next
        self._eat_newline = False
        self._error: Exception | None = None

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:  # malformed: read on only to tell a too-large body apart
            self._kept += len(chunk)
        else:
            self._buf += chunk
            try:
                self._run(final=False)
            except (InvalidEnvelope, EventTooLarge) as exc:
                self._error, self._buf = exc, bytearray()
        if len(self._buf) > MAX_ENVELOPE or self._kept > MAX_ENVELOPE:
            raise errors.PayloadTooLarge(f"an envelope may not exceed {MAX_ENVELOPE} bytes")

    def finish(self) -> tuple[dict[str, Any], list[Item], list[Dropped]]:
        if self._error is not None:
            raise self._error
        self._run(final=True)
        if self._pending is not None and self._pending.get("length") is not None:
            raise InvalidEnvelope("an item is shorter than its length")
        if self.header is None:
            raise InvalidEnvelope("the envelope header is not valid JSON (UTF-8)")
        return self.header, self.items, self.dropped

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        self._drop(n)
        return out

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self._scanned = max(0, self._scanned - n)
        self._kept += n
        if self._kept > MAX_ENVELOPE:
            raise errors.PayloadTooLarge(f"an envelope may not exceed {MAX_ENVELOPE} bytes")

    def _line(self, final: bool) -> bytes | None:
        # searched from where the last search ended: a line arriving in many chunks is scanned
        # once, not once per chunk
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            return self._take(len(self._buf)) if final and self._buf else None
        line = self._take(end + 1)[:-1]
        return line

    def _run(self, final: bool) -> None:
        while True:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    if final:
                        raise InvalidEnvelope("an item is shorter than its length")
                    return
                self._eat_newline = True
            if self._eat_newline:
                if not self._buf:
                    if final:
                        self._eat_newline = False
                    return
                if self._buf[0:1] == b"\n":
                    self._take(1)
                self._eat_newline = False
            if self.header is None:
                line = self._line(final)
                if line is None:
                    return
                self.header = json_object(line, "the envelope header")
                continue
            pending = self._pending
            if pending is None:
                if blank := _BLANK_LINES.match(self._buf):
                    self._drop(blank.end())
                line = self._line(final)
                if line is None:
                    return
                if line.strip():
                    self._item_header(json_object(line, "an item header"))
                continue
            length = pending.get("length")
            if length is None:
                line = self._line(final)
                if line is None:
                    return
                self._item(pending, line)
            elif len(self._buf) >= length:
                self._item(pending, self._take(length))
                self._eat_newline = True
            else:
                return

    def _item_header(self, item: dict[str, Any]) -> None:
        if len(self.items) + len(self.dropped) >= MAX_ITEMS:
            raise errors.PayloadTooLarge(f"an envelope may hold at most {MAX_ITEMS} items")
        kind, length = item.get("type"), item.get("length")
        if not isinstance(kind, str) or not kind:
            raise InvalidEnvelope("an item header has no type")
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise InvalidEnvelope("an item length must be a non-negative integer")
            if kind == "event" and length > MAX_EVENT:
                raise EventTooLarge(f"an event is larger than {MAX_EVENT} bytes")
            if kind != "event" and length > self.max_item:
                name = item.get("filename")
                self.dropped.append(Dropped(kind=kind[:64], size=length, reason="too_large",
                                            filename=name[:256] if isinstance(name, str) else None))
                self._skip = length
                if not length:
                    self._eat_newline = True
                return
        self._pending = item

    def _item(self, header: dict[str, Any], payload: bytes) -> None:
        self._pending = None
        kind = header["type"]
        if kind == "event" and len(payload) > MAX_EVENT:
            raise EventTooLarge(f"an event is larger than {MAX_EVENT} bytes")
        self.items.append(Item(kind=kind, header=header, payload=payload))


def parse(body: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """(envelope header, [(item type, payload)]) of a whole envelope."""
    p = Parser()
    p.feed(body)
    header, items, _ = p.finish()
    return header, [(i.kind, i.payload) for i in items]


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
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            ts = msgspec.convert(value, datetime, strict=False)
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    except (msgspec.ValidationError, ValueError, OverflowError, OSError):
        pass
    return datetime.now(UTC)


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


def _frame_key(frame: dict[str, Any]) -> str:
    """A frame as ``module:function``: the module the SDK names (Python, Node), else the file's
    last two path parts with origin, query and content hash taken out (browsers)."""
    module = frame.get("module")
    if not isinstance(module, str) or not module:
        path = frame.get("filename") or frame.get("abs_path") or "?"
        path = _URL_ORIGIN.sub("", str(path)).split("?", 1)[0].split("#", 1)[0].replace("\\", "/")
        module = "/".join(_BUNDLE_HASH.sub("", part) for part in path.rstrip("/").split("/")[-2:])
    return f"{module[:200]}:{str(frame.get('function') or '?')[:200]}"


def _is_in_app(frame: dict[str, Any]) -> bool:
    if isinstance(frame.get("in_app"), bool):
        return frame["in_app"]
    # SDKs say; when one does not, a library's file is not the application's
    path = str(frame.get("abs_path") or frame.get("filename") or "")
    return not any(m in path for m in ("site-packages", "dist-packages", "node_modules", "<frozen"))


def _frame_list(stacktrace: Any) -> list[dict[str, Any]]:
    frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
    return [f for f in frames if isinstance(f, dict)] if isinstance(frames, list) else []


def fingerprint(event: dict[str, Any], values: list[dict[str, Any]]) -> list[str] | None:
    """The event's grouping: its own fingerprint (``{{ default }}`` expanded), else the exception
    type and its in-app frames as ``module:function``; None leaves it to the error-sink (the
    message with numbers and ids stripped)."""
    default: list[str] | None = None
    last = values[-1] if values else None
    if last is not None:
        frames = [_frame_key(f) for f in _frame_list(last.get("stacktrace")) if _is_in_app(f)]
        if frames:
            default = [str(last.get("type") or "Error")[:512], *frames[-(MAX_FRAMES):]]
    own = event.get("fingerprint")
    if isinstance(own, list) and own:
        parts: list[str] = []
        for item in own[:32]:
            if item == DEFAULT_FINGERPRINT and default is not None:
                parts += default
            else:
                parts.append(str(item)[:512])
        return parts[:32]
    return default


def _exception_detail(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each exception with its mechanism and its frames (with local variables), oldest first."""
    out = []
    for v in values[-5:]:
        mech = as_dict(v.get("mechanism"))
        frames = []
        for f in _frame_list(v.get("stacktrace"))[-MAX_FRAMES:]:
            frame: dict[str, Any] = {k: f[k] for k in ("filename", "abs_path", "module", "function", "lineno",
                                       "colno", "in_app", "context_line") if k in f}
            if isinstance(f.get("vars"), dict):
                frame["vars"] = f["vars"]
            frames.append(frame)
        out.append({"type": v.get("type"), "value": v.get("value"), "module": v.get("module"),
                    "mechanism": {"type": mech.get("type") or "generic",
                                  "handled": mech.get("handled", True) is not False,
                                  **({"synthetic": True} if mech.get("synthetic") else {})},
                    "frames": frames})
    return out


def _breadcrumbs(event: dict[str, Any]) -> list[dict[str, Any]]:
    crumbs = event.get("breadcrumbs")
    crumbs = crumbs.get("values") if isinstance(crumbs, dict) else crumbs
    if not isinstance(crumbs, list):
        return []
    keep = ("timestamp", "type", "category", "level", "message", "data")
    return [{k: c[k] for k in keep if k in c} for c in crumbs[-MAX_BREADCRUMBS:] if isinstance(c, dict)]


def to_report(event: dict[str, Any], *, project_id: str, fallback_id: str | None,
              service: str | None = None) -> ErrorReport:
    """One Sentry event as an error report (fields cut to the report's limits, nothing
    scrubbed: publish it through ``scrub.sealed``); ``service`` is the one ``SENTRY_PROJECTS``
    names for the project, if any."""
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
    service = _SERVICE_CHARS.sub(
        "-", str(service or tags.get("service") or f"sentry-{platform}"))[:64].strip("-")
    level = str(event.get("level") or "error").lower()
    level = _LEVEL.get(level, level if level in LEVELS else "error")
    sdk = as_dict(event.get("sdk"))
    context: dict[str, Any] = {"sentry": {
        "project_id": project_id, "platform": platform,
        "sdk": f"{sdk.get('name', '?')}/{sdk.get('version', '?')}",
        **{k: event[k] for k in ("logger", "transaction", "server_name", "culprit", "dist")
           if isinstance(event.get(k), str)}}}
    if values:
        context["exception"] = _exception_detail(values)
        context["sentry"]["handled"] = all(e["mechanism"]["handled"] for e in context["exception"])
    if crumbs := _breadcrumbs(event):
        context["breadcrumbs"] = crumbs
    debug = as_dict(event.get("debug_meta"))
    images = [{"code_file": i["code_file"], "debug_id": i["debug_id"]}
              for i in (debug.get("images") or [])[:50] if isinstance(i, dict)
              and isinstance(i.get("code_file"), str) and isinstance(i.get("debug_id"), str)]
    if images:  # source maps' Debug IDs, to resolve minified frames (error-sink)
        context["debug_images"] = images
    if tags:
        context["tags"] = tags
    for key in ("extra", "contexts", "request"):
        if isinstance(event.get(key), dict):
            context[key] = event[key]
    user = event.get("user")
    if isinstance(user, dict) and user.get("id") is not None:
        context["user"] = {"id": str(user["id"])[:128]}  # no e-mail, ip or name: personal data
    fp = fingerprint(event, values)
    trace = (event.get("contexts") or {}).get("trace") if isinstance(event.get("contexts"), dict) else None
    request_id = trace.get("trace_id") if isinstance(trace, dict) else None
    return ErrorReport(
        id=report_id, occurred_at=_when(event.get("timestamp")), service=service or "sentry",
        level=level,  # type: ignore[arg-type]
        message=scrub.truncate(message, 65536),
        error_type=scrub.truncate(error_type, 512) if error_type else None,
        stacktrace=scrub.truncate("\n".join(stack), 262144) if stack else None,
        # Neither scrubbed nor bounded here: ingress publishes every client's report through
        # scrub.report, whose one walk does both (a walk here as well, with other bounds, took
        # as long again and miscounted what the second one cut).
        context=context,
        fingerprint=fp,
        environment=str(event["environment"])[:64] if event.get("environment") else None,
        release=str(event["release"])[:128] if event.get("release") else None,
        request_id=str(request_id)[:128] if request_id else None)
