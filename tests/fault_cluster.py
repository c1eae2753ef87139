"""The fault run's own stack (no tests here): its own PostgreSQL data directory, nats-server and
localstripe, the five services as real processes (two replicas of those that share work), a
supervisor that restarts what died, and the faults themselves (SIGKILL, SIGSTOP/SIGCONT,
nats-server and every PostgreSQL process killed).

Blocking work (starting PostgreSQL, waiting for its crash recovery) runs in a thread, so the
workload and the proxies, which share the test's event loop, keep going while a server restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from boxoffice import migrate
from boxoffice.embedded import LocalStripe, NatsServer, Postgres
from tests.harness import ServiceProcess, base_env, eventually

# Replicas where the README says they share the work (holds and keys, Stripe events, expiry);
# one ingress (the run's only address). Instances are named "<service>-<n>".
REPLICAS = {"payment": 2, "webhook": 2, "reaper": 2, "error-sink": 1, "ingress": 1}
INSTANCES = tuple(f"{service}-{n}" for service, count in REPLICAS.items() for n in range(count))
RESTART_BACKOFF = (0.5, 5.0)  # first delay, cap (doubling), as `boxoffice up` does


@dataclass
class Supervised:
    proc: ServiceProcess
    delay: float = RESTART_BACKOFF[0]
    next_start: float = 0.0
    started_at: float = 0.0
    stopped: bool = False  # SIGSTOPped by the nemesis: alive, not to be restarted


@dataclass
class Cluster:
    root: Path
    ttl_seconds: int
    stripe_base: str = ""  # where the services reach Stripe (the keys proxy), set before start
    pg: Postgres = field(init=False)
    nats: NatsServer = field(init=False)
    localstripe: LocalStripe = field(init=False)
    services: dict[str, Supervised] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    _supervisor: asyncio.Task[None] | None = None
    _nats_turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one nats fault at a time
    _pg_turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.pg = Postgres(self.root / "pg" / "data")
        self.nats = NatsServer(self.root / "nats", sync_always=True)
        self.localstripe = LocalStripe(log=self.root / "localstripe.log")

    @property
    def database_url(self) -> str:
        return self.pg.url("boxoffice")

    @property
    def ingress_url(self) -> str:
        return self.services["ingress-0"].proc.url

    # -- start and stop -----------------------------------------------------------------------
    async def start_servers(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(asyncio.to_thread(self.pg.start, create_db="boxoffice"),
                             asyncio.to_thread(self.nats.start),
                             asyncio.to_thread(self.localstripe.start))
        await asyncio.to_thread(migrate.run, self.database_url, "up")

    async def start_services(self) -> None:
        env = base_env(self.nats.url, self.database_url, self.stripe_base)
        env.update({
            "RESERVATION_TTL_SECONDS": str(self.ttl_seconds),
            # Stripe's retries compressed to the run's scale (the default waits up to an hour)
            "WEBHOOK_RETRY_DELAYS": "0.5,1,2,4,8,15,30",
        })
        for name in INSTANCES:
            service = name.rsplit("-", 1)[0]
            e = dict(env)
            if service == "ingress":
                e.pop("DATABASE_URL", None)
                e.pop("STRIPE_API_KEY", None)
            e["ERROR_SPOOL_DIR"] = str(self.root / "spool" / name)
            proc = ServiceProcess(service, e, self.root / f"{name}.log")
            self.services[name] = Supervised(proc)
            proc.start(wait=False)
            self.services[name].started_at = time.monotonic()
        if missing := await self.wait_ready(60):
            raise RuntimeError(f"not ready at start: {missing}\n"
                               + "\n".join(self.log_tail(n) for n in missing))
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for s in self.services.values():
            if s.proc.proc is not None and s.proc.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.proc.pid, signal.SIGCONT)
                s.proc.kill()
        self.localstripe.stop()
        self.nats.kill()
        self.pg.stop()

    # -- supervision -----------------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Restart a service that died, with back-off (0.5 s, doubling to 5 s while it keeps
        dying)."""
        while True:
            now = time.monotonic()
            for name, s in self.services.items():
                if s.proc.running or now < s.next_start:
                    continue
                if s.next_start == 0.0:  # just noticed: wait the back-off first
                    lived = now - s.started_at
                    s.delay = RESTART_BACKOFF[0] if lived > 10 else min(s.delay * 2,
                                                                          RESTART_BACKOFF[1])
                    s.next_start = now + s.delay
                    continue
                s.proc.start(wait=False)
                s.started_at, s.next_start = time.monotonic(), 0.0
                self.restarts[name] += 1
            await asyncio.sleep(0.1)

    async def ready(self, name: str, session: aiohttp.ClientSession) -> bool:
        s = self.services[name]
        if not s.proc.running or s.stopped:
            return False
        try:
            async with session.get(f"{s.proc.url}/readyz",
                                   timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def not_ready(self) -> list[str]:
        async with aiohttp.ClientSession() as session:
            flags = await asyncio.gather(*(self.ready(n, session) for n in self.services))
        return [n for n, ok in zip(self.services, flags) if not ok]

    async def wait_ready(self, timeout: float) -> list[str]:
        """Wait until every service answers /readyz; returns those that never did."""
        missing: list[str] = []

        async def all_ready() -> bool:
            nonlocal missing
            missing = await self.not_ready()
            return not missing

        with contextlib.suppress(AssertionError):
            await eventually(all_ready, timeout=timeout, interval=0.2, what="every service ready")
        return missing

    # -- faults ----------------------------------------------------------------------------------
    def kill_service(self, name: str) -> None:
        s = self.services[name]
        if s.proc.proc is not None and s.proc.running:
            s.proc.kill()  # SIGKILL; works on a stopped process too

    async def pause_service(self, name: str, seconds: float) -> None:
        s = self.services[name]
        if s.proc.proc is None or not s.proc.running:
            return
        pid = s.proc.proc.pid
        s.stopped = True
        try:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(seconds)
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            s.stopped = False

    async def kill_nats(self, down: float) -> None:
        async with self._nats_turn:
            self.nats.kill()
            await asyncio.sleep(down)
            await asyncio.to_thread(self.nats.start)  # same port, same JetStream store

    def postgres_pids(self) -> list[int]:
        """The postmaster and every process it forked (same process group, or its children)."""
        assert self.pg.proc is not None
        master = self.pg.proc.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if fields[0] == "Z":
                continue
            pid, ppid, pgrp = int(entry), int(fields[1]), int(fields[2])
            if master in (pid, ppid, pgrp):
                found.append(pid)
        return found

    async def kill_postgres(self, down: float) -> int:
        """SIGKILL the postmaster and every backend at once, then restart on the same data
        directory (crash recovery); returns how many processes were killed."""
        async with self._pg_turn:
            return await self._kill_postgres(down)

    async def _kill_postgres(self, down: float) -> int:
        pids = self.postgres_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.pg.proc is not None
        await asyncio.to_thread(self.pg.proc.wait)
        await eventually(lambda: not any(_alive(p) for p in pids), timeout=10,
                         what="every PostgreSQL process gone")
        await asyncio.sleep(down)
        await asyncio.to_thread(self.pg.start, create_db=None)
        return len(pids)

    async def heal(self, timeout: float = 90.0) -> list[str]:
        """Everything running again: servers up, no service stopped, every service ready."""
        for s in self.services.values():
            if s.proc.proc is not None and s.proc.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.proc.pid, signal.SIGCONT)
            s.stopped = False
        if not self.nats.running:
            await asyncio.to_thread(self.nats.start)
        if not self.pg.running:
            await asyncio.to_thread(self.pg.start, create_db=None)
        return await self.wait_ready(timeout)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        return self.services[name].proc.logs()[-chars:]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
