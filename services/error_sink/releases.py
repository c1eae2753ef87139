"""Release health from SDKs' sessions: each session by its id in its most telling state (a
crash outranks an error, which outranks a clean exit), aggregated buckets as they come; per
release and environment, sessions and the share of them (and of users) that did not crash."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from boxoffice.wire import sentry_items as si

_RANK = "CASE {} WHEN 'crashed' THEN 4 WHEN 'abnormal' THEN 3 WHEN 'errored' THEN 2 " \
        "WHEN 'exited' THEN 1 ELSE 0 END"
UPSERT_SESSION = f"""
INSERT INTO release_sessions AS s (service, sid, release, environment, did, started, status, errors)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (service, sid) DO UPDATE SET
    status = CASE WHEN {_RANK.format('excluded.status')} >= {_RANK.format('s.status')}
                  THEN excluded.status ELSE s.status END,
    errors = greatest(s.errors, excluded.errors),
    did = coalesce(s.did, excluded.did),
    updated_at = now()
"""
INSERT_BUCKET = """
INSERT INTO release_session_buckets (message_id, idx, service, release, environment, started,
                                     exited, errored, abnormal, crashed)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING
"""
RELEASES = """
WITH single AS (
    SELECT service, release, environment, count(*) AS sessions,
           count(*) FILTER (WHERE status = 'crashed') AS crashed,
           count(*) FILTER (WHERE status = 'abnormal') AS abnormal,
           count(*) FILTER (WHERE status = 'errored'
                            OR (errors > 0 AND status NOT IN ('crashed', 'abnormal'))) AS errored,
           count(DISTINCT did) AS users,
           count(DISTINCT did) FILTER (WHERE status = 'crashed') AS crashed_users
    FROM release_sessions WHERE started >= $1 AND ($2::text IS NULL OR service = $2)
    GROUP BY 1, 2, 3
), buckets AS (
    SELECT service, release, environment, sum(exited + errored + abnormal + crashed) AS sessions,
           sum(crashed) AS crashed, sum(abnormal) AS abnormal, sum(errored) AS errored
    FROM release_session_buckets WHERE started >= $1 AND ($2::text IS NULL OR service = $2)
    GROUP BY 1, 2, 3
)
SELECT service, release, environment,
       (coalesce(s.sessions, 0) + coalesce(b.sessions, 0))::bigint AS sessions,
       (coalesce(s.crashed, 0) + coalesce(b.crashed, 0))::bigint AS crashed,
       (coalesce(s.errored, 0) + coalesce(b.errored, 0))::bigint AS errored,
       (coalesce(s.abnormal, 0) + coalesce(b.abnormal, 0))::bigint AS abnormal,
       coalesce(s.users, 0)::bigint AS users, coalesce(s.crashed_users, 0)::bigint AS crashed_users
FROM single s FULL JOIN buckets b USING (service, release, environment)
ORDER BY service, release, environment LIMIT 1000
"""


async def store(conn: asyncpg.Connection, msg_id: str, s: si.Sessions) -> None:
    singles = [c for c in s.sessions if c.sid]
    if singles:
        await conn.executemany(UPSERT_SESSION, [
            (s.service, c.sid, c.release, c.environment, c.did, c.started, c.status, c.errors)
            for c in singles])
    buckets = [(uuid.UUID(msg_id), i, s.service, c.release, c.environment, c.started, c.exited,
                c.errored, c.abnormal, c.crashed) for i, c in enumerate(s.sessions) if not c.sid]
    if buckets:
        await conn.executemany(INSERT_BUCKET, buckets)


def _rate(bad: int, total: int) -> float | None:
    return round(1 - bad / total, 6) if total else None


async def listing(pool: asyncpg.Pool, q: si.ListReleases) -> si.ReleaseList:
    since: datetime = q.since or datetime.now(UTC) - timedelta(days=30)
    rows = await pool.fetch(RELEASES, since, q.service)
    return si.ReleaseList(releases=[si.Release(
        service=r["service"], release=r["release"], environment=r["environment"],
        sessions=r["sessions"], crashed=r["crashed"], errored=r["errored"], abnormal=r["abnormal"],
        crash_free_rate=_rate(r["crashed"], r["sessions"]), users=r["users"],
        crash_free_users_rate=_rate(r["crashed_users"], r["users"])) for r in rows])
