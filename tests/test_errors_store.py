"""The error-sink's batch SQL against a real PostgreSQL: a group alerts once per window (the
claim is skipped when the upsert says the window is not over), a writer connection given back
inside a transaction is rolled back before the next batch gets it, and a redelivered batch
(whose COPY without a savepoint fails) is stored once through the staging table."""

from __future__ import annotations

import json
from types import SimpleNamespace

from boxoffice import wire
from boxoffice.error_sink import store
from boxoffice.error_sink.report_rows import Row, prepare
from tests.errors_support import report

POLICY = store.AlertPolicy(rate_per_minute=1000, window_seconds=300)


def _rows(*bodies: dict) -> list[Row]:
    return [prepare(SimpleNamespace(subject="errors.payment.critical", data=json.dumps(b).encode(),
                                    headers=None), wire.now()) for b in bodies]


async def _batch(pool, *bodies: dict) -> store.Outcome:
    async with pool.acquire() as conn, conn.transaction():
        return await store.write_batch(conn, _rows(*bodies), POLICY)


async def test_a_group_alerts_once_per_window(db, database_url) -> None:
    crit = {"level": "critical", "error_type": "LedgerCorrupt", "message": "ledger off"}
    async with store.writer_pool(database_url, 1) as pool:
        assert (await _batch(pool, report(1, **crit))).alerts == 1
        # within the window: stored and counted, no second alert
        out = await _batch(pool, report(2, **crit), report(3, **crit))
        assert (out.stored, out.alerts) == (2, 0)
        assert await db.fetchval("SELECT count(*) FROM error_alerts") == 1
        # the window over: the next batch alerts again, once
        await db.execute("UPDATE error_groups SET last_alerted_at = now() - interval '301 seconds'")
        assert (await _batch(pool, report(4, **crit), report(5, **crit))).alerts == 1
        # another group in the same batch as a quiet one alerts on its own
        out = await _batch(pool, report(6, **crit), report(7, level="critical", error_type="Other"))
        assert out.alerts == 1
    alerted = await db.fetch("SELECT title FROM error_groups"
                             " WHERE last_alerted_at > now() - interval '1 minute' ORDER BY title")
    assert [g["title"] for g in alerted] == ["LedgerCorrupt: ledger off",
                                             "Other: order 7 could not be charged"]
    assert await db.fetchval("SELECT sum(count) FROM error_groups") == 7


async def test_a_writer_given_back_in_a_transaction_is_rolled_back(db, database_url) -> None:
    async with store.writer_pool(database_url, 1) as pool:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.copy_records_to_table("error_logs", records=[_rows(report(1))[0].record],
                                             columns=store.COLUMNS)
        async with pool.acquire() as conn:  # the one connection, reset
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM error_logs") == 0
        assert (await _batch(pool, report(2))).stored == 1
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 1


async def test_a_redelivered_batch_is_stored_once_through_the_staging_table(db, database_url
                                                                           ) -> None:
    a, b, c = report(1), report(2), report(3)
    async with store.writer_pool(database_url, 1) as pool:
        assert (await store.write(pool, _rows(a, b), POLICY)).stored == 2
        # a and b come back (a crash before their ack) in a batch with a new report: the COPY
        # straight into error_logs fails, its transaction is rolled back, the staged insert
        # stores c alone
        out = await store.write(pool, _rows(b, c, a), POLICY)
        assert (out.stored, out.alerts) == (1, 0)
        # a batch holding one report twice goes straight to the staging table
        d = report(4)
        assert (await store.write(pool, _rows(d, d), POLICY)).stored == 1
    ids = sorted(r["id"] for r in await db.fetch("SELECT id::text FROM error_logs"))
    assert ids == sorted(x["id"] for x in (a, b, c, d))
    # the groups counted each report once: the rolled-back COPY's batch counted nothing
    assert await db.fetchval("SELECT sum(count) FROM error_groups") == 4


async def test_the_context_is_stored_scrubbed_as_json_by_either_path(db, database_url) -> None:
    ctx = {"password": "hunter2", "function": "charge", "nested": {"n": [1, 2.5, None]},
           "note": "snow ☃", "big": "x" * 70_000, **{f"k{i}": "y" * 4000 for i in range(20)}}
    a = report(1, context=ctx)
    async with store.writer_pool(database_url, 1) as pool:
        await store.write(pool, _rows(a), POLICY)  # straight COPY
        await store.write(pool, _rows(a, report(2, context=ctx)), POLICY)  # staged
    rows = await db.fetch("SELECT context::text, function_name FROM error_logs ORDER BY id")
    assert len(rows) == 2
    for row in rows:
        stored = json.loads(row["context"])
        assert stored["password"] == "[Filtered]" and "hunter2" not in row["context"]
        assert stored["nested"] == {"n": [1, 2.5, None]} and stored["note"] == "snow ☃"
        # over 64 KiB as JSON: cut again, harder
        assert stored["big"].startswith("xxx") and len(stored["big"]) <= 256
        assert len(row["context"]) <= 65536
        assert row["function_name"] == "charge"


async def test_what_a_copied_batch_adds_is_what_the_staged_insert_returns(db, database_url
                                                                          ) -> None:
    """``_added`` (the COPY path's own count of each group's new rows, occurrences, first and
    last time and top level) against what the staging table's INSERT ... RETURNING reports."""
    bodies = [report(i, error_type=f"E{i % 3}", message=f"m{i % 3}", level=level, count=1 + i % 4,
                     occurred_at=f"2026-01-0{1 + i % 5}T0{i % 7}:00:00+00:00")
              for i, level in enumerate(["info", "error", "warning", "critical", "debug",
                                         "error", "fatal", "warning", "info", "error"])]
    rows = _rows(*bodies)
    mine = sorted(store._added(rows), key=lambda a: a["group_id"])
    assert len(mine) == 3 and sum(a["new_rows"] for a in mine) == len(rows)
    async with store.writer_pool(database_url, 1) as pool, pool.acquire() as conn, \
            conn.transaction():
        theirs = [dict(r) for r in await store._insert(conn, rows, "stage")]
    assert mine == sorted(theirs, key=lambda a: a["group_id"])
