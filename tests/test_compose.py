"""docker-compose.yml checked statically (no Docker engine here): `docker-compose config`
accepts it, it names the whole stack, and each service's command and variables match what the
code reads (boxoffice.config.REQUIRED / OPTIONAL)."""

from __future__ import annotations

import subprocess

from boxoffice import SERVICES, bus_access, config
from boxoffice.embedded import venv_bin
from tests.compose_support import COMPOSE_NAMES, ROOT, compose_config

DB_SERVICES = {"payment", "webhook", "error_sink", "reaper"}


def test_compose_names_the_whole_stack() -> None:
    cfg = compose_config(every_profile=False)
    names = set(cfg["services"])
    assert {"nats", "postgres", "localstripe", "migrate", *COMPOSE_NAMES.values()} <= names
    for name in ["nats", "postgres", "localstripe", *COMPOSE_NAMES.values()]:
        assert "healthcheck" in cfg["services"][name], name


def test_each_service_command_and_variables_match_the_code() -> None:
    cfg = compose_config(every_profile=False)
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
    cfg = compose_config(every_profile=False)
    assert cfg["services"]["migrate"]["command"] == ["migrate"]
    assert "DATABASE_URL" in cfg["services"]["migrate"]["environment"]
    nats = cfg["services"]["nats"]
    assert any("deploy/nats/nats.conf" in str(v) for v in nats["volumes"])
    conf = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    assert "jetstream" in conf and "sync_interval: always" in conf


def test_dockerfile_installs_the_pinned_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in text and 'ENTRYPOINT ["boxoffice"]' in text


def test_cluster_profile_runs_three_nats_nodes_and_the_services_use_them() -> None:
    single = compose_config(every_profile=False)
    assert single["services"]["nats"]["command"] == ["-c", "/etc/nats/nats.conf"]
    cfg = compose_config(options=("--env-file", "deploy/nats/cluster.env"), every_profile=False)
    nodes = {name: cfg["services"][name] for name in ("nats", "nats-2", "nats-3")}
    for name in ("nats-2", "nats-3"):
        assert nodes[name]["profiles"] == ["cluster"]
    assert {n["environment"]["NATS_SERVER_NAME"] for n in nodes.values()} == set(nodes)
    assert len({v for n in nodes.values() for v in n["volumes"] if v.endswith(":/data:rw")}) == 3
    for node in nodes.values():
        assert node["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert all(f"@{other}:6222" in node["environment"]["NATS_ROUTES"] for other in nodes)
        # the node's configuration as nats-server reads it, from its environment in compose
        r = subprocess.run([venv_bin("nats-server"), "-t", "-c", "cluster.conf"],
                           cwd=ROOT / "deploy" / "nats", capture_output=True, text=True,
                           env={k: str(v) for k, v in node["environment"].items()}, timeout=30)
        assert r.returncode == 0, r.stderr
    for service in SERVICES:
        env = cfg["services"][COMPOSE_NAMES[service]]["environment"]
        loaded = config.load(service, {k: (v or "") for k, v in env.items()})
        servers = loaded.nats_url.split(",")
        assert [s.rpartition("@")[2] for s in servers] == [
            "nats:4222", "nats-2:4222", "nats-3:4222"]
        assert {bus_access.user_of(s) for s in servers} == {service}
        assert loaded.nats_stream_replicas == 3
        single_env = single["services"][COMPOSE_NAMES[service]]["environment"]
        assert config.load(service, {k: (v or "") for k, v in single_env.items()}
                           ).nats_stream_replicas == 1


def test_services_scale_with_docker_compose() -> None:
    """`docker compose up --scale payment=2` (and webhook, error-sink, reaper): no service names
    its container, and only ingress publishes a host port, which two replicas could not share."""
    cfg = compose_config(every_profile=True)
    for name, spec in cfg["services"].items():
        assert "container_name" not in spec, name
    for service in SERVICES:
        spec = cfg["services"][COMPOSE_NAMES[service]]
        assert bool(spec.get("ports")) == (service == "ingress"), service
