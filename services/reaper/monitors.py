"""Cron monitors watched on the reaper's timer: a run that did not check in by its due time plus
the monitor's margin (missed), or that stayed in progress past its maximum runtime (timeout), is
reported as a critical error of the monitor's service, so it is stored, grouped and alerted like
any other (``errors.reaper.critical``; the report names the monitor's service).

Each finding is published before the monitor moves on, under an id derived from the monitor and
the run, so a crash in between or two replicas finding it at once report it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from boxoffice import background, db, schedule, wire
from boxoffice import bus as busmod
from boxoffice.wire.errors import ErrorReport
from boxoffice.wire.subjects import error_report

log = logging.getLogger("boxoffice.reaper.monitors")
_NS = uuid.UUID("3d0c9a4e-8f61-4f0b-9a57-6b1f0c2e7d15")
PERIOD = 1.0

MISSED = """
SELECT service, slug, schedule_type, schedule_value, schedule_unit, timezone, checkin_margin,
       next_expected_at
FROM monitors WHERE next_expected_at + make_interval(mins => checkin_margin) <= now()
ORDER BY next_expected_at LIMIT 100 FOR UPDATE SKIP LOCKED
"""
TIMED_OUT = """
SELECT c.id, c.service, c.slug, c.started_at, m.max_runtime
FROM monitor_checkins c JOIN monitors m USING (service, slug)
WHERE c.status = 'in_progress' AND c.timed_out_at IS NULL
  AND c.started_at + make_interval(mins => m.max_runtime) <= now()
ORDER BY c.started_at LIMIT 100 FOR UPDATE OF c SKIP LOCKED
"""


def _report(kind: str, service: str, slug: str, when: datetime, message: str,
            context: dict) -> ErrorReport:
    return ErrorReport(
        id=str(uuid.uuid5(_NS, f"{service}\x1f{slug}\x1f{kind}\x1f{when.isoformat()}")),
        occurred_at=datetime.now(UTC), service=service, level="critical",
        message=message, error_type=f"Monitor{kind.capitalize()}",
        fingerprint=["monitor", slug, kind], context={"monitor": {"slug": slug, **context}})


async def _publish(bus: busmod.Bus, report: ErrorReport) -> None:
    await bus.publish(error_report("reaper", "critical"), wire.encode(report), report.id)


def _next_after(m: asyncpg.Record, after: datetime, now: datetime) -> datetime | None:
    value: str | int = int(m["schedule_value"]) if m["schedule_type"] == "interval" else m["schedule_value"]
    margin = timedelta(minutes=m["checkin_margin"])
    try:
        due = schedule.next_run(m["schedule_type"], value, m["schedule_unit"], after, m["timezone"])
        for _ in range(10_000):  # runs missed while nobody watched are one finding
            if due + margin > now:
                return due
            due = schedule.next_run(m["schedule_type"], value, m["schedule_unit"], due, m["timezone"])
    except schedule.InvalidSchedule:
        pass
    return None


async def sweep(pool: asyncpg.Pool, bus: busmod.Bus) -> int:
    """Report what is overdue now; how many findings."""
    found = 0
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        for m in await conn.fetch(MISSED):
            expected = m["next_expected_at"]
            await _publish(bus, _report(
                "missed", m["service"], m["slug"], expected,
                f"Monitor {m['slug']} missed its check-in due at {expected.isoformat()}",
                {"expected_at": expected.isoformat(), "checkin_margin": m["checkin_margin"]}))
            await conn.execute("UPDATE monitors SET status = 'missed', next_expected_at = $3 "
                               "WHERE service = $1 AND slug = $2", m["service"], m["slug"],
                               _next_after(m, expected, now))
            found += 1
        for c in await conn.fetch(TIMED_OUT):
            await _publish(bus, _report(
                "timeout", c["service"], c["slug"], c["started_at"],
                f"Monitor {c['slug']} ran longer than {c['max_runtime']} minutes "
                f"(started {c['started_at'].isoformat()})",
                {"check_in_id": str(c["id"]), "started_at": c["started_at"].isoformat(),
                 "max_runtime": c["max_runtime"]}))
            await conn.execute("UPDATE monitor_checkins SET timed_out_at = now() WHERE id = $1", c["id"])
            await conn.execute("UPDATE monitors SET status = 'timeout' WHERE service = $1 AND slug = $2",
                               c["service"], c["slug"])
            found += 1
    return found


@contextlib.asynccontextmanager
async def watching(pool: asyncpg.Pool, bus: busmod.Bus, period: float = PERIOD) -> AsyncIterator[None]:
    async def once() -> None:
        try:
            await sweep(pool, bus)
        except db.FAILURES as exc:
            log.warning("monitors not checked: PostgreSQL (%s)", type(exc).__name__)
        except Exception:  # the bus may be away; the next sweep tries again
            log.warning("monitors not checked", exc_info=True)

    async def loop(stopping: asyncio.Event) -> None:
        await background.repeat("monitors", once, stopping, every=period, first_wait=False,
                                logger=log)

    async with background.running("monitors", loop, grace=15):
        yield
