"""Every item type of a Sentry envelope, handled on purpose.

Kept: events (``errors.<service>.<level>``), user feedback (the ``feedback`` item, the older
``user_report``), attachments, client reports, cron check-ins and sessions
(``sentry.items.<kind>``, kept by the error-sink). Refused the way Sentry's protocol provides:
every answer carries ``X-Sentry-Rate-Limits`` naming the categories boxoffice does not keep
(``REFUSED``), so an SDK stops sending them for ``REFUSED_SECONDS``; what arrives before it
learns is counted as dropped (origin ``server``, reason ``disabled``), as is an item type nobody
knows (``unsupported``). Nothing is answered 200 and thrown away unseen.

Each kept category has its own per-key budget (``RateLimiter`` buckets ``<key>:<category>``),
so a busy front end's attachments or feedback never use up its errors' budget.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from boxoffice import schedule, scrub
from boxoffice.ingress import sentry_envelope
from boxoffice.ingress.sentry_envelope import Dropped, Item, as_dict, json_object
from boxoffice.wire import sentry_items as si

# item type -> data category (Sentry's names: what an SDK rate-limits by)
CATEGORY = {"event": "error", "attachment": "attachment", "user_report": "feedback",
            "feedback": "feedback", "client_report": "internal", "transaction": "transaction",
            "span": "span", "session": "session", "sessions": "session", "check_in": "monitor",
            "log": "log_item", "otel_log": "log_item", "profile": "profile",
            "profile_chunk": "profile_chunk", "replay_event": "replay",
            "replay_recording": "replay", "replay_video": "replay", "trace_metric": "trace_metric",
            "statsd": "metric_bucket", "metric_buckets": "metric_bucket"}
KEPT = ("error", "attachment", "feedback", "session", "monitor")
REFUSED = ("transaction", "span", "log_item", "profile", "profile_chunk", "replay", "trace_metric",
           "metric_bucket")
REFUSED_SECONDS = 3600
REFUSED_HEADER = f"{REFUSED_SECONDS}:{';'.join(REFUSED)}:organization:disabled"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_ATTACHMENT = 4 << 20  # per item: over it, dropped with a note on its event
DAILY_ATTACHMENT_BYTES = 256 << 20  # per public key and ingress replica, per UTC day


class AttachmentQuota:
    """Bytes of attachments taken per key today (UTC); forgotten at midnight."""

    def __init__(self, per_day: int = DAILY_ATTACHMENT_BYTES):
        self.per_day = per_day
        self._day = ""
        self._used: dict[str, int] = {}

    def take(self, key: str, n: int) -> bool:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        if day != self._day:
            self._day, self._used = day, {}
        used = self._used.get(key, 0)
        if used + n > self.per_day:
            return False
        self._used[key] = used + n
        return True


@dataclasses.dataclass
class Sorted:
    """An envelope's items by what becomes of them."""

    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    feedback: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    attachments: list[Item] = dataclasses.field(default_factory=list)
    client_reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    check_ins: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sessions: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    discarded: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, category: str, n: int = 1) -> None:
        self.discarded[(reason, category)] = self.discarded.get((reason, category), 0) + n

    def count(self, category: str) -> int:
        return {"error": len(self.events), "feedback": len(self.feedback),
                "attachment": len(self.attachments), "monitor": len(self.check_ins),
                "session": len(self.sessions)}[category]


def sort(items: list[Item], dropped: list[Dropped]) -> Sorted:
    out = Sorted()
    for d in dropped:
        out.drop("too_large", CATEGORY.get(d.kind, "default"))
    for item in items:
        category = CATEGORY.get(item.kind)
        if item.kind == "event":
            out.events.append(json_object(item.payload, "an event"))
        elif category == "feedback":
            out.feedback.append((item.kind, json_object(item.payload, "a feedback item")))
        elif item.kind == "attachment":
            if len(item.payload) > MAX_ATTACHMENT:  # one sent without a length
                name = item.header.get("filename")
                dropped.append(Dropped(kind="attachment", size=len(item.payload),
                                       reason="too_large",
                                       filename=name[:256] if isinstance(name, str) else None))
                out.drop("too_large", "attachment")
            else:
                out.attachments.append(item)
        elif item.kind == "client_report":
            out.client_reports.append(json_object(item.payload, "a client report"))
        elif item.kind == "check_in":
            out.check_ins.append(json_object(item.payload, "a check-in"))
        elif category == "session":
            out.sessions.append((item.kind, json_object(item.payload, "a session")))
        elif category in REFUSED:
            out.drop("disabled", category)
        else:
            out.drop("unsupported", "default")
    return out


def _uuid(value: Any) -> str | None:
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _opt(value: Any, limit: int) -> str | None:
    return scrub.truncate(scrub.text(value), limit) if isinstance(value, str) and value else None


def feedback(kind: str, body: dict[str, Any], *, service: str, project_id: str) -> si.Feedback | None:
    """A ``feedback`` item (an event with ``contexts.feedback``) or a ``user_report``; None when
    it says nothing."""
    if kind == "user_report":
        message, name, email = body.get("comments"), body.get("name"), body.get("email")
        event_id, url, source = body.get("event_id"), None, "user_report"
        env = release = None
        fid = None
    else:
        ctx = as_dict(body.get("contexts"))
        fb = as_dict(ctx.get("feedback"))
        message, name, email = fb.get("message"), fb.get("name"), fb.get("contact_email")
        event_id, url, source = fb.get("associated_event_id"), fb.get("url"), "feedback"
        env, release, fid = body.get("environment"), body.get("release"), body.get("event_id")
    if not isinstance(message, str) or not message.strip():
        return None
    return si.Feedback(
        id=_uuid(fid) or str(uuid.uuid4()), occurred_at=datetime.now(UTC),
        service=service, project_id=project_id, source=source,  # type: ignore[arg-type]
        message=scrub.truncate(scrub.text(message), 8192), event_id=_uuid(event_id),
        name=_opt(name, 256), email=_opt(email, 256), url=_opt(url, 2048),
        environment=_opt(env, 64), release=_opt(release, 128))


def attachment(item: Item, *, service: str, project_id: str,
               event_id: str | None) -> si.Attachment:
    h = item.header

    def printable(key: str) -> str | None:  # names go into headers when downloaded
        v = h.get(key)
        return _CONTROL.sub("?", v) if isinstance(v, str) and v.strip() else None

    name = printable("filename") or "attachment"
    ctype = printable("content_type")
    atype = printable("attachment_type")
    return si.Attachment(id=str(uuid.uuid4()), service=service, project_id=project_id,
                         filename=name[:256], content_type=(ctype or "application/octet-stream")[:128],
                         attachment_type=(atype or "event.attachment")[:64], data=item.payload,
                         event_id=event_id)


def client_discards(report: dict[str, Any]) -> list[si.Discarded]:
    out = []
    for key in ("discarded_events", "rate_limited_events", "filtered_events", "filtered_sampling_events"):
        entries = report.get(key)
        for e in entries[:200] if isinstance(entries, list) else []:
            if not isinstance(e, dict):
                continue
            q = e.get("quantity")
            if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                continue
            reason = e.get("reason") if key == "discarded_events" else key.removesuffix("_events")
            out.append(si.Discarded(reason=str(reason or "unknown")[:64],
                                    category=str(e.get("category") or "default")[:64],
                                    quantity=min(q, 1 << 40)))
    return out


def check_in(body: dict[str, Any], *, service: str, project_id: str) -> si.CheckIn | None:
    """A ``check_in`` item; None when it names no monitor or no known status."""
    slug, status = body.get("monitor_slug"), body.get("status")
    if not isinstance(slug, str) or not slug.strip() or status not in ("in_progress", "ok", "error"):
        return None
    duration = body.get("duration")
    config = None
    mc = body.get("monitor_config")
    if isinstance(mc, dict) and isinstance(mc.get("schedule"), dict):
        sch = mc["schedule"]
        kind, value, unit = sch.get("type"), sch.get("value"), sch.get("unit")
        try:
            schedule.next_run(kind, value, unit, datetime.now(UTC), mc.get("timezone"))
        except (schedule.InvalidSchedule, TypeError):
            kind = None  # a schedule we cannot follow is not taken
        if kind in ("crontab", "interval"):
            def minutes(key: str) -> int | None:
                v = mc.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e6:
                    return int(v)
                return None
            config = si.MonitorConfig(
                schedule_type=kind, schedule_value=str(value)[:128],
                schedule_unit=unit if isinstance(unit, str) else None,
                checkin_margin=minutes("checkin_margin"), max_runtime=minutes("max_runtime"),
                timezone=mc.get("timezone") if isinstance(mc.get("timezone"), str) else None)
    return si.CheckIn(
        id=_uuid(body.get("check_in_id")) or str(uuid.uuid4()), service=service,
        project_id=project_id, monitor_slug=slug.strip()[:128], status=status,
        received_at=datetime.now(UTC),
        duration=(float(duration) if isinstance(duration, (int, float))
                  and not isinstance(duration, bool) else None),
        environment=_opt(body.get("environment"), 64), config=config)


def _when(value: Any) -> datetime:
    return sentry_envelope._when(value)


def sessions(kind: str, body: dict[str, Any]) -> list[si.SessionCount]:
    """A ``session`` update or a ``sessions`` aggregate as counts; [] without a release."""
    attrs = as_dict(body.get("attrs"))
    release = attrs.get("release")
    if not isinstance(release, str) or not release:
        return []
    env = attrs.get("environment") if isinstance(attrs.get("environment"), str) else "production"
    release, env = release[:128], env[:64]
    if kind == "session":
        sid = body.get("sid")
        if not isinstance(sid, str) or not sid:
            return []
        errors_ = body.get("errors")
        return [si.SessionCount(release=release, environment=env, started=_when(body.get("started")),
                                sid=sid[:64], did=_opt(str(body["did"]), 128) if body.get("did") else None,
                                status=str(body.get("status") or "ok")[:16],
                                errors=errors_ if isinstance(errors_, int) and errors_ >= 0 else 0)]
    out = []
    for agg in (body.get("aggregates") or [])[:1000] if isinstance(body.get("aggregates"), list) else []:
        if not isinstance(agg, dict):
            continue
        counts: dict[str, Any] = {k: v if isinstance(v := agg.get(k), int) and v >= 0 else 0
                                  for k in ("exited", "errored", "abnormal", "crashed")}
        out.append(si.SessionCount(release=release, environment=env, started=_when(agg.get("started")),
                                   **counts))
    return out
