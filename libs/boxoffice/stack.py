"""``boxoffice up``: the whole stack on one machine, and ``boxoffice status``.

Where ``NATS_URL``, ``DATABASE_URL`` or ``STRIPE_API_KEY`` is unset an embedded server is
started (nats-server with JetStream on disk and ``sync_interval: always``, PostgreSQL, the
localstripe emulator). Migrations are applied, a demo event seeded, each service started as its
own process and restarted with back-off when it dies. SIGINT or SIGTERM stops everything.

The embedded nats-server takes no anonymous connection: each service connects as its own user
(``boxoffice.bus_access``), with a random password kept in ``.boxoffice/secrets.env``; the
``.boxoffice/stack.env`` of local tools has the operator's ``NATS_URL`` and the reporter's
``NATS_REPORTER_URL``.

``BOXOFFICE_NATS_NODES=3`` runs three nats-servers on loopback in one cluster instead (each
with its own JetStream store under ``.boxoffice/nats/n<i>``): every ``NATS_URL`` lists the three,
and the services keep three copies of each stream (``NATS_STREAM_REPLICAS=3``), so the stack
carries on when any one node dies.

``BOXOFFICE_PG_STANDBY=1`` runs PostgreSQL as a primary and a synchronous streaming standby
(``boxoffice.embedded.PostgresPair``, data under ``.boxoffice/pg/a`` and ``.boxoffice/pg/b``):
every ``DATABASE_URL`` lists both with ``target_session_attrs=read-write``, and when the primary
dies the supervisor promotes the standby (the services reconnect to it), then makes the old
primary its standby afresh.

``BOXOFFICE_REPLICAS="payment=2,webhook=2"`` runs that many processes of a service (1 to
``MAX_REPLICAS``; a service not named runs once). Each replica is its own supervised process with
its own health port, listed by ``boxoffice status`` as ``payment``, ``payment-2``, ... The
consumers share their durable NATS consumers and the database decides who owns a row, so
replicas split the work rather than repeat it. Ingress replicas all listen on ``INGRESS_PORT``
(``INGRESS_REUSE_PORT=1``: SO_REUSEPORT, the kernel spreads connections between them) so that
clients, localstripe's webhooks and ``stack.env`` keep one address; each is checked on its own
health port.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from boxoffice import SERVICES, bus_access, migrate, roles
from boxoffice.embedded import (
    EXIT_GRACE,
    LocalStripe,
    NatsCluster,
    NatsServer,
    Postgres,
    PostgresPair,
    die_with_parent,
    free_port,
)

DEMO_EVENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://boxoffice.dev/demo-event"))
SENTRY_PROJECT_ID = 1
STACK_KEYS = ("INGRESS_URL", "NATS_URL", "NATS_REPORTER_URL", "DATABASE_URL", "STRIPE_API_BASE",
              "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "CLIENT_API_TOKEN", "ADMIN_API_TOKEN",
              "FRONTEND_SENTRY_DSN", "DEMO_EVENT_ID")
# what each service must not be given (ingress holds no database or Stripe credentials)
WITHHELD = {"ingress": ("DATABASE_URL", "STRIPE_API_KEY")}
NATS_NODES = ("1", "3")  # BOXOFFICE_NATS_NODES: one nats-server, or a cluster of three
PG_STANDBY = ("0", "1")  # BOXOFFICE_PG_STANDBY: PostgreSQL alone, or with a standby
MAX_REPLICAS = 8  # BOXOFFICE_REPLICAS: processes of one service, at most
KEEPER_STOP_WAIT = 15.0  # seconds a stop waits for a failover step under way, then stops the servers


def home() -> Path:
    return Path(os.environ.get("BOXOFFICE_HOME", ".boxoffice")).resolve()


def say(msg: str) -> None:
    # one write (print writes the text and its newline apart): the supervisor and the failover
    # thread (``_keep_pair``) both speak
    print(f"boxoffice: {msg}\n", end="", flush=True)


def _secrets(root: Path) -> dict[str, str]:
    """Tokens and signing secrets, generated once and kept in .boxoffice/secrets.env."""
    path = root / "secrets.env"
    values = read_env(path) if path.exists() else {}
    wanted = {"CLIENT_API_TOKEN": lambda: "cli_" + secrets.token_urlsafe(24),
              "ADMIN_API_TOKEN": lambda: "adm_" + secrets.token_urlsafe(24),
              "STRIPE_WEBHOOK_SECRET": lambda: "whsec_" + secrets.token_hex(24),
              "SENTRY_KEY": lambda: secrets.token_hex(16)}
    # each service's own PostgreSQL role (boxoffice.roles)
    wanted.update({roles.password_variable(s): lambda: secrets.token_urlsafe(24)
                   for s in roles.ROLES})
    # every user of the embedded nats-server (boxoffice.bus_access)
    wanted.update({bus_access.password_variable(u): bus_access.new_password
                   for u in bus_access.USERS})
    changed = False
    for key, make in wanted.items():
        if key not in values:
            values[key] = make()
            changed = True
    if changed:
        write_env(path, values)
    return values


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def write_env(path: Path, values: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    tmp.chmod(0o600)
    tmp.replace(path)


class ReplicasError(ValueError):
    """BOXOFFICE_REPLICAS is malformed; the message names it."""


def parse_replicas(text: str) -> dict[str, int]:
    """``"payment=2,webhook=2"`` -> a count for every service (1 where not named)."""
    counts = dict.fromkeys(SERVICES, 1)
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, count = (x.strip() for x in item.partition("="))
        if not eq or name not in counts or name in seen or not count.isdigit() \
                or not 1 <= int(count) <= MAX_REPLICAS:
            raise ReplicasError(
                f"BOXOFFICE_REPLICAS must be service=count pairs separated by commas "
                f"(e.g. payment=2,webhook=2), each service once among {', '.join(SERVICES)}, "
                f"each count 1 to {MAX_REPLICAS}")
        seen.add(name)
        counts[name] = int(count)
    return counts


def replica_name(service: str, index: int) -> str:
    """The first replica keeps the service's name; the others are ``service-<n>``."""
    return service if index == 1 else f"{service}-{index}"


@dataclass
class Proc:
    service: str
    name: str  # replica_name: what status, services.json and the log file call it
    env: dict[str, str]
    health_url: str
    log: Path
    proc: subprocess.Popen | None = None
    failures: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "boxoffice.cli", "run", self.service], env=self.env,
                stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()


@dataclass
class Stack:
    root: Path
    children: list = field(default_factory=list)  # embedded servers, in start order
    procs: list[Proc] = field(default_factory=list)
    pg_pair: PostgresPair | None = None  # BOXOFFICE_PG_STANDBY=1: promoted when its primary dies
    standby_restart_at: float = 0.0  # a dead standby is started again, at most every 10 s
    pg_retry_at: float = 0.0  # a failover step that failed is tried again from then
    pg_keeper: threading.Thread | None = None  # takes the failover steps (``_keep_pair``)
    # held by the failover thread while it takes a step; ``stop`` takes it so that no step starts
    # once the servers are being stopped
    pg_step: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)  # ``stop`` has begun
    servers_stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stopping.set()  # (also when the supervisor raised before its stop flag was set)
        for p in self.procs:
            if p.proc and p.proc.poll() is None:
                p.proc.terminate()
        deadline = time.monotonic() + 25
        for p in self.procs:
            if p.proc:
                try:
                    p.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait()
        # a failover step under way ends first (a copy still running after KEEPER_STOP_WAIT
        # fails once its servers stop), and none starts after it
        stepping = self.pg_step.acquire(timeout=KEEPER_STOP_WAIT)
        try:
            for child in reversed(self.children):
                child.stop()
        finally:
            if stepping:
                self.pg_step.release()
            # only now may the failover thread end: the servers it started are its children
            # (``die_with_parent``), sent SIGTERM when it ends
            self.servers_stopped.set()
            if self.pg_keeper is not None:
                self.pg_keeper.join(5)


def _seed_demo_event(pg_url: str) -> None:
    import asyncio

    from boxoffice.db import operator_connect

    async def seed() -> None:
        conn = await operator_connect(pg_url)
        try:
            exists = await conn.fetchval("SELECT 1 FROM ticketed_events WHERE id = $1",
                                         uuid.UUID(DEMO_EVENT_ID))
            if not exists:
                await conn.execute("SELECT create_ticketed_event($1, 'Demo concert', 1000, 4500, "
                                   "'eur', 20)", uuid.UUID(DEMO_EVENT_ID))
        finally:
            await conn.close()

    asyncio.run(seed())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


LOCK = "up.lock"


def _claim(root: Path) -> int | None:
    """Hold ``root``'s lock for the life of this process (the kernel lets it go however the
    process ends); None when another ``boxoffice up`` holds it."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def running(root: Path) -> int | None:
    """The pid of the ``boxoffice up`` running on ``root``, or None when none is."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def _since_start() -> float:
    """Seconds since this process started (Linux: its start time in /proc/self/stat, in clock
    ticks on the boot-time clock), so the ready line counts the interpreter's start and imports
    too, which on a busy machine take a second of their own."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def up() -> int:
    # the ready line counts from the command's start: interpreter, imports and servers included
    started = time.monotonic() - _since_start()
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    if _claim(root) is None:  # a second nats-server on the live JetStream store, a second
        pid = running(root)   # PostgreSQL on its data directory: refused before anything starts
        print(f"boxoffice up: a stack is already running on {root} (pid {pid}); stop it first, "
              "or set BOXOFFICE_HOME for another one", file=sys.stderr)
        return 1
    (root / "logs").mkdir(exist_ok=True)
    stop = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = Stack(root)
    env = dict(os.environ)
    keys = _secrets(root)
    try:
        standby = env.get("BOXOFFICE_PG_STANDBY", "").strip() or "0"
        if standby not in PG_STANDBY:  # refused before any server starts
            print("boxoffice up: configuration error: BOXOFFICE_PG_STANDBY must be 0 or 1",
                  file=sys.stderr)
            return 1
        try:
            replicas = parse_replicas(env.get("BOXOFFICE_REPLICAS", ""))
        except ReplicasError as exc:
            print(f"boxoffice up: configuration error: {exc}", file=sys.stderr)
            return 1
        nats_urls: dict[str, str] = {}  # the embedded nats-server's users' URLs
        if not env.get("NATS_URL"):
            nats = _start_nats(root, env.get("BOXOFFICE_NATS_NODES", "").strip() or "1",
                               {u: keys[bus_access.password_variable(u)]
                                for u in bus_access.USERS})
            if nats is None:
                return 1
            stack.children.append(nats)
            nats_urls = {u: nats.url_for(u) for u in bus_access.USERS}
            env["NATS_URL"] = nats.url  # the operator's, for stack.env only
            if isinstance(nats, NatsCluster):
                env.setdefault("NATS_STREAM_REPLICAS", str(len(nats.nodes)))
                say(f"nats-server cluster of {len(nats.nodes)} nodes (JetStream, streams "
                    f"replicated {env['NATS_STREAM_REPLICAS']} times, sync_interval always, a "
                    f"user per service) on {nats.address}")
            else:
                say(f"nats-server (JetStream, sync_interval always, a user per service) on "
                    f"{nats.address}")
        if not env.get("DATABASE_URL"):
            if standby == "1":
                pair = PostgresPair(root / "pg", (5432, 5433)).start()
                stack.children.append(pair)
                stack.pg_pair = pair
                env["DATABASE_URL"] = pair.url()
                say(f"PostgreSQL primary on 127.0.0.1:{pair.primary.port}, synchronous standby "
                    f"on 127.0.0.1:{pair.standby.port}")
            else:
                pg = Postgres(root / "pgdata", free_port(5432)).start()
                stack.children.append(pg)
                env["DATABASE_URL"] = pg.url()
                say(f"PostgreSQL on 127.0.0.1:{pg.port}")
        ls = None
        if not env.get("STRIPE_API_KEY"):
            ls = LocalStripe(free_port(8420), root / "logs" / "localstripe.log").start()
            stack.children.append(ls)
            env["STRIPE_API_KEY"] = "sk_test_boxoffice_local"
            env["STRIPE_API_BASE"] = ls.url
            say(f"localstripe on {ls.url}")
        env.setdefault("STRIPE_WEBHOOK_SECRET", keys["STRIPE_WEBHOOK_SECRET"])
        env.setdefault("CLIENT_API_TOKENS", keys["CLIENT_API_TOKEN"])
        env.setdefault("ADMIN_API_TOKENS", keys["ADMIN_API_TOKEN"])
        env.setdefault("SENTRY_INGEST_KEYS", keys["SENTRY_KEY"])
        env.setdefault("BOXOFFICE_ENV", "development")
        env.setdefault("ERROR_SPOOL_DIR", str(root / "spool"))
        port = int(env.get("INGRESS_PORT") or free_port(8080))
        env["INGRESS_PORT"] = str(port)
        ingress_url = f"http://127.0.0.1:{port}"

        result = migrate.run(env["DATABASE_URL"], "up", check=False)
        if result.returncode != 0:
            say(f"migrations failed: {result.stderr.strip() or result.stdout.strip()}")
            return 1
        say("migrations applied")
        from boxoffice import db

        db_passwords = {s: keys[roles.password_variable(s)] for s in roles.ROLES}
        try:  # each statement bounded (a synchronous standby down: said, not waited for)
            _seed_demo_event(env["DATABASE_URL"])
            roles.set_logins(env["DATABASE_URL"], db_passwords)
        except db.FAILURES as exc:  # (no server taking writes, among others)
            say("cannot seed the demo event or give the services' PostgreSQL roles their "
                f"logins: {type(exc).__name__}: {exc}")
            return 1
        if ls is not None:
            ls.configure_webhook(f"{ingress_url}/v1/webhooks/stripe",
                                 env["STRIPE_WEBHOOK_SECRET"].split(",")[0])

        for service in SERVICES:
            senv = {k: v for k, v in env.items() if k not in WITHHELD.get(service, ())}
            if service in nats_urls:  # its own NATS user; stack.env keeps the operator's URL
                senv["NATS_URL"] = nats_urls[service]
            if service in db_passwords:  # its own role; stack.env keeps the owner's URL
                senv["DATABASE_URL"] = roles.url_for(env["DATABASE_URL"], service,
                                                     db_passwords[service])
            if service == "ingress" and replicas[service] > 1:
                senv["INGRESS_REUSE_PORT"] = "1"  # one public address for every replica
            for index in range(1, replicas[service] + 1):
                name = replica_name(service, index)
                hp = free_port()  # ingress's serves its /metrics, off the public port
                renv = {**senv, "HEALTH_PORT": str(hp)}
                # each replica checked on its own port; a lone ingress on its public one
                health = f"{ingress_url}/readyz" if name == "ingress" and replicas[service] == 1 \
                    else f"http://127.0.0.1:{hp}/readyz"
                stack.procs.append(Proc(service, name, renv, health,
                                        root / "logs" / f"{name}.log"))
        if any(n > 1 for n in replicas.values()):
            say("replicas: " + ", ".join(f"{s}={n}" for s, n in replicas.items() if n > 1))
        for p in stack.procs:
            p.start()

        first_secret = env["STRIPE_WEBHOOK_SECRET"].split(",")[0]
        stack_env = {
            "INGRESS_URL": ingress_url, "NATS_URL": env["NATS_URL"],
            "NATS_REPORTER_URL": nats_urls.get(bus_access.REPORTER)
            or env.get("NATS_REPORTER_URL") or env["NATS_URL"],
            "DATABASE_URL": env["DATABASE_URL"], "STRIPE_API_BASE": env.get("STRIPE_API_BASE", ""),
            "STRIPE_API_KEY": env["STRIPE_API_KEY"], "STRIPE_WEBHOOK_SECRET": first_secret,
            "CLIENT_API_TOKEN": env["CLIENT_API_TOKENS"].split(",")[0],
            "ADMIN_API_TOKEN": env["ADMIN_API_TOKENS"].split(",")[0],
            "FRONTEND_SENTRY_DSN": f"http://{env['SENTRY_INGEST_KEYS'].split(',')[0]}@127.0.0.1:{port}/{SENTRY_PROJECT_ID}",
            "DEMO_EVENT_ID": DEMO_EVENT_ID,
        }
        write_env(root / "stack.env", stack_env)
        _write_pids(stack)
        return _supervise(stack, stop, ingress_url, started)
    finally:
        stack.stop()
        say("stopped")


def _start_nats(root: Path, nodes: str, passwords: dict[str, str]
                ) -> NatsServer | NatsCluster | None:
    """The embedded nats-server, or cluster of three (``nodes``: BOXOFFICE_NATS_NODES)."""
    if nodes not in NATS_NODES:
        print("boxoffice up: configuration error: BOXOFFICE_NATS_NODES must be 1 or 3",
              file=sys.stderr)
        return None
    if nodes == "1":
        return NatsServer(root / "nats", free_port(4222), sync_always=True,
                          passwords=passwords).start()
    return NatsCluster(root / "nats", int(nodes), ports=[4222, 4223, 4224], sync_always=True,
                       passwords=passwords).start()


def _supervise(stack: Stack, stop: dict, ingress_url: str, t0: float) -> int:
    announced = False
    if stack.pg_pair is not None:
        stack.pg_keeper = threading.Thread(target=_keep_pair, args=(stack, stop),
                                           name="pg-failover", daemon=True)
        stack.pg_keeper.start()
    while not stop["flag"]:
        now = time.monotonic()
        for p in stack.procs:
            if p.proc is not None and p.proc.poll() is not None:
                code = p.proc.returncode
                # back-off doubles with each quick death, reset after a minute of good health
                p.failures = p.failures + 1 if now - p.started_at < 60 else 1
                delay = min(0.5 * 2 ** (p.failures - 1), 30.0)
                say(f"{p.name} exited with {code}; restarting in {delay:.1f}s "
                    f"(log: {p.log})")
                p.proc = None
                p.restart_at = now + delay
            elif p.proc is None and now >= p.restart_at:
                p.start()
                p.restarts += 1
                _write_pids(stack)
        if not announced and all(p.proc is not None for p in stack.procs) \
                and all(_ready(p.health_url) for p in stack.procs) \
                and _ready(f"{ingress_url}/readyz"):
            announced = True
            say(f"ready in {time.monotonic() - t0:.1f}s; ingress listening on {ingress_url}")
            say(f"settings in {stack.root / 'stack.env'}; logs in {stack.root / 'logs'}")
        time.sleep(0.2)
    say("stopping")
    return 0


def _keep_pair(stack: Stack, stop: dict) -> None:
    """The failover steps in a thread of their own, so that the supervisor goes on restarting
    the services while one runs: making a standby afresh copies the whole database
    (``pg_basebackup``, minutes for a large one), and the supervisor used to wait for it.
    The servers a step starts are this thread's children (``die_with_parent``: sent SIGTERM when
    it ends), so it ends only once ``Stack.stop`` has stopped them: a standby gone before the
    services, and the primary's commits would wait for it until the services were killed.
    Nothing a step raises ends it."""
    try:
        while not stop["flag"]:
            with stack.pg_step:
                if stack.stopping.is_set():
                    break
                try:
                    _fail_over(stack)
                except Exception as exc:  # noqa: BLE001 - said if it can be; tried again
                    stack.pg_retry_at = time.monotonic() + 10
                    with contextlib.suppress(Exception):  # (stdout itself may be what failed)
                        say(f"PostgreSQL failover: {type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.2)
    finally:
        stack.servers_stopped.wait()


def _fail_over(stack: Stack) -> None:
    """Keep the pair going, one step of ``PostgresPair.next_step`` at a time: when its primary
    dies, promote the standby (only while it has every acknowledged commit; else start the
    primary again on its own data), then make the old primary afresh as the promoted one's
    standby (``pg_basebackup``: its data, which may hold transactions never acknowledged, is
    discarded; started as it was, it would be a second primary); when the standby dies, start
    it again (the primary's commits wait for it meanwhile), at most every 10 s. Whatever fails
    is said and tried again 10 s later; nothing here stops the stack. (Run by ``_keep_pair``'s
    thread; a standby's copy is bounded by pg_basebackup's timeout.)"""
    pair = stack.pg_pair
    if pair is None or time.monotonic() < stack.pg_retry_at:
        return
    step = pair.next_step()
    if step is None:
        return
    primary, standby = f"127.0.0.1:{pair.primary.port}", f"127.0.0.1:{pair.standby.port}"
    if step == pair.START_STANDBY:
        if time.monotonic() < stack.standby_restart_at:
            return
        stack.standby_restart_at = time.monotonic() + 10
    said = {
        pair.PROMOTE: (f"PostgreSQL primary on {primary} exited; promoting the standby",
                       "PostgreSQL primary now on {primary}"),
        pair.RESTART_PRIMARY: (f"PostgreSQL primary on {primary} exited and its standby may "
                               "lack some of its commits; starting the primary again on its "
                               "data", None),
        pair.START_STANDBY: (
            f"PostgreSQL standby on {standby} exited; starting it again"
            if (pair.standby.datadir / "standby.signal").exists() else
            f"making the old primary on {standby} the standby of {primary} (pg_basebackup)",
            "PostgreSQL standby on {standby} streams again; commits wait for it"),
        pair.MAKE_SYNCHRONOUS: (f"PostgreSQL standby on {standby} runs but may lack some of "
                                "the primary's commits; making the primary wait for it",
                                "PostgreSQL standby on {standby} streams; commits wait for it"),
    }
    before, after = said[step]
    say(before)
    try:
        pair.take_step(step)
    except Exception as exc:  # noqa: BLE001 - said, and tried again; the stack goes on
        # (a primary killed during the step fails it before it is reported dead: waited for,
        # by the pair's own handler already after the steps beside a primary)
        beside_primary = step in (pair.START_STANDBY, pair.MAKE_SYNCHRONOUS)
        primary_alive = pair.primary.running_after(0 if beside_primary else EXIT_GRACE)
        if primary_alive or not beside_primary:
            stack.pg_retry_at = time.monotonic() + 10  # (the primary died meanwhile: at once)
        node = pair.standby if primary_alive else pair.primary
        say(f"PostgreSQL failover step failed ({type(exc).__name__}: {str(exc)[:200]}); "
            f"tried again; see {node.log}")
        return
    if after:
        say(after.format(primary=f"127.0.0.1:{pair.primary.port}",
                         standby=f"127.0.0.1:{pair.standby.port}"))
    if step == pair.PROMOTE:
        stack.standby_restart_at = 0.0  # the old primary is made its standby next, at once


def _write_pids(stack: Stack) -> None:
    (stack.root / "services.json").write_text(json.dumps(
        {p.name: {"ready": p.health_url, "pid": p.proc.pid if p.proc else None,
                  "service": p.service}
         for p in stack.procs}, indent=2))


def status() -> int:
    path = home() / "services.json"
    if not path.exists() or running(home()) is None:
        print(f"no stack is running on {home()}: start one with `boxoffice up`", file=sys.stderr)
        return 2
    services = json.loads(path.read_text())
    bad = []
    for name, info in services.items():
        ok = _ready(info["ready"])
        print(f"{name:<13} {'ready' if ok else 'NOT READY':<10} pid {info.get('pid')!s:<8} "
              f"{info['ready']}")
        if not ok:
            bad.append(name)
    if bad:
        print(f"not ready: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
