"""Migrations go up, down one step and up again, through `boxoffice migrate`."""

from __future__ import annotations

import subprocess
import sys
import uuid

import asyncpg

from boxoffice.migrate import MIGRATIONS_DIR, expected_version
from tests.harness import with_db

TABLES = {"error_logs", "error_groups", "payment_intents_log", "webhook_events_log",
          "ticketed_events", "inventory_buckets", "reservations", "outbox", "reaper_runs",
          "payments", "reservation_allocations"}
FUNCTIONS = {"cleanup_expired_reservations", "get_reservation_stats", "hold_tickets",
             "complete_reservation", "release_reservation", "expire_due_reservations"}


def migrate(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", "migrate", *flags],
                          env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


async def inventory(url: str) -> tuple[set[str], set[str], list[str]]:
    conn = await asyncpg.connect(url)
    try:
        tables = {r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        funcs = {r[0] for r in await conn.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")}
        versions = [r[0] for r in await conn.fetch(
            "SELECT version FROM schema_migrations ORDER BY version")] \
            if "schema_migrations" in tables else []
        return tables, funcs, versions
    finally:
        await conn.close()


async def test_up_down_up(pg_admin_url: str) -> None:
    name = f"m_{uuid.uuid4().hex[:8]}"
    url = with_db(pg_admin_url, name)
    r = migrate(url)  # dbmate creates the database when it does not exist
    assert r.returncode == 0, r.stdout + r.stderr
    tables, funcs, versions = await inventory(url)
    assert tables >= TABLES and funcs >= FUNCTIONS
    all_versions = sorted(p.name.split("_")[0] for p in MIGRATIONS_DIR.glob("*.sql"))
    assert versions == all_versions and versions[-1] == expected_version()

    # roll back every migration one step at a time, then apply them all again
    for step in range(len(all_versions)):
        r = migrate(url, "--down")
        assert r.returncode == 0, r.stdout + r.stderr
        _, _, versions = await inventory(url)
        assert versions == all_versions[: len(all_versions) - step - 1]
    tables, funcs, _ = await inventory(url)
    assert not (TABLES & tables) and not (FUNCTIONS & funcs)

    r = migrate(url)
    assert r.returncode == 0
    tables, funcs, versions = await inventory(url)
    assert tables >= TABLES and versions == all_versions
    assert "postgresql://" not in r.stdout  # the URL (a secret) is never printed

    conn = await asyncpg.connect(pg_admin_url)
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()


def test_migrate_without_database_url_names_it() -> None:
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "migrate"],
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "DATABASE_URL" in r.stderr


async def test_runbook_queries_run_unchanged(db) -> None:
    async with db.acquire() as conn:
        await conn.fetch("SELECT severity, function_name, error_message, timestamp FROM error_logs "
                         "WHERE resolved = FALSE ORDER BY timestamp DESC LIMIT 20;")
        await conn.fetch("SELECT idempotency_key, COUNT(*) AS attempts FROM payment_intents_log "
                         "GROUP BY idempotency_key HAVING COUNT(*) > 1;")
        await conn.fetch("SELECT event_id, event_type, processing_status, processed_at FROM "
                         "webhook_events_log ORDER BY processed_at DESC LIMIT 20;")
        stats = await conn.fetchrow("SELECT * FROM get_reservation_stats();")
        assert stats["active_count"] == 0
        assert await conn.fetchval("SELECT cleanup_expired_reservations();") == 0
        await conn.fetch("SELECT * FROM reaper_runs ORDER BY started_at DESC LIMIT 10;")
