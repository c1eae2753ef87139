"""The asyncpg pool, and the check that refuses to run on an unmigrated database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from boxoffice import errors
from boxoffice.migrate import expected_version, functions_digest, server_urls

log = logging.getLogger("boxoffice.db")

# asyncpg errors that mean "the database went away": retry later, answer 503.
UNAVAILABLE = (asyncpg.exceptions.ConnectionDoesNotExistError,
               asyncpg.exceptions.CannotConnectNowError,
               asyncpg.exceptions.AdminShutdownError,
               asyncpg.exceptions.CrashShutdownError,
               asyncpg.exceptions.TooManyConnectionsError,
               asyncpg.exceptions.InterfaceError,
               # a connection left mid-protocol by a server that went away (seen on shutdown)
               asyncpg.InternalClientError,
               ConnectionError, OSError, asyncio.TimeoutError)


async def connect(dsn: str, *, timeout: float = 5.0, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, where a URL listing several servers (a primary and its standby)
    gives each server ``timeout`` of its own, in order. asyncpg spends one ``timeout`` on all
    of them: a dead primary that does not refuse (its machine gone, packets dropped) would use
    it up, and the standby promoted in its place would never be tried."""
    servers = server_urls(dsn)
    if len(servers) == 1:
        return await asyncpg.connect(dsn, timeout=timeout, **kwargs)
    failure: BaseException | None = None
    for one in servers:
        try:
            return await asyncpg.connect(one, timeout=timeout, **kwargs)
        except (*UNAVAILABLE, asyncpg.exceptions.PostgresError) as exc:
            failure = exc  # a refusal, a timeout, a standby (not read-write): the next one
    assert failure is not None
    raise failure


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def schema_version(conn: asyncpg.Connection) -> str | None:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return None
    return await conn.fetchval("SELECT max(version) FROM schema_migrations")


async def functions_applied(conn: asyncpg.Connection) -> str | None:
    """The digest of the function files last applied (None: never applied)."""
    if not await conn.fetchval("SELECT to_regclass('schema_functions') IS NOT NULL"):
        return None
    return await conn.fetchval("SELECT digest FROM schema_functions")


def schema_problem(version: str | None, digest: str | None) -> str | None:
    """Why this release must not run on a database at ``version`` whose functions have
    ``digest``, or None. A newer schema is accepted (a release being rolled out migrated it);
    at this release's own version the functions must be exactly the ones it ships."""
    want = expected_version()
    if version is None or version < want:
        return f"database schema is at {version or 'nothing'}, this release needs {want}"
    if version == want and digest != functions_digest():
        return (f"database functions are {(digest or 'none')[:12]}, this release ships "
                f"{functions_digest()[:12]}")
    return None


@contextlib.asynccontextmanager
async def pool(url: str, *, min_size: int = 2, max_size: int = 16,
               first_connect_timeout: float = 60.0, check_schema: bool = True
               ) -> AsyncIterator[asyncpg.Pool]:
    """Open a pool (retrying the first connection), check the schema is migrated, close on exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + first_connect_timeout
    delay = 0.1
    while True:
        try:
            p = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init,
                                          connect=connect, command_timeout=30, timeout=5,
                                          max_inactive_connection_lifetime=60)
            break
        except UNAVAILABLE + (asyncpg.exceptions.PostgresError,) as exc:
            if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError) or loop.time() + delay > deadline:
                raise errors.DatabaseUnavailable(f"cannot reach PostgreSQL: {type(exc).__name__}") from None
            log.warning("postgres: not reachable yet (%s), retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        if check_schema:
            async with p.acquire() as conn:
                problem = schema_problem(await schema_version(conn), await functions_applied(conn))
            if problem:
                raise errors.NotMigrated(f"{problem}: run `boxoffice migrate`")
        yield p
    finally:
        await p.close()


async def ping(p: asyncpg.Pool) -> bool:
    try:
        async with p.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)
        return True
    except Exception:  # noqa: BLE001 - readiness: any failure means not ready
        return False
