"""Runs what docker-compose.yml describes, with real processes on this machine (no Docker engine).

``docker-compose config`` (every profile) gives the file as Docker sees it, interpolation
included. Every service then runs with exactly its command, environment and start order
(``depends_on`` and its conditions, health checks run as written); the runner changes only what
cannot be the same outside containers, and nothing else:

- host names and ports: each port a service listens on becomes a free port here, and
  ``<service>:<port>`` after ``//`` or ``@`` in any value becomes ``127.0.0.1:<that port>``;
- container paths: a mount target named in a value, or in a bind-mounted file (rewritten into a
  copy), becomes the directory standing in for it: named volumes are directories of the run.

Images are stood in for by what this machine has (tests/compose_images.py); an image the runner
does not know stops the run, so nothing in the file goes unproven silently.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from boxoffice.embedded import die_with_parent, free_port
from tests.compose_images import Image, image_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# each boxoffice service's name in docker-compose.yml
COMPOSE_NAMES = {"ingress": "ingress", "payment": "payment", "webhook": "webhook",
                 "error_sink": "error-sink", "reaper": "reaper"}

_HOST_REF = re.compile(r"(?P<pre>//|@)(?P<host>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<port>\d{1,5})\b")
_LOCAL = r"(?:127\.0\.0\.1|localhost|0\.0\.0\.0|\[::\]|::)"
_OWN_PORT = re.compile(rf"(?P<pre>{_LOCAL}['\"]?\s*[:,]\s*)(?P<port>\d{{1,5}})\b")
_KEYED_PORT = re.compile(r"(?P<pre>\b\w*port['\"]?\s*[:=]\s*['\"]?)(?P<port>\d{1,5})\b", re.I)


# Profiles left out of the run, each with why. ``observability``: its images (prom/prometheus,
# grafana/grafana) have no stand-in here (Grafana is no Debian package); tests/test_alerts.py
# checks the profile statically and runs Debian's prometheus with its configuration instead.
# ``cluster``: three nats nodes in one cluster, which only deploy/nats/cluster.env configures.
NOT_RUN = {"observability": "Prometheus and Grafana images: checked by tests/test_alerts.py",
           # only with deploy/nats/cluster.env (its nodes would run here as three lone servers)
           "cluster": "nats-2 and nats-3, checked by tests/test_compose.py; the cluster itself "
                      "runs in tests/test_nats_cluster.py"}


def compose_config(overrides: dict[str, str] | None = None, *, options: tuple[str, ...] = (),
                   every_profile: bool = True) -> dict[str, Any]:
    """``docker-compose config`` with every profile on (but ``NOT_RUN``), interpolated from
    ``overrides`` alone; with ``every_profile=False``, what a plain ``docker-compose up`` runs;
    ``options`` go before ``config`` (e.g. ``--env-file``)."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is required for this test: apt-get install docker-compose"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", **(overrides or {})}

    def run(*args: str) -> str:
        r = subprocess.run([exe, "-f", str(COMPOSE_FILE), *options, *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    if not every_profile:
        return yaml.safe_load(run("config"))
    profiles = [p for p in run("config", "--profiles").split() if p not in NOT_RUN]
    cfg = yaml.safe_load(run(*[a for p in profiles for a in ("--profile", p)], "config"))
    left_out = {name for name, spec in cfg["services"].items()
                if set(spec.get("profiles") or ()) & set(NOT_RUN)}

    def named_volumes(names: set[str]) -> set[str]:
        out = set()
        for name in names:
            for v in cfg["services"][name].get("volumes", []):
                source = v.get("source", "") if isinstance(v, dict) else v.split(":")[0]
                if source and not source.startswith(("/", ".")):
                    out.add(source)
        return out

    kept = set(cfg["services"]) - left_out
    only_theirs = named_volumes(left_out) - named_volumes(kept)
    cfg["services"] = {name: cfg["services"][name] for name in cfg["services"] if name in kept}
    cfg["volumes"] = {k: v for k, v in (cfg.get("volumes") or {}).items() if k not in only_theirs}
    return cfg


def seconds(value: str | int | float | None, default: float) -> float:
    """A compose duration (``1m30s``, ``500ms``, ``5s``) in seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|us|h|m|s)", value))


@dataclass
class Mount:
    target: str
    host: Path
    kind: str  # volume, bind, tmpfs, secret
    source: str = ""
    read_only: bool = False


def mounts_of(spec: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(kind, source, target, read_only) for each entry of a service's ``volumes``."""
    out = []
    for v in spec.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("type", "volume"), v.get("source", ""), v["target"],
                        bool(v.get("read_only"))))
            continue
        parts = v.split(":")
        if len(parts) == 1:
            out.append(("volume", "", parts[0], False))
            continue
        source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "rw")
        kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        out.append((kind, source, target, "ro" in mode.split(",")))
    return out


@dataclass
class Container:
    """One service of the file, as a process here."""

    name: str
    spec: dict[str, Any]
    image: Image
    log: Path
    mounts: list[Mount] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    state: str = "pending"  # pending, running, healthy, unhealthy, exited, blocked
    reason: str = ""
    exit_code: int | None = None
    run_as: str | None = None  # the user its process runs as here (None: this machine's)
    last_probe: float = 0.0
    times: dict[str, float] = field(default_factory=dict)

    @property
    def healthcheck(self) -> dict[str, Any] | None:
        hc = self.spec.get("healthcheck")
        if not hc or hc.get("disable") or hc.get("test") in (None, ["NONE"]):
            return None
        return hc


class ComposeStack:
    """The services of a loaded compose file, run with real processes under ``run_dir``."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path):
        self.cfg = cfg
        self.dir = run_dir
        self.events: list[tuple[float, str, str]] = []
        self.images = {name: image_for(name, spec, ROOT) for name, spec in cfg["services"].items()}
        self.ports = self._allocate_ports()
        self.volumes: dict[str, Path] = {}
        self.secrets: dict[str, Path] = {}
        self.containers: dict[str, Container] = {}
        for name, spec in cfg["services"].items():
            c = Container(name, spec, self.images[name], run_dir / "logs" / f"{name}.log")
            c.mounts = self._mount(c)
            self.containers[name] = c
        for c in self.containers.values():
            c.env = {k: self.env_value(c.name, str(v))
                     for k, v in (c.spec.get("environment") or {}).items() if v is not None}
            c.argv = [self.rewrite(c.name, a) for a in c.image.argv(c.spec)]

    # -- ports and paths -------------------------------------------------------------------
    def _own_ports(self) -> dict[str, set[int]]:
        own: dict[str, set[int]] = {name: set() for name in self.cfg["services"]}
        for name, spec in self.cfg["services"].items():
            for p in spec.get("ports", []):
                own[name].add(int(p["target"]) if isinstance(p, dict)
                              else int(str(p).split(":")[-1].split("/")[0]))
            own[name].update(int(p) for p in spec.get("expose", []))
            for m in _OWN_PORT.finditer(" ".join(spec.get("healthcheck", {}).get("test", []))):
                own[name].add(int(m["port"]))
            for value in _values(spec):
                for m in _HOST_REF.finditer(value):
                    if m["host"] in own:
                        own[m["host"]].add(int(m["port"]))
        for name in self.cfg["services"]:
            own[name].update(self.images[name].default_ports)
        return own

    def _allocate_ports(self) -> dict[tuple[str, int], int]:
        return {(name, p): free_port() for name, ports in self._own_ports().items() for p in ports}

    def port(self, service: str, container_port: int) -> int:
        """The port here that stands for ``service:container_port``."""
        return self.ports[(service, container_port)]

    def _mount(self, c: Container) -> list[Mount]:
        mounts = []
        for kind, source, target, ro in mounts_of(c.spec):
            if kind == "bind":
                host = Path(source)
                assert host.exists(), f"{c.name}: bind mount source {source} does not exist"
            else:
                if kind == "volume" and source:
                    assert source in (self.cfg.get("volumes") or {}), \
                        f"{c.name}: volume {source} is not declared under volumes:"
                    host = self.volumes.setdefault(source, self.dir / "volumes" / source)
                else:  # an anonymous volume or a tmpfs: the container's own
                    host = self.dir / "containers" / c.name / target.strip("/").replace("/", "_")
                host.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(target, host, kind, source, ro))
        for s in c.spec.get("secrets", []):
            source = s if isinstance(s, str) else s["source"]
            target = (s.get("target") if isinstance(s, dict) else None) or source
            mounts.append(Mount(target if target.startswith("/") else f"/run/secrets/{target}",
                                self._secret(source), "secret", source, True))
        return mounts

    def _secret(self, name: str) -> Path:
        if name not in self.secrets:
            spec = (self.cfg.get("secrets") or {}).get(name)
            assert spec, f"secret {name} is not declared under secrets:"
            assert "file" in spec, f"secret {name}: only file secrets are run here"
            path = Path(spec["file"])
            assert path.is_file(), f"secret {name}: {path} does not exist"
            self.secrets[name] = path
        return self.secrets[name]

    def host_path(self, service: str, container_path: str) -> Path | None:
        """Where ``container_path`` of ``service`` lives here (None: in the container's layer)."""
        for m in sorted(self.containers[service].mounts, key=lambda m: -len(m.target)):
            if container_path == m.target or container_path.startswith(m.target.rstrip("/") + "/"):
                return Path(str(m.host) + container_path[len(m.target.rstrip("/")):])
        return None

    def rewrite(self, service: str, text: str) -> str:
        """``text`` as ``service`` sees it here: ports, other services' addresses, mount paths."""
        own = {p: here for (s, p), here in self.ports.items() if s == service}
        if text.strip().isdigit() and int(text) in own:
            return str(own[int(text)])

        def own_port(m: re.Match[str]) -> str:
            p = int(m["port"])
            return m["pre"] + str(own[p]) if p in own else m[0]

        text = _KEYED_PORT.sub(own_port, _OWN_PORT.sub(own_port, text))

        def other(m: re.Match[str]) -> str:
            key = (m["host"], int(m["port"]))
            return f"{m['pre']}127.0.0.1:{self.ports[key]}" if key in self.ports else m[0]

        text = _HOST_REF.sub(other, text)
        c = self.containers.get(service)
        if c is None or not c.mounts:
            return text
        by_target = {m.target.rstrip("/"): m for m in c.mounts}
        pattern = "|".join(re.escape(t) for t in sorted(by_target, key=len, reverse=True))
        return re.sub(rf"(?<![\w.-])(?:{pattern})(?![\w.-])",
                      lambda m: str(self._mounted_file(c, by_target[m[0]])), text)

    def env_value(self, service: str, value: str) -> str:
        """A variable as ``service`` gets it here: rewritten, and a path of the container's own
        filesystem (on no mount) moved into a directory of that container, never this machine's."""
        if re.fullmatch(r"/[^\s:,;]*", value) and self.host_path(service, value) is None:
            return str(self.dir / "containers" / service / "layer" / value.lstrip("/"))
        return self.rewrite(service, value)

    def _mounted_file(self, c: Container, m: Mount) -> Path:
        """A bind-mounted file is read by its program: its copy has this run's ports and paths."""
        if m.kind != "bind" or not m.host.is_file():
            return m.host
        copy = self.dir / "files" / c.name / m.target.strip("/").replace("/", "_")
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(self.rewrite(c.name, m.host.read_text()))
        return copy

    # -- running ---------------------------------------------------------------------------
    def _record(self, c: Container, what: str) -> None:
        now = time.monotonic()
        c.times.setdefault(what.split()[0], now)
        self.events.append((now, c.name, what))

    def _condition(self, dep: str, condition: str) -> str:
        """'met', 'wait' or why it never will be."""
        d = self.containers[dep]
        if d.state == "blocked":
            return f"{dep} was not started"
        if condition == "service_started":
            return "met" if d.state != "pending" else "wait"
        if condition == "service_healthy":
            if not d.healthcheck:
                return f"{dep} has no health check"
            if "healthy" in d.times:
                return "met"
            if d.state in ("exited", "unhealthy"):
                return f"{dep} is {d.state} ({d.reason or d.exit_code})"
            return "wait"
        if condition == "service_completed_successfully":
            if d.state == "exited":
                return "met" if d.exit_code == 0 else f"{dep} exited with {d.exit_code}"
            return "wait"
        raise AssertionError(f"unknown depends_on condition {condition}")

    def _start(self, c: Container) -> None:
        c.log.parent.mkdir(parents=True, exist_ok=True)
        c.image.prepare(c, self)
        env = {**c.image.env(c, self), **c.env}
        with open(c.log, "ab") as out:
            c.proc = subprocess.Popen(c.image.resolve(c.argv, c, self), env=env,
                                      cwd=c.image.workdir(c, self), stdout=out,
                                      stderr=subprocess.STDOUT, user=c.run_as,
                                      start_new_session=True, preexec_fn=die_with_parent)
        c.state = "running"
        self._record(c, "started")

    def probe(self, c: Container) -> subprocess.CompletedProcess[str]:
        """Run the service's health check command here, as Docker runs it in the container."""
        hc = c.healthcheck
        assert hc is not None, f"{c.name} has no healthcheck"
        test = [self.rewrite(c.name, a) for a in hc["test"]]
        argv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
        env = {**c.image.env(c, self), **c.env, **c.image.health_env(c, self)}
        env_path = env.get("PATH")
        argv = [shutil.which(argv[0], path=env_path) or argv[0], *argv[1:]]
        try:
            return subprocess.run(argv, env=env, cwd=c.image.workdir(c, self),
                                  capture_output=True, text=True,
                                  timeout=seconds(hc.get("timeout"), 30))
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out: {exc}")

    def _step(self, c: Container, now: float) -> None:
        if c.state == "pending":
            verdicts = {dep: self._condition(dep, cond.get("condition", "service_started"))
                        for dep, cond in (c.spec.get("depends_on") or {}).items()}
            never = {d: v for d, v in verdicts.items() if v not in ("met", "wait")}
            if never:
                c.state, c.reason = "blocked", "; ".join(never.values())
                self._record(c, f"blocked: {c.reason}")
            elif all(v == "met" for v in verdicts.values()):
                self._start(c)
            return
        if c.state not in ("running", "healthy"):
            return
        assert c.proc is not None
        if c.proc.poll() is not None:
            c.state, c.exit_code = "exited", c.proc.returncode
            self._record(c, f"exited {c.exit_code}")
            return
        hc = c.healthcheck
        if c.state == "running" and hc and now - c.last_probe >= 0.25:
            c.last_probe = now
            if self.probe(c).returncode == 0:
                c.state = "healthy"
                self._record(c, "healthy")
            elif now - c.times["started"] > (seconds(hc.get("start_period"), 0) + seconds(
                    hc.get("interval"), 30) * int(hc.get("retries", 3))):
                c.state, c.reason = "unhealthy", "health check kept failing"
                self._record(c, "unhealthy")

    def settled(self) -> bool:
        return not any(c.state == "pending" or (c.state == "running" and c.healthcheck)
                       for c in self.containers.values())

    def up(self, timeout: float = 120.0) -> None:
        """Start everything the file says, in its order; return once nothing more will change
        (every service healthy, exited, or not started because a condition failed)."""
        deadline = time.monotonic() + timeout
        while not self.settled():
            now = time.monotonic()
            assert now < deadline, f"not settled after {timeout:g}s: {self.states()}\n" + \
                "\n".join(f"--- {c.name}\n{self.log_tail(c)}" for c in self.containers.values()
                          if c.state in ("running", "unhealthy", "exited"))
            for c in self.containers.values():
                self._step(c, now)
            time.sleep(0.05)

    @staticmethod
    def log_tail(c: Container, size: int = 2000) -> str:
        return c.log.read_text(errors="replace")[-size:] if c.log.exists() else "(no log)"

    def states(self) -> dict[str, str]:
        return {n: c.state + (f" ({c.reason})" if c.reason else "")
                for n, c in self.containers.items()}

    def down(self) -> dict[str, int | None]:
        """Stop in reverse start order, as ``docker compose down``: the image's stop signal,
        then SIGKILL after ``stop_grace_period``. Returns each exit code (negative: killed)."""
        codes: dict[str, int | None] = {}
        started = sorted((c for c in self.containers.values() if c.proc is not None),
                         key=lambda c: c.times["started"], reverse=True)
        for c in started:
            assert c.proc is not None
            if c.proc.poll() is None:
                c.proc.send_signal(c.image.stop_signal)
                try:
                    c.proc.wait(seconds(c.spec.get("stop_grace_period"), 10))
                except subprocess.TimeoutExpired:
                    c.proc.send_signal(signal.SIGKILL)
                    c.proc.wait()
                    c.reason = "killed after stop_grace_period"
            codes[c.name] = c.proc.returncode
        return codes


def _values(spec: dict[str, Any]) -> list[str]:
    """Every string of a service spec a program reads: environment, command, entrypoint."""
    out = [str(v) for v in (spec.get("environment") or {}).values() if v is not None]
    for key in ("command", "entrypoint"):
        v = spec.get(key) or []
        out.extend([v] if isinstance(v, str) else [str(a) for a in v])
    return out
