"""docker-compose.yml checked statically (no Docker engine here): `docker-compose config`
accepts it, it names the whole stack, and each service's command and variables match what the
code reads (boxoffice.config.REQUIRED / OPTIONAL)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from boxoffice import SERVICES, config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_NAMES = {"ingress": "ingress", "payment": "payment", "webhook": "webhook",
                 "error_sink": "error-sink", "reaper": "reaper"}
DB_SERVICES = {"payment", "webhook", "error_sink", "reaper"}


def compose_config() -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is required for this test: apt-get install docker-compose"
    r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_names_the_whole_stack() -> None:
    cfg = compose_config()
    names = set(cfg["services"])
    assert {"nats", "postgres", "localstripe", "migrate", *COMPOSE_NAMES.values()} <= names
    for name in ["nats", "postgres", "localstripe", *COMPOSE_NAMES.values()]:
        assert "healthcheck" in cfg["services"][name], name


def test_each_service_command_and_variables_match_the_code() -> None:
    cfg = compose_config()
    for service in SERVICES:
        spec = cfg["services"][COMPOSE_NAMES[service]]
        assert spec["command"] == ["run", service]
        env = set(spec.get("environment", {}))
        required = set(config.REQUIRED[service])
        known = required | set(config.OPTIONAL[service]) | set(config.COMMON_OPTIONAL)
        assert required <= env, f"{service} lacks {required - env}"
        assert env <= known, f"{service} sets variables the code never reads: {env - known}"
        # the configuration it is given must load
        values = {k: (v or "") for k, v in spec["environment"].items()}
        loaded = config.load(service, values)
        port = loaded.ingress_port if service == "ingress" else loaded.health_port
        assert str(port) in " ".join(spec["healthcheck"]["test"])
        depends = spec.get("depends_on", {})
        assert depends.get("nats", {}).get("condition") == "service_healthy"
        if service in DB_SERVICES:
            assert depends["migrate"]["condition"] == "service_completed_successfully"
    ingress_env = cfg["services"]["ingress"]["environment"]
    assert "DATABASE_URL" not in ingress_env and "STRIPE_API_KEY" not in ingress_env


def test_migrate_step_and_nats_configuration() -> None:
    cfg = compose_config()
    assert cfg["services"]["migrate"]["command"] == ["migrate"]
    assert "DATABASE_URL" in cfg["services"]["migrate"]["environment"]
    nats = cfg["services"]["nats"]
    assert any("deploy/nats/nats.conf" in str(v) for v in nats["volumes"])
    conf = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    assert "jetstream" in conf and "sync_interval: always" in conf


def test_dockerfile_installs_the_pinned_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in text and 'ENTRYPOINT ["boxoffice"]' in text
