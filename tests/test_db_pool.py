"""db.pool gives a connection back without a round trip (db.reset_nothing): nothing is sent on release,
a transaction left open is still rolled back (asyncpg does it), and the self-audit's session
advisory lock, the one session state any pooled connection takes, never goes back to the pool."""

from __future__ import annotations

import time

from boxoffice import audit
from boxoffice import db as dbmod


async def test_a_release_sends_nothing(database_url: str) -> None:
    async with dbmod.pool(database_url, min_size=1, max_size=1) as one:
        sent: list[str] = []
        async with one.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            conn.add_query_logger(lambda q: sent.append(q.query))
        assert sent == []  # asyncpg's default reset would be one query here


async def test_a_transaction_left_open_is_rolled_back(database_url: str) -> None:
    async with dbmod.pool(database_url, min_size=1, max_size=1) as one:
        async with one.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT set_config('application_name', 'left', true)")
        async with one.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT current_setting('application_name')") != "left"


class Quiet:
    """A check that finds nothing (what it examines does not matter here)."""

    name = "inventory"  # a check the schema knows (its row in audit_checks); a fresh database

    async def examine(self, since: object, reopen: object) -> audit.Examination:
        return audit.Examination(examined=1)


async def test_a_check_run_gives_its_connection_back_without_its_lock(database_url: str) -> None:
    """The self-audit takes a session advisory lock per check on a pooled connection and
    releases it itself: after a run, the pool's only connection holds no advisory lock."""
    async with dbmod.pool(database_url, min_size=1, max_size=1) as one:
        auditor = audit.Auditor(one, [Quiet()], interval=300)
        run = await auditor.run_check(Quiet(), full=True, wait_until=time.monotonic() + 10)
        assert run is not None
        async with one.acquire() as conn:  # the connection the run used
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid()") == 0
