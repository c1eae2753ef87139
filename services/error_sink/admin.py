"""Operator queries on ``admin.errors.<verb>``: list and show groups, resolve or ignore them.

Resolving or ignoring a group also marks its ``error_logs`` rows resolved, so the runbook's
``WHERE resolved = FALSE`` query shows only what still needs attention.
"""

from __future__ import annotations

import uuid

import asyncpg

from boxoffice import db, errors
from boxoffice.bus import Bus
from boxoffice.error_sink import items, source_maps
from boxoffice.wire import errors as w

GROUP_COLUMNS = """id::text, title, service, level, status, fingerprint, first_seen, last_seen,
                   count, resolved_at, regressed_at, last_alerted_at"""
# with each group, its reports in each of the last 24 hours (a sparkline), oldest first
LIST = f"""
SELECT {GROUP_COLUMNS},
       (SELECT array_agg(coalesce(c.n, 0) ORDER BY h.i)
        FROM generate_series(0, 23) AS h(i)
        LEFT JOIN (SELECT 23 - floor(extract(epoch FROM now() - l."timestamp") / 3600)::int AS i,
                          sum(l.occurrences)::int AS n
                   FROM error_logs l
                   WHERE l.group_id = g.id AND l."timestamp" > now() - interval '24 hours'
                   GROUP BY 1) c ON c.i = h.i) AS hourly
FROM error_groups g
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR level = $2)
  AND ($3::text IS NULL OR service = $3) AND ($4::timestamptz IS NULL OR last_seen >= $4)
ORDER BY last_seen DESC LIMIT $5
"""
EVENTS = """
SELECT id::text, "timestamp", received_at, service, function_name, severity, error_message,
       error_type, stacktrace, context, fingerprint, environment, release, request_id,
       occurrences, resolved
FROM error_logs WHERE group_id = $1 ORDER BY "timestamp" DESC LIMIT $2
"""
SET_STATUS = f"""
UPDATE error_groups SET status = $2,
       resolved_at = CASE WHEN $2 = 'resolved' THEN now() ELSE resolved_at END
WHERE id = $1 RETURNING {GROUP_COLUMNS}
"""
SETTLE_ROWS = "UPDATE error_logs SET resolved = TRUE WHERE group_id = $1 AND NOT resolved"

GroupNotFound = errors.define("ErrorGroupNotFound", "error_group_not_found", 404,
                              "No such error group")

_db = db.guard  # PostgreSQL unreachable is a 503 for the operator, not an internal error


def _group(row: asyncpg.Record) -> w.ErrorGroup:
    return w.ErrorGroup(**dict(row))


@_db
async def list_groups(pool: asyncpg.Pool, q: w.ListGroups) -> w.GroupList:
    rows = await pool.fetch(LIST, q.status, q.level, q.service, q.since, q.limit)
    return w.GroupList(groups=[_group(r) for r in rows])


@_db
async def get_group(pool: asyncpg.Pool, q: w.GetGroup) -> w.GroupDetail:
    gid = uuid.UUID(q.group_id)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {GROUP_COLUMNS} FROM error_groups WHERE id = $1", gid)
        if row is None:
            raise GroupNotFound(f"no error group {q.group_id}")
        events = [dict(e) for e in await conn.fetch(EVENTS, gid, q.events)] if q.events else []
        await source_maps.resolve(conn, events)
        feedback, attachments = await items.group_extras(conn, gid)
    return w.GroupDetail(group=_group(row), events=[w.StoredError(**e) for e in events],
                         feedback=feedback, attachments=attachments)


@_db
async def set_status(pool: asyncpg.Pool, group_id: str, status: str) -> w.ErrorGroup:
    gid = uuid.UUID(group_id)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(SET_STATUS, gid, status)
        if row is None:
            raise GroupNotFound(f"no error group {group_id}")
        await conn.execute(SETTLE_ROWS, gid)
    return _group(row)


async def register(bus: Bus, pool: asyncpg.Pool) -> None:
    queue = "error-sink"

    async def resolve(q: w.SetGroupStatus) -> w.ErrorGroup:
        return await set_status(pool, q.group_id, "resolved")

    async def ignore(q: w.SetGroupStatus) -> w.ErrorGroup:
        return await set_status(pool, q.group_id, "ignored")

    await bus.serve(w.GROUPS_LIST, w.ListGroups, lambda q: list_groups(pool, q), queue=queue)
    await bus.serve(w.GROUPS_GET, w.GetGroup, lambda q: get_group(pool, q), queue=queue)
    await bus.serve(w.GROUPS_RESOLVE, w.SetGroupStatus, resolve, queue=queue)
    await bus.serve(w.GROUPS_IGNORE, w.SetGroupStatus, ignore, queue=queue)
