"""deploy/prometheus/alerts.yml: valid rules (promtool check rules), each alert firing past its
threshold and quiet below it on sample series (promtool test rules, tests/prometheus/), every
metric it names exported by some service, and the Grafana dashboard drawn from those metrics.

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/alerts.yml"
RULE_TESTS = ROOT / "tests/prometheus/alerts_test.yml"
DASHBOARD = ROOT / "deploy/grafana/boxoffice.json"
NOT_OURS = {"up", "time", "rate", "increase", "sum", "max", "by", "histogram_quantile", "le"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return path


def test_rules_are_valid() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_fires_on_its_sample_series_and_not_below_its_threshold() -> None:
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"


def _exported() -> set[str]:
    """Every metric name a boxoffice module declares (with a histogram's series names)."""
    names = set()
    for path in [*ROOT.glob("libs/boxoffice/**/*.py"), *ROOT.glob("services/**/*.py")]:
        for name in re.findall(r'"(boxoffice_[a-z0-9_]+)"', path.read_text()):
            names |= {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def _metrics_in(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(boxoffice_[a-z0-9_]+)", expr)}


def test_alerts_and_dashboard_name_only_metrics_that_exist() -> None:
    exported = _exported()
    rules = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in rules for r in g["rules"]):
        assert _metrics_in(rule["expr"]) <= exported, rule["alert"]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    for expr in exprs:
        assert _metrics_in(expr) <= exported, expr
    # the dashboard shows what the alerts watch
    watched = set().union(*(_metrics_in(r["expr"]) for g in rules for r in g["rules"]))
    shown = set().union(*(_metrics_in(e) for e in exprs))
    assert watched - shown == set(), "alerted on but not on the dashboard"


def _compose_observability() -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is required for this test: apt-get install docker-compose"
    r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "--profile",
                        "observability", "config"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_profile_observability_scrapes_every_service_on_its_health_port() -> None:
    cfg = _compose_observability()
    services = cfg["services"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    # every boxoffice service is scraped where it serves /metrics: its HEALTH_PORT
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    # found by DNS, one config per service: compose's DNS gives every replica of a service
    targets = {f"{name}:{sd['port']}" for job in prom["scrape_configs"]
               for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert all(sd["type"] == "A" for job in prom["scrape_configs"] for sd in job["dns_sd_configs"])
    health = {f"{name}:{spec['environment']['HEALTH_PORT']}" for name, spec in services.items()
              if "HEALTH_PORT" in spec.get("environment", {})}
    assert {"ingress:8085", "payment:8081", "webhook:8082", "error-sink:8083",
            "reaper:8084"} == health == targets
    # the files Prometheus and Grafana are given are the ones in the repository
    mounts = {}  # target -> source of the bind mounts (docker-compose v1 writes src:dst:mode)
    for volume in (v for s in ("prometheus", "grafana") for v in services[s]["volumes"]):
        source, target = ((volume["source"], volume["target"]) if isinstance(volume, dict)
                          else volume.split(":")[:2])
        if source.startswith("/"):
            mounts[target] = Path(source)
    assert mounts["/etc/prometheus"] == ROOT / "deploy/prometheus"
    assert (ROOT / "deploy/prometheus" / prom["rule_files"][0]) == RULES
    assert mounts["/var/lib/grafana/dashboards/boxoffice.json"] == DASHBOARD
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["uid"] == "prometheus"
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards/boxoffice.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"prometheus"}
    out = subprocess.run([promtool(), "check", "config", "prometheus.yml"],
                         cwd=ROOT / "deploy/prometheus", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_a_live_stack_with_the_deployed_configuration(
        start_service, localstripe, tmp_path: Path) -> None:
    """Debian's prometheus with deploy/prometheus/prometheus.yml (host names and ports the only
    change) scrapes every service, loads the alert rules, and none of them fires."""
    import time
    import urllib.parse
    import urllib.request

    from boxoffice.embedded import free_port

    procs = {"payment": start_service("payment", STRIPE_API_BASE=localstripe.url),
             "webhook": start_service("webhook", STRIPE_API_BASE=localstripe.url),
             "error-sink": start_service("error_sink"), "reaper": start_service("reaper"),
             "ingress": start_service("ingress")}
    # Each service's DNS lookup becomes its one address here, with the label DNS discovery sets
    # (there is no compose DNS on this machine); everything else is the deployed file.
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    prom["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in prom["scrape_configs"]:
        job["static_configs"] = [
            {"targets": [procs[name].health_url.removeprefix("http://")],
             "labels": {"__meta_dns_name": name}}
            for sd in job.pop("dns_sd_configs") for name in sd["names"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    shutil.copy(RULES, tmp_path / "alerts.yml")
    port = free_port()
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: apt-get install prometheus (.ci/run does)")
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)

    def api(path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]

    try:
        deadline = time.monotonic() + 30
        up: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                up = {r["metric"]["instance"]: r["value"][1]
                      for r in api("query", query='up{job="boxoffice"}')["result"]}
                built = api("query", query="boxoffice_build_info")["result"]
                if len(up) == 5 and set(up.values()) == {"1"} and len(built) == 5:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert len(up) == 5 and set(up.values()) == {"1"}, up
        assert {r["metric"]["compose_service"]
                for r in api("query", query='up{job="boxoffice"}')["result"]} == set(procs)
        assert {r["metric"]["service"] for r in built} == {
            "ingress", "payment", "webhook", "error_sink", "reaper"}
        lag = api("query", query="boxoffice_consumer_pending")["result"]
        assert {"webhook", "error-sink", "reaper"} <= {r["metric"]["durable"] for r in lag}
        rules = [r for g in api("rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {
            r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        firing = [a for a in api("alerts")["alerts"] if a["state"] == "firing"]
        assert firing == []
    finally:
        server.terminate()
        server.wait(10)
