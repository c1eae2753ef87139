"""Fixtures: a real PostgreSQL and a real nats-server, and the services as real processes.

PostgreSQL starts once per session (or ``DATABASE_URL`` names a server to use); every test gets
its own database, cloned from a migrated template. Every test gets its own nats-server (or, with
``NATS_URL`` set, that server), so streams and consumers never leak between tests. localstripe
starts once per session for the tests that need Stripe; a test that lists everything Stripe
holds has one of its own (``own_stripe``). Every fixture more than one test file uses is here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from boxoffice import migrate
from boxoffice.embedded import LocalStripe, NatsServer, Postgres, free_port
from tests.audit_support import AuditListsProxy
from tests.harness import NATS_PASSWORDS, ServiceProcess, base_env, with_db

TEMPLATE_DB = "boxoffice_template"
NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a maintenance database on the session's PostgreSQL server."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield with_db(given, "postgres")
        return
    # Not under pytest's basetemp: pytest prunes old numbered basetemps when another session
    # starts, which would pull the data directory from under a long run.
    root = Path(tempfile.mkdtemp(prefix="boxoffice-test-pg-"))
    server = Postgres(root / "data").start(create_db=None)
    try:
        yield server.url("postgres")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


class PgRefusals:
    """What the session's PostgreSQL refused for want of a privilege, read from its log. Every
    test that uses a database ends with none: a service whose role lacks a grant fails the test
    even where it only retries or logs (``take`` them in a test that provokes refusals)."""

    MARKS = ("ERROR:  permission denied", "ERROR:  must be owner")

    def __init__(self, log: Path):
        self.log = log
        self.offset = 0

    def skip(self) -> None:
        self.offset = self.log.stat().st_size

    def take(self) -> list[str]:
        """The refusals logged since the last look, each with the statement refused."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            lines = f.read().decode(errors="replace").splitlines()
            self.offset = f.tell()
        found = []
        for line, after in zip(lines, lines[1:] + [""]):
            if any(m in line for m in self.MARKS):
                statement = after.partition("STATEMENT:")[2].strip()
                found.append(f"{line} / {statement}" if statement else line)
        return found


@pytest.fixture(scope="session")
def pg_refusals(pg_admin_url: str) -> PgRefusals | None:
    """The session server's refusals; None on a server named by DATABASE_URL (not our log)."""
    if os.environ.get("DATABASE_URL"):
        return None
    import asyncio

    async def data_directory() -> str:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            return await conn.fetchval("SELECT current_setting('data_directory')")
        finally:
            await conn.close()

    return PgRefusals(Path(asyncio.run(data_directory())).parent / "postgres.log")


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    import asyncio

    async def make() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await conn.close()

    asyncio.run(make())
    url = with_db(pg_admin_url, TEMPLATE_DB)
    migrate.run(url, "up")
    return TEMPLATE_DB


@pytest_asyncio.fixture
async def database_url(pg_admin_url: str, template_db: str, pg_refusals: PgRefusals | None
                       ) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (the owner's URL: the harness gives each
    service its own role's)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    if pg_refusals is not None:
        pg_refusals.skip()
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await conn.close()
    yield with_db(pg_admin_url, name)
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    # whatever the test did, PostgreSQL refused no service anything: each role's grants suffice
    refused = pg_refusals.take() if pg_refusals is not None else []
    assert not refused, "PostgreSQL refused:\n" + "\n".join(refused[:20])


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from boxoffice import db as dbmod
    async with dbmod.pool(database_url, min_size=1, max_size=20) as pool:
        yield pool


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, with JetStream on disk (fault tests stop and start it),
    a user for each service and no anonymous access (``url`` is the operator's)."""
    server = NatsServer(tmp_path / "nats", sync_always=False, passwords=NATS_PASSWORDS).start()
    try:
        yield server
    finally:
        server.kill()
    # whatever a test did, no service was refused anything it tried: its permissions are enough
    refused = [line for line in server.log.read_text(errors="replace").splitlines()
               if "Violation" in line]
    assert not refused, "nats-server refused:\n" + "\n".join(refused[:20])


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return os.environ.get("NATS_URL") or nats_server.url


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    ls = LocalStripe(log=tmp_path_factory.mktemp("localstripe") / "localstripe.log").start()
    try:
        yield ls
    finally:
        ls.stop()


@pytest.fixture
def own_stripe(tmp_path: Path) -> Iterator[LocalStripe]:
    """A localstripe of this test's own, for tests that list everything Stripe holds."""
    ls = LocalStripe(log=tmp_path / "localstripe.log").start()
    try:
        yield ls
    finally:
        ls.stop()


@pytest_asyncio.fixture
async def own_stripe_api(own_stripe: LocalStripe) -> AsyncIterator[AuditListsProxy]:
    """``own_stripe`` behind Stripe's list filters (refunds included); stopping it is Stripe
    going down."""
    proxy = await AuditListsProxy(own_stripe.url).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the test's services (many connections: tests send bursts)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as session:
        yield session


@dataclass
class AlertEndpoint:
    """An alert webhook endpoint: what it received (``posted`` as JSON, ``received`` as body and
    headers), answering the statuses of ``fail_with`` first, one a post, then 204."""

    url: str
    posted: list = field(default_factory=list)
    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    fail_with: list[int] = field(default_factory=list)

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((body, dict(request.headers)))
        self.posted.append(json.loads(body))
        return web.Response(status=self.fail_with.pop(0) if self.fail_with else 204)


@pytest_asyncio.fixture
async def alert_endpoint() -> AsyncIterator[AlertEndpoint]:
    """An alert webhook endpoint on 127.0.0.1 (a secret token in its path, as a chat
    service's)."""
    port = free_port()
    endpoint = AlertEndpoint(f"http://127.0.0.1:{port}/hook/secret-token")
    app = web.Application()
    app.router.add_post("/hook/{token}", endpoint.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield endpoint
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    """tests/node with its node_modules exactly as the lockfile says (npm ci, once per lockfile)."""
    npm = shutil.which("npm")
    assert npm and shutil.which("node"), "Node.js 20 and npm are needed (Debian: nodejs, npm)"
    stamp = NODE_DIR / "node_modules" / ".boxoffice-lock"
    digest = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                       capture_output=True, timeout=600)
        stamp.write_text(digest)
    return NODE_DIR


@pytest.fixture
def service_env(nats_url: str, database_url: str) -> dict[str, str]:
    """Environment for service processes; tests that need Stripe add ``STRIPE_API_BASE``."""
    return base_env(nats_url, database_url)


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path
                  ) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``boxoffice run <service>`` as a real process; everything started is stopped after."""
    started: list[ServiceProcess] = []

    def start(service: str, *, wait: bool = True, env: dict[str, str] | None = None,
              **extra_env: str) -> ServiceProcess:
        e = dict(env or service_env)
        if service == "ingress":
            e.pop("DATABASE_URL", None)
            e.pop("STRIPE_API_KEY", None)
        n = sum(1 for s in started if s.service == service)
        proc = ServiceProcess(service, e, tmp_path / f"{service}-{n}.log")
        started.append(proc)
        return proc.start(wait=wait, **extra_env)

    yield start
    for proc in started:
        if proc.running:
            proc.kill()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("boxoffice fault run (tests/test_fault_run.py)")
    group.addoption("--fault-seconds", type=float, default=90.0,
                    help="how long the randomized fault run injects faults (default 90)")
    group.addoption("--fault-seed", type=int, default=None,
                    help="replay the fault run with this seed (default: a new random seed)")
    group.addoption("--fault-nats-nodes", type=int, choices=(1, 3), default=1,
                    help="one nats-server (default), or a cluster of three with every stream "
                         "replicated three times: a nats fault then kills one node, or all three")
    group.addoption("--fault-pg-standby", action="store_true",
                    help="PostgreSQL as a primary and its synchronous standby: a PostgreSQL "
                         "fault then crashes the primary or the standby, or fails over")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault run's timeout follows --fault-seconds (the module says by how much)."""
    for item in items:
        budget = getattr(getattr(item, "module", None), "timeout_for_fault_seconds", None)
        if budget is not None:
            item.add_marker(pytest.mark.timeout(budget(config.getoption("--fault-seconds"))))
