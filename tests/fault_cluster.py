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
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from boxoffice import migrate
from boxoffice.embedded import LocalStripe, NatsCluster, NatsServer, Postgres, PostgresPair
from tests.harness import ServiceProcess, base_env, eventually, process_alive

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
    nats_nodes: int = 1  # or a cluster of three, every stream replicated three times
    pg_standby: bool = False  # PostgreSQL alone, or a primary and its synchronous standby
    stripe_base: str = ""  # where the services reach Stripe (the keys proxy), set before start
    pg: Postgres | PostgresPair = field(init=False)
    nats: NatsServer | NatsCluster = field(init=False)
    localstripe: LocalStripe = field(init=False)
    services: dict[str, Supervised] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    _supervisor: asyncio.Task[None] | None = None
    _nats_turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one nats fault at a time
    _pg_turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.pg_standby:
            # not under pytest's basetemp (tests/test_pg_failover.py says why); the logs are
            # copied there at the end
            self.pg = PostgresPair(Path(tempfile.mkdtemp(prefix="boxoffice-fault-pg-")) / "pg")
        else:
            self.pg = Postgres(self.root / "pg" / "data")
        self.nats = (NatsServer(self.root / "nats", sync_always=True) if self.nats_nodes == 1
                     else NatsCluster(self.root / "nats", self.nats_nodes, sync_always=True))
        self.localstripe = LocalStripe(log=self.root / "localstripe.log")

    @property
    def database_url(self) -> str:
        return self.pg.url("boxoffice")

    @property
    def pg_targets(self) -> tuple[str, ...]:
        """What a PostgreSQL fault may do with a pair: crash the primary and restart it, crash
        the standby and restart it, or fail over (crash the primary, promote the standby, make
        the old primary its standby afresh); nothing to name with one server."""
        return ("primary", "standby", "failover") if self.pg_standby else ()

    def _pg_nodes(self) -> list[Postgres]:
        return list(self.pg.nodes.values()) if isinstance(self.pg, PostgresPair) else [self.pg]

    @property
    def nats_servers(self) -> list[str]:
        """The URLs of every node, as a NATS client takes them."""
        return self.nats.url.split(",")

    @property
    def nats_targets(self) -> tuple[str, ...]:
        """What a nats fault may kill in a cluster: one node (by name), or all of them; none
        to name with one server."""
        if isinstance(self.nats, NatsServer):
            return ()
        return (*(n.cluster.server_name for n in self.nats.nodes if n.cluster), "all")

    def _nats_down(self, target: str) -> list[NatsServer]:
        if isinstance(self.nats, NatsServer):
            return [self.nats]
        return [n for n in self.nats.nodes
                if target == "all" or (n.cluster and n.cluster.server_name == target)]

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
        if self.nats_nodes > 1:
            env["NATS_STREAM_REPLICAS"] = str(self.nats_nodes)
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
        if isinstance(self.pg, PostgresPair):
            for name, node in self.pg.nodes.items():
                with contextlib.suppress(OSError):
                    shutil.copy(node.log, self.root / f"postgres-{name}.log")
            shutil.rmtree(self.pg.root.parent, ignore_errors=True)

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
                try:
                    s.proc.start(wait=False)
                except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any start
                    print(f"supervisor: {name} not started ({type(exc).__name__}: {exc}); "
                          f"next try in {s.delay:g} s")
                    s.next_start = time.monotonic() + s.delay
                    continue
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

    async def kill_nats(self, down: float, target: str = "nats") -> None:
        """SIGKILL the server (or a node of the cluster, or all three), then start it again on
        the same port and JetStream store after ``down`` seconds."""
        async with self._nats_turn:
            nodes = self._nats_down(target)
            for node in nodes:
                node.kill()
            await asyncio.sleep(down)
            for node in nodes:
                await asyncio.to_thread(node.start)

    def postgres_pids(self, server: Postgres | None = None) -> list[int]:
        """The postmaster and every process it forked (same process group, or its children)."""
        server = server or self._pg_nodes()[0]
        assert server.proc is not None
        master = server.proc.pid
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

    async def kill_postgres(self, down: float, target: str = "postgres") -> int:
        """SIGKILL the postmaster and every backend at once, then restart on the same data
        directory (crash recovery); returns how many processes were killed. With a pair,
        ``target`` is one of ``pg_targets``: the primary or the standby so, or a failover."""
        async with self._pg_turn:
            if not isinstance(self.pg, PostgresPair):
                return await self._kill_postgres(self.pg, down)
            # then the pair made whole as ``boxoffice up``'s supervisor would, by the same
            # steps (``PostgresPair.next_step``): a failover promotes the standby only while it
            # has every acknowledged commit, else the primary's crash recovery
            node = self.pg.standby if target == "standby" else self.pg.primary
            killed = await self._kill_postgres(node, down, restart=target == "primary")
            await asyncio.to_thread(self.pg.recover)
            return killed

    async def _kill_postgres(self, server: Postgres, down: float, restart: bool = True) -> int:
        pids = self.postgres_pids(server) if server.running else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if server.proc is not None:
            await asyncio.to_thread(server.proc.wait)
        await eventually(lambda: not any(process_alive(p) for p in pids), timeout=10,
                         what="every PostgreSQL process gone")
        await asyncio.sleep(down)
        if restart:
            await asyncio.to_thread(server.start, create_db=None)
        return len(pids)

    async def heal(self, timeout: float = 90.0) -> list[str]:
        """Everything running again: servers up, no service stopped, every service ready."""
        for s in self.services.values():
            if s.proc.proc is not None and s.proc.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.proc.pid, signal.SIGCONT)
            s.stopped = False
        for node in self._nats_down("all"):
            if not node.running:
                await asyncio.to_thread(node.start)
        if isinstance(self.pg, PostgresPair):  # as ``boxoffice up``'s supervisor would
            await asyncio.to_thread(self.pg.recover)
        elif not self.pg.running:
            await asyncio.to_thread(self.pg.start, create_db=None)
        return await self.wait_ready(timeout)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        return self.services[name].proc.logs()[-chars:]

