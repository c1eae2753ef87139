"""The self-audit: checks that state whether boxoffice's promises hold right now, and where not.

Tests show the promises hold on the paths they try; production also has SQL typed by hand,
restores from backup, refunds made in Stripe's dashboard and bugs not yet found. A ``Check``
examines what it owns (the database, the bus, Stripe) and returns the ``Violation``s it found:
what does not hold (``kind``), about what (``subject`` and its ids), what was expected and what
was found. An ``Auditor`` runs a service's checks on a timer and on demand:

- One run of a check at a time across replicas: a PostgreSQL advisory lock per check, held on a
  connection of the run; a replica that dies mid-run releases it with its connection.
- A run is incremental, from the check's checkpoint (``audit_checks.checkpoint``), so it costs
  what changed since the last run; it is full on demand, for a check without a checkpoint, and
  once every ``FULL_EVERY``: incremental runs see what boxoffice's own paths change, the daily
  full pass also what was changed behind their back.
- Every open finding is handed back to its check, which examines its subject again whatever
  the checkpoint says: a run resolves exactly what it no longer finds.
- A new violation is written to ``audit_findings`` and logged as critical, so the process's
  reporter sends it to the error-sink, which groups and alerts on it like any other error;
  ``boxoffice_audit_violations{check}`` is the number of open findings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import asyncpg
import prometheus_client

from boxoffice import background, db, errors
from boxoffice.wire import audit as wire

log = logging.getLogger("boxoffice.audit")

REPLICA = f"{socket.gethostname()}:{os.getpid()}"
FULL_EVERY = timedelta(hours=24)  # a full pass at least this often, whatever runs on demand
MAX_NEW = 500        # new findings recorded per check and run (a flood is summed up, not listed)
MAX_LOGGED = 20      # new findings logged one by one per check and run; the rest in one line
LOCK_WAIT = 0.25     # seconds between attempts at a check's lock when a run is asked for
REPORT_AFTER = 3     # runs of a check failed in a row before it is logged as an error
ANSWER_FINDINGS = 1000

VIOLATIONS = prometheus_client.Gauge("boxoffice_audit_violations",
                                     "Open findings of the self-audit, by check", ["check"])
RUNS = prometheus_client.Counter("boxoffice_audit_runs_total", "Runs of the self-audit's checks",
                                 ["check", "mode", "outcome"])
LAST_RUN = prometheus_client.Gauge("boxoffice_audit_last_run_timestamp_seconds",
                                   "When a check last finished a run without error", ["check"])

Checkpoint = dict[str, Any]

AuditBusy = errors.define("AuditBusy", "audit_busy", 504,
                          "Another run of the audit did not end in time")


@dataclass(frozen=True)
class Violation:
    """What does not hold (``kind``) about what (``subject``: a stable key; ``ids``: the ids a
    check needs to look at it again), with what was expected and what was found."""

    kind: str
    subject: str
    ids: dict[str, Any]
    expected: str
    found: str


@dataclass
class Examination:
    """What a check saw: its violations, how many things it examined, how many differences it
    let pass as in flight, and the checkpoint its next incremental run starts from."""

    violations: list[Violation] = field(default_factory=list)
    examined: int = 0
    in_flight: int = 0
    checkpoint: Checkpoint | None = None


class Check(Protocol):
    name: str

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        """Examine what changed since ``since`` (everything when None) and the subjects of the
        open findings (``reopen``: their ids). Raises when it cannot examine (the run fails)."""
        ...


def lock_key(check: str) -> int:
    """The advisory lock of a check: one run at a time across replicas and services."""
    return zlib.crc32(f"boxoffice.audit.{check}".encode())


class Auditor:
    """Runs ``checks`` (each on its own lock) on a timer and on demand, and records the result."""

    def __init__(self, pool: asyncpg.Pool, checks: Sequence[Check], *, interval: float,
                 replica: str = REPLICA):
        self.pool = pool
        self.checks = list(checks)
        self.interval = interval
        self.replica = replica
        self.stopping = asyncio.Event()
        self.failures: dict[str, int] = {}  # runs failed in a row, by check

    async def run(self, full: bool, timeout: float = 600.0) -> wire.Invariants:
        """Run every check now (waiting for a run in progress elsewhere to end first)."""
        done = [await self.run_check(c, full=full, wait_until=time.monotonic() + timeout)
                for c in self.checks]
        return await invariants(self.pool, [r.check for r in done if r is not None],
                                ANSWER_FINDINGS, runs=[r for r in done if r is not None])

    async def tick(self) -> None:
        """The timer's work: run each check that is due and not running elsewhere."""
        for check in self.checks:
            if self.stopping.is_set():
                return
            await self.run_check(check, full=False, wait_until=None)
        await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        """Every replica shows the open findings, whichever replica ran the check."""
        with contextlib.suppress(*db.FAILURES):
            rows = await self.pool.fetch(
                "SELECT c.check_name, count(f.id) AS n FROM audit_checks c "
                "LEFT JOIN audit_findings f "
                "       ON f.check_name = c.check_name AND f.resolved_at IS NULL "
                "WHERE c.check_name = ANY($1) GROUP BY c.check_name",
                [c.name for c in self.checks])
            for r in rows:
                VIOLATIONS.labels(r["check_name"]).set(r["n"])

    async def run_check(self, check: Check, *, full: bool,
                        wait_until: float | None) -> wire.CheckRun | None:
        """One run of ``check``; None when the timer finds it not due or running elsewhere.
        With ``wait_until`` (a run asked for) it waits for the lock and always runs."""
        key = lock_key(check.name)
        async with self.pool.acquire() as conn:
            if not await _lock(conn, key, wait_until):
                return None
            try:
                return await self._locked_run(conn, check, full=full, asked=wait_until is not None)
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                except BaseException as exc:
                    # a pooled connection keeps no session state (db.reset_nothing): one that may still
                    # hold the lock is closed, which releases it, rather than given back
                    conn.terminate()
                    if not isinstance(exc, db.FAILURES):
                        raise

    async def _locked_run(self, conn: asyncpg.Connection, check: Check, *, full: bool,
                          asked: bool) -> wire.CheckRun | None:
        state = await conn.fetchrow(_START, check.name, self.replica, asked, self.interval * 0.9,
                                    FULL_EVERY)
        if state is None:
            return None  # another replica ran it less than an interval ago
        full = full or state["checkpoint"] is None or state["full_due"]
        mode = "full" if full else "incremental"
        open_rows = await conn.fetch(
            "SELECT kind, subject, subject_ids FROM audit_findings "
            "WHERE check_name = $1 AND resolved_at IS NULL", check.name)
        started = time.monotonic()
        try:
            exam = await check.examine(None if full else state["checkpoint"],
                                       [r["subject_ids"] for r in open_rows])
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is recorded, not fatal
            error = _describe(exc)
            RUNS.labels(check.name, mode, "error").inc()
            failed = self.failures[check.name] = self.failures.get(check.name, 0) + 1
            # once is an outage of a moment; several in a row, the audit has gone blind
            log.log(logging.ERROR if failed == REPORT_AFTER else logging.WARNING,
                    "audit: check %s could not run (%d in a row): %s", check.name, failed, error,
                    extra={"audit_check": check.name})
            row = await conn.fetchrow(
                "UPDATE audit_checks SET finished_at = clock_timestamp(), mode = $2, error = $3, "
                "seconds = $4 WHERE check_name = $1 RETURNING *",
                check.name, mode, error, time.monotonic() - started)
            return _check_run(row, examined=0, in_flight=0, new=0, resolved=0)
        seconds = time.monotonic() - started
        self.failures[check.name] = 0
        known = {(r["kind"], r["subject"]) for r in open_rows}
        kept, dropped = _bounded(exam.violations, known)
        async with conn.transaction():
            new, resolved = await _record(conn, check.name, kept)
            row = await conn.fetchrow(
                "UPDATE audit_checks SET finished_at = clock_timestamp(), mode = $2, error = NULL, "
                "checkpoint = $3, examined = $4, in_flight = $5, violations = $6, "
                "new_violations = $7, resolved = $8, seconds = $9, "
                "last_full_at = CASE WHEN $2 = 'full' THEN started_at ELSE last_full_at END "
                "WHERE check_name = $1 RETURNING *",
                check.name, mode, exam.checkpoint, exam.examined, exam.in_flight, len(kept),
                len(new), resolved, seconds)
        RUNS.labels(check.name, mode, "ok").inc()
        LAST_RUN.labels(check.name).set_to_current_time()
        VIOLATIONS.labels(check.name).set(len(kept))
        _report(check.name, new, dropped)
        if resolved:
            log.info("audit: %d finding(s) of %s resolved", resolved, check.name,
                     extra={"audit_check": check.name})
        return _check_run(row, examined=exam.examined, in_flight=exam.in_flight, new=len(new),
                          resolved=resolved)

    async def loop(self, stopping: asyncio.Event) -> None:
        """Until stopped: wait an interval, run what is due. Nothing that fails ends the loop."""
        await background.repeat("audit", self.tick, stopping, every=self.interval, logger=log)


@contextlib.asynccontextmanager
async def running(auditor: Auditor) -> AsyncIterator[Auditor]:
    """Audit in the background; on exit, stop between checks (a check in hand may finish)."""
    async with background.running("audit", auditor.loop, grace=10, stopping=auditor.stopping):
        yield auditor


async def _lock(conn: asyncpg.Connection, key: int, wait_until: float | None) -> bool:
    while True:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return True
        if wait_until is None:
            return False
        if time.monotonic() > wait_until:
            raise AuditBusy("another run of this check did not end in time")
        await asyncio.sleep(LOCK_WAIT)


def _bounded(found: list[Violation], known: set[tuple[str, str]]
             ) -> tuple[list[Violation], int]:
    """Each subject once; every already open finding kept, at most ``MAX_NEW`` new ones (a run
    that finds ten thousand broken holds records the first ones and says how many it left)."""
    kept: dict[tuple[str, str], Violation] = {}
    new = 0
    dropped = 0
    for v in found:
        k = (v.kind, v.subject)
        if k in kept:
            continue
        if k not in known:
            if new >= MAX_NEW:
                dropped += 1
                continue
            new += 1
        kept[k] = v
    return list(kept.values()), dropped


# A run starts: unless it was asked for, only if no replica finished one less than about an
# interval ago. Whether a full pass is due comes back with the checkpoint.
_START = """
UPDATE audit_checks SET started_at = clock_timestamp(), replica = $2
WHERE check_name = $1
  AND ($3 OR finished_at IS NULL OR finished_at < clock_timestamp() - make_interval(secs => $4))
RETURNING checkpoint, last_full_at, started_at,
          last_full_at IS NULL OR last_full_at < clock_timestamp() - $5::interval AS full_due
"""

_RECORD = """
WITH v AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[], $6::text[])
             AS v(kind, subject, ids, expected, found)
), seen AS (
    UPDATE audit_findings f
    SET last_seen = clock_timestamp(), seen = f.seen + 1, subject_ids = v.ids,
        expected = v.expected, found = v.found
    FROM v
    WHERE f.check_name = $1 AND f.resolved_at IS NULL AND f.kind = v.kind AND f.subject = v.subject
    RETURNING f.id
), added AS (
    INSERT INTO audit_findings (check_name, kind, subject, subject_ids, expected, found)
    SELECT $1, v.kind, v.subject, v.ids, v.expected, v.found FROM v
    WHERE NOT EXISTS (SELECT 1 FROM audit_findings f
                      WHERE f.check_name = $1 AND f.resolved_at IS NULL
                        AND f.kind = v.kind AND f.subject = v.subject)
    RETURNING id, kind, subject, subject_ids, expected, found
), gone AS (
    UPDATE audit_findings f SET resolved_at = clock_timestamp()
    WHERE f.check_name = $1 AND f.resolved_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM v WHERE v.kind = f.kind AND v.subject = f.subject)
    RETURNING f.id
)
SELECT 'added' AS what, id, kind, subject, subject_ids, expected, found FROM added
UNION ALL
SELECT 'gone', id, NULL, NULL, NULL, NULL, NULL FROM gone
"""


async def _record(conn: asyncpg.Connection, check: str, kept: list[Violation]
                  ) -> tuple[list[asyncpg.Record], int]:
    """Open findings become ``kept``: seen again, added, or resolved. Returns the added rows and
    how many were resolved."""
    rows = await conn.fetch(_RECORD, check, [v.kind for v in kept], [v.subject for v in kept],
                            [v.ids for v in kept], [v.expected for v in kept],
                            [v.found for v in kept])
    return [r for r in rows if r["what"] == "added"], sum(r["what"] == "gone" for r in rows)


def _report(check: str, new: list[asyncpg.Record], dropped: int) -> None:
    """Each new violation as a critical error: grouped (ids and numbers are stripped from the
    message for grouping, so one group per kind) and alerted by the error-sink."""
    for r in new[:MAX_LOGGED]:
        log.critical("audit: %s.%s does not hold for %s: expected %s, found %s", check,
                     r["kind"], r["subject"], r["expected"], r["found"],
                     extra={"audit_check": check, "audit_kind": r["kind"], "finding_id": r["id"],
                            "subject_ids": r["subject_ids"]})
    more = len(new) - MAX_LOGGED + dropped
    if more > 0:
        log.critical("audit: %d more new violations of %s (GET /v1/admin/invariants lists them)",
                     more, check, extra={"audit_check": check, "not_recorded": dropped})


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:500]


def _check_run(row: asyncpg.Record, *, examined: int, in_flight: int, new: int,
               resolved: int) -> wire.CheckRun:
    return wire.CheckRun(check=row["check_name"], mode=row["mode"], started_at=row["started_at"],
                         finished_at=row["finished_at"], examined=examined, in_flight=in_flight,
                         violations=row["violations"], new=new, resolved=resolved,
                         seconds=row["seconds"], error=row["error"],
                         last_full_at=row["last_full_at"])


async def invariants(pool: asyncpg.Pool, checks: Sequence[str], limit: int,
                     runs: Sequence[wire.CheckRun] | None = None) -> wire.Invariants:
    """The last run of each of ``checks`` (or ``runs``, just made) and their open findings."""
    async with pool.acquire() as conn:
        states = await conn.fetch("SELECT * FROM audit_checks WHERE check_name = ANY($1) "
                                  "ORDER BY array_position($1, check_name)", list(checks))
        rows = await conn.fetch(
            "SELECT * FROM audit_findings WHERE check_name = ANY($1) AND resolved_at IS NULL "
            "ORDER BY first_seen, id LIMIT $2", list(checks), limit)
        total = await conn.fetchval("SELECT count(*) FROM audit_findings "
                                    "WHERE check_name = ANY($1) AND resolved_at IS NULL",
                                    list(checks))
    if runs is None:
        runs = [_check_run(s, examined=s["examined"], in_flight=s["in_flight"],
                           new=s["new_violations"], resolved=s["resolved"]) for s in states]
    holds = (total == 0 and len(runs) == len(checks)
             and all(r.finished_at is not None and r.error is None for r in runs))
    return wire.Invariants(holds=holds, checks=list(runs), findings=[
        wire.Finding(id=r["id"], check=r["check_name"], kind=r["kind"], subject=r["subject"],
                     ids=r["subject_ids"], expected=r["expected"], found=r["found"],
                     first_seen=r["first_seen"], last_seen=r["last_seen"],
                     resolved_at=r["resolved_at"]) for r in rows])
