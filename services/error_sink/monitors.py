"""Cron monitors: a check-in creates or updates its monitor (from ``monitor_config``), records
the run, and sets when the next run is due. The reaper's timer reports the runs that never
came or never finished (``boxoffice.reaper.monitors``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from boxoffice import errors, schedule
from boxoffice.wire import sentry_items as si

DEFAULT_MARGIN, DEFAULT_MAX_RUNTIME = 1, 30  # minutes, as Sentry

UPSERT_MONITOR = """
INSERT INTO monitors AS m (service, slug, project_id, schedule_type, schedule_value, schedule_unit,
                           checkin_margin, max_runtime, timezone)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (service, slug) DO UPDATE SET
    project_id = excluded.project_id, schedule_type = excluded.schedule_type,
    schedule_value = excluded.schedule_value, schedule_unit = excluded.schedule_unit,
    checkin_margin = excluded.checkin_margin, max_runtime = excluded.max_runtime,
    timezone = excluded.timezone
"""
UPSERT_CHECKIN = """
INSERT INTO monitor_checkins AS c (id, service, slug, status, started_at, updated_at, duration,
                                   environment)
VALUES ($1, $2, $3, $4, $5, $5, $6, $7)
ON CONFLICT (id) DO UPDATE SET
    status = CASE WHEN c.status = 'in_progress' THEN excluded.status ELSE c.status END,
    updated_at = greatest(c.updated_at, excluded.updated_at),
    duration = coalesce(excluded.duration, c.duration),
    environment = coalesce(c.environment, excluded.environment)
RETURNING started_at
"""
SET_STATE = """
UPDATE monitors SET status = $3, last_checkin_at = $4, last_checkin_status = $5,
       last_duration = coalesce($6, last_duration), next_expected_at = $7
WHERE service = $1 AND slug = $2
"""


async def store(conn: asyncpg.Connection, c: si.CheckIn) -> None:
    if c.config is not None:
        cfg = c.config
        await conn.execute(UPSERT_MONITOR, c.service, c.monitor_slug, c.project_id,
                           cfg.schedule_type, cfg.schedule_value, cfg.schedule_unit,
                           DEFAULT_MARGIN if cfg.checkin_margin is None else cfg.checkin_margin,
                           DEFAULT_MAX_RUNTIME if cfg.max_runtime is None else max(1, cfg.max_runtime),
                           cfg.timezone)
    monitor = await conn.fetchrow(
        "SELECT schedule_type, schedule_value, schedule_unit, timezone, last_checkin_at "
        "FROM monitors WHERE service = $1 AND slug = $2 FOR UPDATE", c.service, c.monitor_slug)
    await conn.execute(UPSERT_CHECKIN, uuid.UUID(c.id), c.service, c.monitor_slug, c.status,
                       c.received_at, c.duration, c.environment)
    if monitor is None:  # a check-in for a monitor nobody configured: the run is kept
        return
    if monitor["last_checkin_at"] and monitor["last_checkin_at"] > c.received_at:
        return  # a late redelivery does not move the schedule back
    value: str | int = monitor["schedule_value"]
    if monitor["schedule_type"] == "interval":
        value = int(value)
    try:
        due: datetime | None = schedule.next_run(monitor["schedule_type"], value,
                                                 monitor["schedule_unit"], c.received_at,
                                                 monitor["timezone"])
    except schedule.InvalidSchedule:
        due = None
    await conn.execute(SET_STATE, c.service, c.monitor_slug, c.status, c.received_at, c.status,
                       c.duration, due)


MONITOR_COLUMNS = """service, slug, schedule_type, schedule_value, schedule_unit, checkin_margin,
    max_runtime, timezone, status, last_checkin_at, last_checkin_status, next_expected_at,
    last_duration"""


async def listing(pool: asyncpg.Pool, q: si.ListMonitors) -> si.MonitorList:
    rows = await pool.fetch(
        f"SELECT {MONITOR_COLUMNS} FROM monitors WHERE $1::text IS NULL OR service = $1 "
        "ORDER BY service, slug LIMIT 1000", q.service)
    return si.MonitorList(monitors=[si.Monitor(**dict(r)) for r in rows])


InvalidMonitor = errors.define("InvalidMonitor", "invalid_monitor", 422, "Invalid monitor schedule")


async def set_monitor(pool: asyncpg.Pool, m: si.SetMonitor) -> si.Monitor:
    """Create or change a monitor; its next run is due from now."""
    value: str | int = m.schedule_value
    try:
        if m.schedule_type == "interval":
            value = int(m.schedule_value)
        due = schedule.next_run(m.schedule_type, value, m.schedule_unit,
                                datetime.now(UTC), m.timezone)
    except (ValueError, schedule.InvalidSchedule) as exc:
        raise InvalidMonitor(str(exc)) from None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(UPSERT_MONITOR, m.service, m.slug, "operator", m.schedule_type,
                           m.schedule_value, m.schedule_unit, m.checkin_margin, m.max_runtime,
                           m.timezone)
        await conn.execute("UPDATE monitors SET next_expected_at = $3 WHERE service = $1 AND slug = $2",
                           m.service, m.slug, due)
        row = await conn.fetchrow(f"SELECT {MONITOR_COLUMNS} FROM monitors WHERE service = $1 AND slug = $2",
                                  m.service, m.slug)
    return si.Monitor(**dict(row))
