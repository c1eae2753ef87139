"""Test harness: real servers and real service processes, and the one polling helper
(``eventually``) every test waits with.

The tests' nats-server has every user of ``boxoffice.bus_access`` (passwords ``NATS_PASSWORDS``);
the tests themselves connect as the operator, and a service started here with the operator's
URL runs as its own user instead (``as_service``), so every test that runs a service also proves
that its permissions let it do its job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from boxoffice import bus_access, db, roles
from boxoffice.embedded import free_port

CLIENT_TOKEN = "client-token-aaaaaaaaaaaaaaaa"
CLIENT_TOKEN_2 = "client-token-bbbbbbbbbbbbbbbb"
ADMIN_TOKEN = "admin-token-cccccccccccccccccc"
WEBHOOK_SECRET = "whsec_test_secret_current"
WEBHOOK_SECRET_OLD = "whsec_test_secret_previous"
SENTRY_KEY = "0123456789abcdef0123456789abcdef"
STRIPE_KEY = "sk_test_boxoffice_tests"
# each service logs into PostgreSQL with its own role, as deployed (boxoffice.roles)
DB_PASSWORDS = {service: f"pg-{service.replace('_', '-')}-SECRET-{n}e41c9a7"
                for n, service in enumerate(roles.ROLES)}
NATS_PASSWORDS = {user: f"nats-{user}-test-password" for user in bus_access.USERS}


T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 30.0,
                     what: str | None = None, *, interval: float = 0.05) -> T:
    """Call ``check`` (a plain or an async function) until it returns something truthy, and
    return that. After ``timeout`` seconds fail, naming ``what`` was awaited (by default the
    check's own name, or a lambda's source line) and the check's last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            last = repr(value)
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what or _named(check)} (last: {last[:500]})")
        await asyncio.sleep(interval)


def _named(check: Callable[..., object]) -> str:
    name = getattr(check, "__qualname__", None) or repr(check)
    if name.endswith("<lambda>"):
        with contextlib.suppress(OSError, TypeError):
            return inspect.getsource(check).strip()
    return name


def with_db(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (same server, same user)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def as_service(nats_url: str, service: str) -> str:
    """The URL ``service`` connects with: its own user where ``nats_url`` is the tests'
    operator, else ``nats_url`` unchanged (a server without users, or one given from outside)."""
    if (bus_access.user_of(nats_url) == bus_access.OPERATOR
            and f":{NATS_PASSWORDS[bus_access.OPERATOR]}@" in nats_url):
        return bus_access.with_user(nats_url, service, NATS_PASSWORDS[service])
    return nats_url


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ServiceProcess:
    """One service as a real OS process (``boxoffice run <service>``)."""

    service: str
    env: dict[str, str]
    log: Path
    port: int = 0
    health_port: int = 0  # ingress only: /metrics lives off the public port
    proc: subprocess.Popen | None = None
    history: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        """Where /metrics is served (the public port, except for ingress)."""
        return f"http://127.0.0.1:{self.health_port or self.port}"

    def start(self, wait: bool = True, timeout: float = 30.0, **extra_env: str) -> ServiceProcess:
        if not self.port:
            self.port = free_port()
        env = dict(self.env)
        env.update(extra_env)
        if "NATS_URL" in env:
            env["NATS_URL"] = as_service(env["NATS_URL"], self.service)
        env["INGRESS_PORT" if self.service == "ingress" else "HEALTH_PORT"] = str(self.port)
        if self.service == "ingress":
            self.health_port = self.health_port or free_port()
            env["HEALTH_PORT"] = str(self.health_port)
        if self.service in roles.ROLES and env.get("DATABASE_URL"):
            env["DATABASE_URL"] = login_url(self.service, env["DATABASE_URL"])
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "boxoffice.cli", "run", self.service],
                                         env=env, stdout=out, stderr=out)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            if http_ready(f"{self.url}/readyz"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.service} not ready:\n{self.log.read_text()[-3000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.history.append(self.proc.returncode)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.history.append(self.proc.returncode)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def metrics(service: ServiceProcess) -> dict[str, float]:
    """``service``'s /metrics (on its health port) as {'name{labels}': value}."""
    with urllib.request.urlopen(f"{service.health_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def login_url(service: str, url: str) -> str:
    """The URL ``service`` logs in with: ``url``'s server and database, as the service's own
    role. ``url`` is the owner's: through it the role gets LOGIN and its test password first,
    unless the server does not answer now (a service restarted while PostgreSQL is down: the
    role got them when the service first started, or the commit waits for a standby that is
    down: bounded, for a caller may be the event loop that would start the standby again; or
    in a failover, before the standby is promoted, when no server takes writes)."""
    if urlsplit(url).username in roles.ROLES.values():
        return url
    password = DB_PASSWORDS[service]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # callers may run in an event loop
        try:
            pool.submit(roles.set_logins, url, {service: password}, 5.0).result()
        except db.FAILURES:  # what the services wait out; mid-failover, no host takes writes
            pass
    return roles.url_for(url, service, password)


def base_env(nats_url: str, database_url: str, stripe_base: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "DATABASE_", "STRIPE_", "SENTRY_", "BOXOFFICE_"))}
    env.update({
        "NATS_URL": nats_url, "DATABASE_URL": database_url, "STRIPE_API_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": f"{WEBHOOK_SECRET},{WEBHOOK_SECRET_OLD}",
        "CLIENT_API_TOKENS": f"{CLIENT_TOKEN},{CLIENT_TOKEN_2}", "ADMIN_API_TOKENS": ADMIN_TOKEN,
        "SENTRY_INGEST_KEYS": SENTRY_KEY, "BOXOFFICE_ENV": "test", "LOG_LEVEL": "INFO",
    })
    if stripe_base:
        env["STRIPE_API_BASE"] = stripe_base
    return env


async def in_one_snapshot(url: str, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """``read`` on a connection of its own in one read-only REPEATABLE READ transaction: every
    table as of one instant. Read one after another in transactions of their own, tables
    that services write show half of a transaction that committed between two reads."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await read(conn)
    finally:
        await conn.close()


def process_alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie, not yet reaped, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
