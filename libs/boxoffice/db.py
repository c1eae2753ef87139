"""The asyncpg pool and its connections (``connect``: each server of a failover pair in turn),
the check that refuses to run on an unmigrated database, the one
definition of "the database is unavailable" (``UNAVAILABLE``, ``guarded``), and of a transaction
to run again (``CONFLICTS``, ``retrying``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import asyncpg
import stamina

from boxoffice import errors
from boxoffice.migrate import expected_version, functions_digest, server_urls

log = logging.getLogger("boxoffice.db")

# What means "the database is away" (unreachable, shutting down, starting, out of connections,
# a connection dropped): wait and retry, answer 503, never count it against the work in hand.
UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08: ConnectionDoesNotExistError...
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.IdleSessionTimeoutError,
    asyncpg.exceptions.InterfaceError,
    # a connection left mid-protocol by a server that went away (seen on shutdown)
    asyncpg.InternalClientError,
    ConnectionError, OSError, asyncio.TimeoutError)
# What a background loop waits out and tries again: the database away, or a statement refused
FAILURES: tuple[type[Exception], ...] = (*UNAVAILABLE, asyncpg.PostgresError)

# A transaction PostgreSQL aborted because it conflicted with another (a deadlock, a
# serialization failure): nothing of it was committed, and running it again is safe.
CONFLICTS: tuple[type[BaseException], ...] = (asyncpg.exceptions.DeadlockDetectedError,
                                              asyncpg.exceptions.SerializationError)

T = TypeVar("T")
P = ParamSpec("P")


async def retrying(run: Callable[[], Awaitable[T]], *, attempts: int, pause: float = 0.0) -> T:
    """``run()``'s result, run again while it fails with one of ``CONFLICTS``: ``attempts`` in
    all, the n-th retry after ``pause * n`` seconds; the last attempt's failure is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return await run()
        except CONFLICTS:
            if attempt == attempts:
                raise
            if pause:
                await asyncio.sleep(pause * attempt)
    raise AssertionError("attempts must be at least 1")


async def guarded(work: Awaitable[T]) -> T:
    """``work``'s result; the database away becomes ``DatabaseUnavailable`` (a 503 the caller may
    retry after a moment), never an internal error."""
    try:
        return await work
    except UNAVAILABLE as exc:
        raise errors.DatabaseUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}",
                                         retry_after=2) from None


def guard(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``fn`` with ``guarded`` around every call (for bus handlers)."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return await guarded(fn(*args, **kwargs))

    return call


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
        except FAILURES as exc:
            failure = exc  # a refusal, a timeout, a standby (not read-write): the next one
    assert failure is not None
    raise failure


# each statement of an operator's command (migrate, up, the dev tools): with a synchronous standby
# down a commit waits for it without end, and statement_timeout cannot bound that wait (it is
# over before the commit waits): the client gives up, the command says so
OPERATOR_STATEMENT_SECONDS = 60.0


async def operator_connect(dsn: str, *, command_timeout: float = OPERATOR_STATEMENT_SECONDS
                           ) -> asyncpg.Connection:
    """A connection for an operator's command, each statement bounded by ``command_timeout``
    (``TimeoutError`` past it; a commit that timed out waiting for the standby may still have
    been made on the primary)."""
    return await connect(dsn, timeout=10, command_timeout=command_timeout)


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def reset_nothing(conn: asyncpg.Connection) -> None:
    """What a connection given back to a pool goes through: nothing beyond asyncpg's own roll
    back of a transaction left open. asyncpg's default reset (``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL``, advisory locks released) is a round trip the releasing caller waits for on
    every use of the pool; the rule that makes it unneeded is that no pooled connection keeps
    session state: settings are transaction-local (``set_config(..., true)``), LISTEN has its
    own connection (``outbox.listen``), and the one session advisory lock (the self-audit's) is
    released by its holder, which closes the connection if it cannot."""


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
    def refused(exc: Exception) -> bool:  # a database that does not exist will not appear
        return (isinstance(exc, FAILURES)
                and not isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError))

    try:
        # with jitter: replicas waiting for the same PostgreSQL do not come back all at once
        async for attempt in stamina.retry_context(on=refused, attempts=None,
                                                   timeout=first_connect_timeout,
                                                   wait_initial=0.1, wait_max=2.0,
                                                   wait_jitter=0.5):
            with attempt:
                try:
                    p = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size,
                                                  init=_init, connect=connect, reset=reset_nothing,
                                                  command_timeout=30, timeout=5,
                                                  max_inactive_connection_lifetime=60)
                except FAILURES as exc:
                    log.warning("postgres: not reachable yet (%s)", type(exc).__name__)
                    raise
    except FAILURES as exc:
        raise errors.DatabaseUnavailable(f"cannot reach PostgreSQL: {type(exc).__name__}") from None
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
