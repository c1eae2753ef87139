"""A PostgreSQL role per service: each may do its own job and nothing else.

What each service must be able to do is proven by the whole suite: the harness starts every
service with its own role's ``DATABASE_URL`` (tests/harness.py), as ``boxoffice up`` and the
compose file do. Here: the catalog holds exactly the grants decided in tests/db_grants.py (so a
table or function added without deciding its grants fails), PostgreSQL itself refuses a sample of
what a service must not do, the migration works where the roles exist already and refuses a role
with more power than its grants, ``boxoffice migrate`` sets the roles' passwords, and
``sslmode`` in ``DATABASE_URL`` reaches both asyncpg and dbmate.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from boxoffice import db as dbmod
from boxoffice import errors, migrate, roles
from boxoffice.embedded import Postgres
from tests import db_grants
from tests.harness import login_url

SERVICE_OF = {role: service for service, role in roles.ROLES.items()}
Grants = dict[tuple[str, str], set[tuple[str, str | None]]]  # (object, grantee) -> privileges


def _parse(privileges: str) -> set[tuple[str, str | None]]:
    """``"SELECT UPDATE(a,b)"`` -> {("SELECT", None), ("UPDATE", "a"), ("UPDATE", "b")}."""
    out: set[tuple[str, str | None]] = set()
    for token in privileges.split():
        name, _, cols = token.partition("(")
        if not cols:
            out.add((name, None))
        out.update((name, c.strip('"')) for c in cols.rstrip(")").split(",") if c)
    return out


def decided() -> Grants:
    want: Grants = {}
    for table, by_service in db_grants.TABLES.items():
        for service, privileges in by_service.items():
            want[(table, service)] = _parse(privileges)
    for seq, services in db_grants.SEQUENCES.items():
        for service in services:
            want[(seq, service)] = {("USAGE", None)}
    for fn, services in db_grants.FUNCTIONS.items():
        for service in services:
            want[(fn, service)] = {("EXECUTE", None)}
    return want


async def granted(conn: asyncpg.Connection) -> tuple[set[str], Grants]:
    """Every table, sequence and function of the schema, and what anyone but its owner holds on
    it (grantees by service name; PUBLIC and other roles as themselves)."""
    objects = {r["name"] for r in await conn.fetch(
        "SELECT relname AS name FROM pg_class WHERE relnamespace = 'public'::regnamespace "
        "AND relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
        "UNION ALL SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")}
    rows = await conn.fetch("""
        WITH acl AS (
            SELECT c.relname AS name, NULL::name AS col, c.relowner AS owner,
                   (aclexplode(coalesce(c.relacl, acldefault(
                       CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner)))).*
            FROM pg_class c
            WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r','p','v','m','f','S')
            UNION ALL
            SELECT c.relname, a.attname, c.relowner, (aclexplode(a.attacl)).*
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'public'::regnamespace AND a.attacl IS NOT NULL
              AND NOT a.attisdropped
            UNION ALL
            SELECT p.proname, NULL, p.proowner,
                   (aclexplode(coalesce(p.proacl, acldefault('f'::"char", p.proowner)))).*
            FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
        )
        SELECT name, col, privilege_type,
               CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(grantee) END AS grantee
        FROM acl WHERE grantee <> owner
        """)
    have: Grants = {}
    for r in rows:
        who = SERVICE_OF.get(r["grantee"], r["grantee"])
        have.setdefault((r["name"], who), set()).add((r["privilege_type"], r["col"]))
    return objects, have


def compare(objects: set[str], have: Grants) -> list[str]:
    listed = set(db_grants.TABLES) | set(db_grants.SEQUENCES) | set(db_grants.FUNCTIONS)
    problems = [f"{name}: not in tests/db_grants.py; decide which service may use it, grant "
                f"that in a migration and list it" for name in sorted(objects - listed)]
    problems += [f"{name}: listed in tests/db_grants.py but not in the database"
                 for name in sorted(listed - objects)]
    want = decided()
    for key in sorted(set(want) | set(have), key=str):
        if key[0] not in objects & listed:
            continue
        extra, missing = have.get(key, set()) - want.get(key, set()), \
            want.get(key, set()) - have.get(key, set())
        if extra:
            problems.append(f"{key[0]}: {key[1]} holds {sorted(extra, key=str)} not decided")
        if missing:
            problems.append(f"{key[0]}: {key[1]} lacks {sorted(missing, key=str)}")
    return problems


async def test_every_table_sequence_and_function_has_exactly_its_decided_grants(db) -> None:
    async with db.acquire() as conn:
        objects, have = await granted(conn)
    assert "reservations" in objects and "hold_tickets" in objects
    problems = compare(objects, have)
    assert not problems, "\n".join(problems)


async def test_the_schema_is_the_owners_and_what_it_adds_later_is_granted_to_nobody(db) -> None:
    async with db.acquire() as conn:
        schema = {r["grantee"]: r["privileges"] for r in await conn.fetch(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END "
            "       AS grantee, array_agg(a.privilege_type ORDER BY a.privilege_type) AS privileges "
            "FROM pg_namespace n, aclexplode(n.nspacl) a "
            "WHERE n.nspname = 'public' AND a.grantee <> n.nspowner GROUP BY 1")}
        assert schema == {role: ["USAGE"] for role in roles.ROLES.values()}
        # as a later migration would: a table and a function created by the owner
        later = conn.transaction()
        await later.start()
        try:
            await conn.execute("CREATE TABLE later_table (id int)")
            await conn.execute("CREATE FUNCTION later_function() RETURNS int LANGUAGE sql "
                               "AS 'SELECT 1'")
            for role in [*roles.ROLES.values(), "public"]:
                for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                    assert not await conn.fetchval(
                        "SELECT has_table_privilege($1, 'later_table', $2)", role, privilege)
                assert not await conn.fetchval(
                    "SELECT has_function_privilege($1, 'later_function()', 'EXECUTE')", role)
            problems = compare(*await granted(conn))
        finally:
            await later.rollback()
    assert "later_table: not in tests/db_grants.py; decide which service may use it, grant " \
           "that in a migration and list it" in problems


@pytest.fixture
async def as_role(database_url: str) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """A connection of each service's role (its LOGIN and password, as the harness gives them)."""
    conns = {s: await asyncpg.connect(login_url(s, database_url)) for s in roles.ROLES}
    try:
        yield conns
    finally:
        for conn in conns.values():
            await conn.close()


# what a service must not do: (service, statement); each is refused with SQLSTATE 42501
REFUSED = [
    ("error_sink", "UPDATE inventory_buckets SET held = 0"),
    ("error_sink", "SELECT * FROM payments"),
    ("error_sink", "UPDATE payments SET status = 'succeeded'"),
    ("error_sink", "INSERT INTO outbox (subject, payload) VALUES ('payments.events.succeeded', '{}')"),
    ("error_sink", "SELECT * FROM reservations"),
    ("payment", "DELETE FROM error_logs"),
    ("payment", "SELECT error_message FROM error_logs"),
    ("payment", "UPDATE payments SET status = 'succeeded'"),
    ("payment", "SELECT payload FROM webhook_events_log"),
    ("payment", "UPDATE inventory_buckets SET sold = 0"),
    ("webhook", "DELETE FROM error_logs"),
    ("webhook", "UPDATE ticketed_events SET price = 0"),
    ("webhook", "SELECT response_body FROM payment_intents_log"),
    ("webhook", "UPDATE reservations SET expires_at = now() + interval '1 year'"),
    ("reaper", "UPDATE payments SET status = 'refunded'"),
    ("reaper", "SELECT response_body FROM payment_intents_log"),
    ("reaper", "SELECT payload FROM webhook_events_log"),
    ("reaper", "SELECT error_message FROM error_logs"),
    ("reaper", "INSERT INTO ticketed_events (name, capacity, price, currency) "
               "VALUES ('x', 1, 1, 'eur')"),
] + [(s, sql) for s in roles.ROLES for sql in (
    # nothing but the migrations changes the schema
    "CREATE TABLE intruder (id int)",
    "CREATE VIEW intruder AS SELECT 1",
    "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA intruder",
    "ALTER TABLE outbox ADD COLUMN intruder int",
    "DROP TABLE error_logs",
    "CREATE INDEX intruder ON reservations (client_id)",
    "CREATE TRIGGER intruder AFTER INSERT ON outbox EXECUTE FUNCTION outbox_notify()",
    "TRUNCATE error_logs",
    "ALTER FUNCTION hold_tickets_in SECURITY DEFINER",
    # operators' function, run as the owner
    "SELECT cleanup_expired_reservations()",
)]


async def test_what_a_service_must_not_do_is_refused_by_postgresql(as_role, pg_refusals) -> None:
    allowed = []
    for service, sql in REFUSED:
        conn = as_role[service]
        try:
            async with conn.transaction():
                await conn.execute(sql)
        except asyncpg.InsufficientPrivilegeError:
            continue
        allowed.append(f"{service}: {sql}")
    assert not allowed, "allowed:\n" + "\n".join(allowed)
    if pg_refusals is not None:  # the server logged each refusal (and the suite allows no other)
        logged = pg_refusals.take()
        assert len(logged) == len(REFUSED), logged
    # and each one's own work is not refused (the suite proves the rest)
    for service, sql in [("error_sink", "SELECT count(*) FROM error_logs"),
                         ("payment", "SELECT count(*) FROM reservations"),
                         ("webhook", "SELECT count(*) FROM webhook_events_log"),
                         ("reaper", "SELECT * FROM get_reservation_stats()")]:
        await as_role[service].fetch(sql)


async def test_each_service_runs_as_its_own_role_and_ingress_without_one(
        start_service, localstripe, database_url: str) -> None:
    procs = {s: start_service(s, STRIPE_API_BASE=localstripe.url) for s in roles.ROLES}
    start_service("ingress")
    conn = await asyncpg.connect(database_url)
    try:
        users = {r["usename"] for r in await conn.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")}
    finally:
        await conn.close()
    assert users == set(roles.ROLES.values()), users
    assert all(p.running for p in procs.values())


def test_a_service_role_url_is_given_while_no_server_takes_writes(database_url: str) -> None:
    """The harness starts (and the fault run's supervisor restarts) services during a failover,
    before the standby is promoted: no server takes writes, so the owner's connection to give the
    role its login fails (asyncpg's TargetServerAttributeNotMatched, seen here by asking for a
    server that takes writes on a session that is read-only). That is no reason not to start
    the service: the URL comes back, and the service waits for the database as after any outage.
    (It raised, and the fault run's supervisor died with it: no service was restarted again.)"""
    sep = "&" if "?" in database_url else "?"
    read_only = database_url + sep + "default_transaction_read_only=on&target_session_attrs=read-write"
    url = login_url("payment", read_only)
    assert url.startswith("postgres") and f"{roles.ROLES['payment']}:" in url


# -- a server of its own for each test: roles belong to the whole server -----------------------
@pytest.fixture
def own_cluster() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="boxoffice-roles-pg-"))
    server = Postgres(root / "data").start(create_db=None)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def boxoffice_migrate(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", "migrate"],
                          env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=120)


async def _login(url: str, service: str, password: str) -> str:
    conn = await asyncpg.connect(roles.url_for(url, service, password))
    try:
        return await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()


async def test_an_owner_that_is_no_superuser_migrates_and_sets_the_logins(
        own_cluster: Postgres) -> None:
    # as the README says to do on one's own PostgreSQL
    own_cluster.psql("CREATE ROLE boxoffice LOGIN CREATEROLE PASSWORD 'owner-Pw-1'")
    own_cluster.psql("CREATE DATABASE boxoffice OWNER boxoffice")
    owner = f"postgresql://boxoffice:owner-Pw-1@127.0.0.1:{own_cluster.port}/boxoffice"
    passwords = {roles.password_variable(s): f"{s}-Pw-{uuid.uuid4().hex}" for s in roles.ROLES}
    r = boxoffice_migrate(owner, **passwords)
    assert r.returncode == 0, r.stdout + r.stderr
    for service in roles.ROLES:
        password = passwords[roles.password_variable(service)]
        assert await _login(owner, service, password) == roles.ROLES[service]
    conn = await asyncpg.connect(owner)
    try:
        assert compare(*await granted(conn)) == []
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relowner <> 'boxoffice'::regrole") == 0
    finally:
        await conn.close()


async def test_migrations_work_where_the_roles_exist_and_migrate_sets_their_passwords(
        own_cluster: Postgres) -> None:
    # a deployer created the payment role beforehand, with its login
    own_cluster.psql("CREATE ROLE boxoffice_payment LOGIN PASSWORD 'made-by-hand'")
    first = own_cluster.url(f"r_{uuid.uuid4().hex[:8]}")
    r = boxoffice_migrate(first)
    assert r.returncode == 0, r.stdout + r.stderr
    assert await _login(first, "payment", "made-by-hand") == "boxoffice_payment"
    # the others were created without LOGIN
    logins = own_cluster.psql("SELECT string_agg(rolname || '=' || rolcanlogin, ' ' ORDER BY "
                              "rolname) FROM pg_roles WHERE rolname LIKE 'boxoffice\\_%'")
    assert logins == ("boxoffice_error_sink=false boxoffice_payment=true "
                      "boxoffice_reaper=false boxoffice_webhook=false"), logins
    # a second database of the same cluster: the roles exist; PG_<SERVICE>_PASSWORD sets logins
    second = own_cluster.url(f"r_{uuid.uuid4().hex[:8]}")
    passwords = {roles.password_variable(s): f"{s}-Pw-{uuid.uuid4().hex}" for s in roles.ROLES}
    r = boxoffice_migrate(second, **passwords)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "logins set: " + ", ".join(roles.ROLES.values()) in r.stdout
    assert not any(p in r.stdout + r.stderr for p in passwords.values())
    for service in roles.ROLES:
        password = passwords[roles.password_variable(service)]
        assert await _login(second, service, password) == roles.ROLES[service]
        with pytest.raises(asyncpg.InvalidPasswordError):  # the password is checked
            await _login(second, service, password + "x")
    # every database of the cluster ends with exactly the decided grants; migrating again
    # changes nothing
    r = boxoffice_migrate(first)
    assert r.returncode == 0, r.stdout + r.stderr
    for url in (first, second):
        conn = await asyncpg.connect(url)
        try:
            assert compare(*await granted(conn)) == []
        finally:
            await conn.close()


async def test_the_migration_refuses_a_service_role_with_more_power(own_cluster: Postgres) -> None:
    own_cluster.psql("CREATE ROLE boxoffice_reaper SUPERUSER")
    r = boxoffice_migrate(own_cluster.url("boxoffice"))
    assert r.returncode != 0
    assert "role boxoffice_reaper exists with SUPERUSER" in r.stdout + r.stderr, r.stdout


async def _refused_by_both(url: str) -> None:
    with pytest.raises(errors.DatabaseUnavailable):
        async with dbmod.pool(url, first_connect_timeout=0.5):
            pass
    r = migrate.run(url, "status", wait=False, check=False)
    assert r.returncode != 0 and "SSL is not enabled on the server" in r.stderr, r.stderr


async def test_sslmode_in_database_url_reaches_asyncpg_and_dbmate(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the test server has no TLS: a URL that requires it is refused by both clients
    await _refused_by_both(database_url + "?sslmode=require")
    # one that allows plain connections works with both
    url = database_url + "?sslmode=prefer"
    async with dbmod.pool(url, min_size=1, max_size=1) as pool:
        assert await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") \
            is False
    r = migrate.run(url, "status", wait=False, check=False)
    assert r.returncode == 0, r.stderr
    # without sslmode in the URL, PGSSLMODE decides for both
    monkeypatch.setenv("PGSSLMODE", "require")
    await _refused_by_both(database_url)
