"""Where the SQL lives: tables in the one baseline migration, every function's current body in
one file per domain (libs/boxoffice/sql), applied after the migrations with their digest recorded,
and a service that refuses a database whose functions are stale."""

from __future__ import annotations

import re

import asyncpg
import pytest

from boxoffice import db as dbmod
from boxoffice import migrate


def test_every_function_file_is_applied_and_migrations_define_no_function() -> None:
    assert sorted(p.name for p in migrate.FUNCTIONS_DIR.glob("*.sql")) == sorted(
        migrate.FUNCTION_FILES)
    for path in migrate.MIGRATIONS_DIR.glob("*.sql"):
        assert not re.search(r"\bCREATE\s+(OR\s+REPLACE\s+)?(FUNCTION|TRIGGER)\b",
                             path.read_text(), re.I), path.name


async def test_each_function_and_trigger_is_defined_once_in_the_files(db: asyncpg.Pool) -> None:
    defined: dict[str, list[str]] = {}
    for name in migrate.FUNCTION_FILES:
        text = (migrate.FUNCTIONS_DIR / name).read_text()
        for m in re.finditer(r"^CREATE OR REPLACE (?:FUNCTION|TRIGGER) (\w+)", text, re.M):
            defined.setdefault(m.group(1), []).append(name)
    functions = {r[0] for r in await db.fetch(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")}
    triggers = {r[0] for r in await db.fetch(
        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
    # outbox_notify and stripe_actions_notify name a function and its trigger, in one file
    assert set(defined) == functions | triggers
    assert all(len(set(files)) == 1 for files in defined.values()), defined


async def test_migrate_records_the_digest_and_restores_a_changed_body(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT digest FROM schema_functions") == \
            migrate.functions_digest()
        await conn.execute("CREATE OR REPLACE FUNCTION payment_status_rank(p_status text) "
                           "RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 0'")
        await conn.execute("UPDATE schema_functions SET digest = 'stale'")
        result = migrate.run(database_url, "up", check=False)
        assert result.returncode == 0, result.stderr
        assert await conn.fetchval("SELECT payment_status_rank('succeeded')") > 0
        assert await conn.fetchval("SELECT digest FROM schema_functions") == \
            migrate.functions_digest()
    finally:
        await conn.close()


def test_a_function_file_that_fails_fails_migrate(database_url: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path) -> None:
    for name in migrate.FUNCTION_FILES:
        (tmp_path / name).write_text((migrate.FUNCTIONS_DIR / name).read_text())
    (tmp_path / "webhooks.sql").write_text("SELECT no_such_function();")
    monkeypatch.setattr(migrate, "FUNCTIONS_DIR", tmp_path)
    result = migrate.run(database_url, "up", check=False)
    assert result.returncode != 0
    assert "UndefinedFunctionError" in result.stderr and "postgresql://" not in result.stderr


def test_schema_problem_decides_on_version_and_digest() -> None:
    want, mine = migrate.expected_version(), migrate.functions_digest()
    assert dbmod.schema_problem(want, mine) is None
    assert dbmod.schema_problem("99991231000000", "a newer release's") is None
    assert "this release needs" in dbmod.schema_problem(None, None)
    assert "this release needs" in dbmod.schema_problem("20000101000000", mine)
    assert "database functions are stale" in dbmod.schema_problem(want, "stale")
    assert "database functions are none" in dbmod.schema_problem(want, None)


@pytest.mark.parametrize("service", ["payment"])
async def test_a_service_refuses_stale_functions(service: str, start_service,
                                                 database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE schema_functions SET digest = 'stale'")
    await conn.close()
    proc = start_service(service, wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(60) != 0
    assert "database functions are stale" in proc.logs()
    assert "boxoffice migrate" in proc.logs()


async def test_a_recovery_point_the_code_never_writes_is_refused(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO payment_intents_log (client_id, idempotency_key, request_path, "
            "request_fingerprint, recovery_point, stripe_idempotency_key) "
            "VALUES ('c', 'k', '/v1/payment_intents', 'f', 'stripe_called', 's')")


async def test_migrate_status_says_whether_the_functions_are_current(database_url: str) -> None:
    mine = migrate.functions_digest()[:12]
    result = migrate.run(database_url, "status", check=False)
    assert result.returncode == 0 and f"[X] functions {mine}" in result.stdout, result.stdout
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE schema_functions SET digest = 'stale'")
    finally:
        await conn.close()
    result = migrate.run(database_url, "status", check=False)
    assert f"[ ] functions {mine} (the database has stale)" in result.stdout, result.stdout
