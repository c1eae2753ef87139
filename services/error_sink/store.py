"""The SQL of one batch: COPY (or staged COPY and de-duplicated insert), group upsert, alert
decisions.

All of it runs in one transaction (``write``'s own, or the caller's with ``write_batch``), so a
batch is stored, counted and alerted on entirely or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import asyncpg
import msgspec

from boxoffice import db
from boxoffice.error_sink import grouping
from boxoffice.error_sink.report_rows import COLUMNS, Row
from boxoffice.wire.errors import LEVELS, Alert

Insert = Literal["copy", "stage", "copy_or_stage"]
LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}
_enc = msgspec.json.Encoder()
_LEVELS_SQL = "ARRAY[" + ",".join(f"'{level}'" for level in LEVELS) + "]"

STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS error_stage (
    id uuid, "timestamp" timestamptz, service text, function_name text, severity text,
    error_message text, error_type text, stacktrace text, context jsonb, fingerprint text[],
    environment text, release text, request_id text, occurrences integer, group_id uuid
) ON COMMIT DELETE ROWS
"""

# Insert what is new; per group, what the new rows add up to.
INSERT = """
WITH ins AS (
    INSERT INTO error_logs (id, "timestamp", service, function_name, severity, error_message,
                            error_type, stacktrace, context, fingerprint, environment, release,
                            request_id, occurrences, group_id)
    SELECT id, "timestamp", service, function_name, severity, error_message, error_type,
           stacktrace, context, fingerprint, environment, release, request_id,
           occurrences, group_id
    FROM error_stage ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING group_id, "timestamp", occurrences, severity
)
SELECT group_id::text AS group_id, count(*) AS new_rows, sum(occurrences)::bigint AS n,
       min("timestamp") AS first_seen,
       max("timestamp") AS last_seen,
       max(array_position(""" + _LEVELS_SQL + """, severity)) AS top
FROM ins GROUP BY group_id
"""

# A new report on a resolved group reopens it (a regression) when it happened after the
# resolution; a late report from before the resolution does not.
UPSERT = """
INSERT INTO error_groups AS g (id, fingerprint_hash, fingerprint, title, service, level,
                               first_seen, last_seen, count, rate_window_start, rate_window_count)
SELECT t.id, t.hash, string_to_array(t.fp, E'\\x1f'), t.title, t.service, t.level,
       t.first_seen, t.last_seen, t.n, now(), t.n
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::timestamptz[], $8::timestamptz[], $9::bigint[])
     AS t(id, hash, fp, title, service, level, first_seen, last_seen, n)
ORDER BY t.id
ON CONFLICT (fingerprint_hash) DO UPDATE SET
    first_seen = least(g.first_seen, excluded.first_seen),
    last_seen = greatest(g.last_seen, excluded.last_seen),
    count = g.count + excluded.count,
    level = CASE WHEN array_position(""" + _LEVELS_SQL + """, excluded.level)
                      > array_position(""" + _LEVELS_SQL + """, g.level)
                 THEN excluded.level ELSE g.level END,
    status = CASE WHEN g.status = 'resolved' AND excluded.last_seen > coalesce(g.resolved_at, '-infinity')
                  THEN 'unresolved' ELSE g.status END,
    regressed_at = CASE WHEN g.status = 'resolved'
                             AND excluded.last_seen > coalesce(g.resolved_at, '-infinity')
                        THEN now() ELSE g.regressed_at END,
    resolved_at = CASE WHEN g.status = 'resolved'
                            AND excluded.last_seen > coalesce(g.resolved_at, '-infinity')
                       THEN NULL ELSE g.resolved_at END,
    rate_window_start = CASE WHEN g.rate_window_start IS NULL
                                  OR g.rate_window_start <= now() - interval '60 seconds'
                             THEN now() ELSE g.rate_window_start END,
    rate_window_count = CASE WHEN g.rate_window_start IS NULL
                                  OR g.rate_window_start <= now() - interval '60 seconds'
                             THEN excluded.count ELSE g.rate_window_count + excluded.count END
RETURNING g.id::text AS id, g.status, g.level, g.title, g.service, g.count, g.first_seen, g.last_seen,
          g.rate_window_count,
          (g.last_alerted_at IS NULL
           OR g.last_alerted_at <= now() - make_interval(secs => $10)) AS may_alert
"""

# Rows of a batch whose group is resolved (late reports) or ignored are stored resolved.
SETTLE = """
UPDATE error_logs SET resolved = TRUE
WHERE id = ANY($1::uuid[]) AND group_id = ANY($2::uuid[]) AND NOT resolved
"""

# At most one alert per group per window, whichever replica gets there first. The upsert's
# ``may_alert`` is this condition as it stands under the row lock the upsert took (held until
# commit), so only groups it allows are claimed, and a batch with none skips the round trip.
CLAIM_ALERTS = """
UPDATE error_groups SET last_alerted_at = now()
WHERE id = ANY($1::uuid[])
  AND (last_alerted_at IS NULL OR last_alerted_at <= now() - make_interval(secs => $2))
RETURNING id::text AS id, last_alerted_at
"""

RECORD_ALERTS = """
INSERT INTO error_alerts (id, group_id, level, reason, payload)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[])
ON CONFLICT (id) DO NOTHING
"""


def _jsonb_encode(value: Any) -> bytes:
    if type(value) is bytes:  # JSON already (a row's context, encoded once by report_rows)
        return b"\x01" + value
    return b"\x01" + _enc.encode(value)


def _jsonb_decode(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


async def binary_json(conn: asyncpg.Connection) -> None:
    """Connection init for the writers: jsonb in binary format, which COPY needs (the shared
    pool's codec is text-only), with the same Python values (dicts) in and out; bytes go in as
    the JSON they hold."""
    for name in ("jsonb",):
        await conn.set_type_codec(name, encoder=_jsonb_encode, decoder=_jsonb_decode,
                                  schema="pg_catalog", format="binary")


@contextlib.asynccontextmanager
async def writer_pool(url: str, size: int) -> AsyncIterator[asyncpg.Pool]:
    """The consumer lanes' own connections (opened lazily, re-opened after an outage)."""
    pool = asyncpg.create_pool(url, min_size=0, max_size=size, init=binary_json,
                               reset=db.reset_nothing,  # (they keep no session state either)
                               command_timeout=30, timeout=5, max_inactive_connection_lifetime=60)
    await pool
    try:
        yield pool
    finally:
        await pool.close()


@dataclasses.dataclass(frozen=True)
class AlertPolicy:
    rate_per_minute: int = 100
    window_seconds: int = 300


@dataclasses.dataclass
class Outcome:
    stored: int = 0
    groups: int = 0
    alerts: int = 0


def _added(rows: list[Row]) -> list[dict[str, Any]]:
    """What ``INSERT`` returns, computed here when every row was new: the rows grouped first,
    then each group's figures by builtins over lists (a dict updated row by row took twice as
    long)."""
    by_group: dict[str, list[Row]] = {}
    for r in rows:
        same = by_group.get(r.group_id)
        if same is None:
            by_group[r.group_id] = same = []
        same.append(r)
    out = []
    for group_id, same in by_group.items():
        seen = [r.timestamp for r in same]
        out.append({"group_id": group_id, "new_rows": len(same),
                    "n": sum([r.occurrences for r in same]),
                    "first_seen": min(seen), "last_seen": max(seen),
                    "top": max([LEVEL_RANK[r.severity] for r in same]) + 1})
    return out


async def _insert(conn: asyncpg.Connection, rows: list[Row], how: Insert) -> list[Any]:
    """COPY straight into error_logs (the common case: every report is new); when one is
    already there (a redelivery), roll that back and go through the staging table, whose
    ``ON CONFLICT DO NOTHING`` skips the known ids. ``how`` says which of the two, or both."""
    records = [r.record for r in rows]
    if how == "copy":
        await conn.copy_records_to_table("error_logs", records=records, columns=COLUMNS)
        return _added(rows)
    if how == "copy_or_stage" and len({r.id for r in rows}) == len(rows):
        try:
            async with conn.transaction():  # a savepoint
                await conn.copy_records_to_table("error_logs", records=records, columns=COLUMNS)
            return _added(rows)
        except asyncpg.UniqueViolationError:
            pass
    await conn.execute(STAGE)
    await conn.copy_records_to_table("error_stage", records=records, columns=COLUMNS)
    return list(await conn.fetch(INSERT))


async def write(pool: asyncpg.Pool, rows: list[Row], policy: AlertPolicy) -> Outcome:
    """Store ``rows`` in a transaction of their own: COPY straight into error_logs, without
    the savepoint ``write_batch`` needs inside a caller's transaction (two round trips fewer a
    batch); when a report is already there (a redelivery), that transaction is rolled back and
    the batch goes through the staging table in another."""
    async with pool.acquire() as conn:
        if len({r.id for r in rows}) == len(rows):
            try:
                async with conn.transaction():
                    return await write_batch(conn, rows, policy, how="copy")
            except asyncpg.UniqueViolationError:
                pass
        async with conn.transaction():
            return await write_batch(conn, rows, policy, how="stage")


async def write_batch(conn: asyncpg.Connection, rows: list[Row], policy: AlertPolicy,
                      how: Insert = "copy_or_stage") -> Outcome:
    """Store ``rows`` in the caller's transaction; returns what was new. With ``how="copy"``
    a report already stored raises ``UniqueViolationError`` and aborts the transaction."""
    added = await _insert(conn, rows, how)
    out = Outcome(stored=sum(a["new_rows"] for a in added))
    if not added:
        return out
    first: dict[str, Row] = {}
    for r in rows:
        first.setdefault(r.group_id, r)
    top = {a["group_id"]: a["top"] for a in added}
    args: list[list[object]] = [[] for _ in range(9)]
    for a in added:
        r = first[a["group_id"]]
        level = LEVELS[a["top"] - 1]
        for col, v in zip(args, (r.group_id, r.fingerprint_hash, "\x1f".join(r.group_fingerprint),
                                 grouping.title(r.error_type, r.error_message), r.service, level,
                                 a["first_seen"], a["last_seen"],
                                 a["n"])):
            col.append(v)
    groups = await conn.fetch(UPSERT, *args, float(policy.window_seconds))
    out.groups = len(groups)
    settled = [g["id"] for g in groups if g["status"] != "unresolved"]
    if settled:
        settled_set = set(settled)
        await conn.execute(SETTLE, [r.id for r in rows if r.group_id in settled_set], settled)
    candidates = {}
    for g in groups:
        if g["status"] != "unresolved" or not g["may_alert"]:  # ignored, or alerted lately
            continue
        rank = top.get(g["id"], 0) - 1
        if rank >= LEVEL_RANK["critical"]:
            candidates[g["id"]] = (g, LEVELS[rank], "level")
        elif g["rate_window_count"] >= policy.rate_per_minute:
            candidates[g["id"]] = (g, g["level"], "rate")
    if candidates:
        claimed = await conn.fetch(CLAIM_ALERTS, sorted(candidates), float(policy.window_seconds))
        out.alerts = len(claimed)
        if claimed:
            await _record(conn, [(candidates[c["id"]], c["last_alerted_at"]) for c in claimed],
                          policy)
    return out


async def _record(conn: asyncpg.Connection, claimed: list[tuple[tuple[asyncpg.Record, str, str],
                                                                 datetime]],
                  policy: AlertPolicy) -> None:
    cols: list[list[object]] = [[] for _ in range(5)]
    for (g, level, reason), at in claimed:
        alert_id = f"{g['id']}:{int(at.timestamp()) // policy.window_seconds}"
        alert = Alert(id=alert_id, group_id=str(g["id"]), level=level, reason=reason,  # type: ignore[arg-type]
                      title=g["title"], service=g["service"], count=g["count"],
                      window_count=g["rate_window_count"], first_seen=g["first_seen"],
                      last_seen=g["last_seen"], alerted_at=at)
        for col, v in zip(cols, (alert_id, g["id"], level, reason,
                                 msgspec.to_builtins(alert))):
            col.append(v)
    await conn.execute(RECORD_ALERTS, *cols)
