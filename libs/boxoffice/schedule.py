"""Cron monitors' schedules: when the next run is due.

A schedule is Sentry's ``monitor_config.schedule``: ``{"type": "crontab", "value": "*/5 * * * *"}``
(five fields: minute, hour, day of month, month, day of week; ``*``, lists, ranges, steps,
``@hourly``-style aliases) or ``{"type": "interval", "value": 2, "unit": "hour"}``, read in the
monitor's ``timezone`` (default UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
            "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
            "@hourly": "0 * * * *"}
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_UNITS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1),
          "week": timedelta(weeks=1), "month": timedelta(days=30), "year": timedelta(days=365)}


class InvalidSchedule(ValueError):
    pass


def _field(text: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-", 1))
        else:
            a = b = int(rng)
            if step_text:
                b = hi
        if step < 1 or a < lo or b > hi or a > b:
            raise InvalidSchedule(f"{part!r} is out of {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


def parse_crontab(expr: str) -> tuple[frozenset[int], ...]:
    fields = _ALIASES.get(expr.strip(), expr).split()
    if len(fields) != 5:
        raise InvalidSchedule("a crontab has five fields")
    try:
        parsed = tuple(_field(f, lo, hi) for f, (lo, hi) in zip(fields, _BOUNDS))
    except ValueError as exc:
        raise InvalidSchedule(str(exc)) from None
    dow = parsed[4]
    return (*parsed[:4], frozenset(d % 7 for d in dow))


def _zone(name: str | None) -> ZoneInfo | timezone:
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(f"unknown time zone {name!r}") from None


def next_run(kind: str, value: str | int, unit: str | None, after: datetime,
             tz: str | None = None) -> datetime:
    """The first run strictly after ``after`` (UTC)."""
    if kind == "interval":
        if unit not in _UNITS or not isinstance(value, int) or value < 1:
            raise InvalidSchedule("an interval is a positive integer of minute|hour|day|week|month|year")
        return after + value * _UNITS[unit]
    if kind != "crontab" or not isinstance(value, str):
        raise InvalidSchedule("a schedule is crontab or interval")
    minutes, hours, days, months, dows = parse_crontab(value)
    local = after.astimezone(_zone(tz)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day_any, dow_any = value.split()[2:3] == ["*"], value.split()[4:5] == ["*"]
    for _ in range(600_000):
        if local.month not in months:
            local = (local.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            continue
        dom_ok, dow_ok = local.day in days, (local.isoweekday() % 7) in dows
        # cron: when both day fields are restricted, either matching is enough
        day_ok = dom_ok and dow_ok if day_any or dow_any else dom_ok or dow_ok
        if not day_ok:
            local = local.replace(hour=0, minute=0) + timedelta(days=1)
            continue
        if local.hour not in hours:
            local = local.replace(minute=0) + timedelta(hours=1)
            continue
        if local.minute not in minutes:
            local += timedelta(minutes=1)
            continue
        return local.astimezone(UTC)
    raise InvalidSchedule("the schedule never runs")
