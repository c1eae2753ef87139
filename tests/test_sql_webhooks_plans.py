"""apply_stripe_events reads the rows of a batch by their keys, whatever plan it keeps: a plan
cached while the tables were small must not read a whole table on each batch once it has grown
(webhook_events_log keeps every event for 30 days). Counted with the table statistics of the
batch's own transaction (pg_stat_xact_user_tables)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from tests.sql_support import new_event, new_hold, pi
from tests.test_sql_webhooks_together import APPLY_MANY, SUCCEEDED, columns

WHOLE_SCANS = ("SELECT relname, seq_scan FROM pg_stat_xact_user_tables "
               "WHERE relname = ANY($1) AND seq_scan > 0")
GROWN = ("webhook_events_log", "payments")


async def test_a_batch_reads_no_table_whole(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=40, buckets=4)
    holds = [await new_hold(db, ev, 1) for _ in range(16)]
    created = datetime.now(UTC)
    batches = [[(f"evt_plan_{b}_{n}", SUCCEEDED, pi(), holds[b * 8 + n]) for n in range(8)]
               for b in range(2)]
    async with db.acquire() as conn:
        # the plans a long-lived connection keeps: made once, for any batch
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        async with conn.transaction():
            first = await conn.fetch(APPLY_MANY, *columns(batches[0], created))
        # the log grows (as it does over 30 days) while the connection keeps its plans
        await conn.execute(
            "INSERT INTO webhook_events_log (event_id, event_type, event_created, payload, "
            "processing_status, attempts, processed_at) SELECT 'evt_old_' || g, 'charge.succeeded', "
            "now(), '{}', 'ignored', 1, now() FROM generate_series(1, 20000) g")
        async with conn.transaction():
            second = await conn.fetch(APPLY_MANY, *columns(batches[1], created))
            scans = {r["relname"]: r["seq_scan"] for r in await conn.fetch(WHOLE_SCANS, list(GROWN))}
    assert [r["outcome"] for r in first + second] == ["completed"] * 16
    assert scans == {}
