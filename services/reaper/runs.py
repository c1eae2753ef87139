"""``reaper_runs``: what each run did, like pg_cron's ``job_run_details``.

The expiry timer wakes for every hold, so a row per wake-up would be thousands of rows an hour
that say nothing. ``ExpiryLog`` folds the sweeps of one replica into one row per burst of work
(closed when the reaper goes idle or after ``WINDOW`` seconds) and one row per outage (its
first and last failure, how many attempts failed). Sweeps that found nothing write nothing; the
``boxoffice_reaper_last_sweep_timestamp_seconds`` metric shows the timer is alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from boxoffice.wire import reaper as wire

WINDOW = 10.0  # seconds of continuous work folded into one row


def utcnow() -> datetime:
    return datetime.now(UTC)


def describe(exc: BaseException) -> str:
    """An error as a run records it: the class and its message, bounded."""
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:500]


@dataclass
class Run:
    kind: str
    started_at: datetime
    finished_at: datetime
    expired: int = 0
    purged: dict[str, int] | None = None
    error: str | None = None
    failures: int = 0


async def insert(conn: asyncpg.Connection, replica: str, run: Run) -> int:
    error = run.error
    if error is not None and run.failures > 1:
        error = f"{error} (failed {run.failures} times)"
    return await conn.fetchval(
        "INSERT INTO reaper_runs (kind, replica, started_at, finished_at, expired, purged, error) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        run.kind, replica, run.started_at, run.finished_at, run.expired, run.purged, error)


class ExpiryLog:
    """Pending ``reaper_runs`` rows of the expiry timer, written when the database answers."""

    def __init__(self, replica: str, window: float = WINDOW):
        self.replica = replica
        self.window = window
        self.work: Run | None = None
        self.outage: Run | None = None

    def worked(self, started: datetime, finished: datetime, expired: int) -> None:
        if self.work is None:
            self.work = Run("expiry", started, finished)
        self.work.finished_at = finished
        self.work.expired += expired

    def failed(self, started: datetime, finished: datetime, exc: BaseException) -> bool:
        """Note a failed sweep; returns True when it starts a new outage (worth a log line)."""
        new = self.outage is None
        if self.outage is None:
            self.outage = Run("expiry", started, finished, error=describe(exc))
        self.outage.finished_at = finished
        self.outage.failures += 1
        return new

    async def flush(self, conn: asyncpg.Connection, *, idle: bool) -> None:
        """Write the outage (now over) and, when idle or the window is full, the work done."""
        if self.outage is not None:
            await insert(conn, self.replica, self.outage)
            self.outage = None
        if self.work is not None and (
                idle or (self.work.finished_at - self.work.started_at).total_seconds() >= self.window):
            await insert(conn, self.replica, self.work)
            self.work = None


async def recent(pool: asyncpg.Pool, req: wire.RunsRequest) -> list[wire.ReaperRun]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, kind, replica, started_at, finished_at, expired, purged, error "
            "FROM reaper_runs WHERE ($1::text IS NULL OR kind = $1) "
            "AND (NOT $2 OR error IS NOT NULL) ORDER BY started_at DESC, id DESC LIMIT $3",
            req.kind, req.errors, req.limit)
    return [wire.ReaperRun(id=r["id"], kind=r["kind"], replica=r["replica"],
                           started_at=r["started_at"], finished_at=r["finished_at"],
                           expired=r["expired"], purged=r["purged"], error=r["error"])
            for r in rows]


async def expiry_lag(pool: asyncpg.Pool, minutes: int) -> wire.ExpiryLag:
    """How long past ``expires_at`` the holds expired in each of the last ``minutes`` minutes
    were released (by the reaper, or by a manual run)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT date_trunc('minute', released_at) AS minute, count(*) AS holds, "
            "max(extract(epoch FROM released_at - expires_at))::float8 AS max_seconds, "
            "avg(extract(epoch FROM released_at - expires_at))::float8 AS avg_seconds "
            "FROM reservations WHERE status = 'expired' "
            "AND released_at >= clock_timestamp() - make_interval(mins => $1) "
            "GROUP BY 1 ORDER BY 1", minutes)
    return wire.ExpiryLag(minutes=minutes, points=[
        wire.LagPoint(minute=r["minute"], holds=r["holds"], max_seconds=max(0.0, r["max_seconds"]),
                      avg_seconds=max(0.0, r["avg_seconds"]))
        for r in rows])
