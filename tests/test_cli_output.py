"""The CLI for people and scripts: tables (``--table``, the default on a terminal) or JSON
(``--json``, the default into a pipe), ``--version``, ``boxoffice status`` with no stack, and
``boxoffice up`` refusing a second instance on the same home."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from boxoffice import __version__
from tests.harness import ADMIN_TOKEN


def boxoffice(*args: str, home: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if k not in ("INGRESS_URL", "ADMIN_API_TOKEN", "NATS_URL", "DATABASE_URL")}
    if home is not None:
        e["BOXOFFICE_HOME"] = str(home)
    e.update(env, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", *args], env=e,
                          capture_output=True, text=True, timeout=60)


def test_version() -> None:
    out = boxoffice("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"boxoffice {__version__}")


def test_answers_as_tables_for_people_and_json_for_scripts(start_service, tmp_path: Path) -> None:
    start_service("payment")
    start_service("reaper")
    start_service("error_sink")
    ingress = start_service("ingress")
    env = {"INGRESS_URL": ingress.url, "ADMIN_API_TOKEN": ADMIN_TOKEN}

    out = boxoffice("events", "create", "--name", "Table Talk", "--capacity", "7", "--price",
                    "1500", "--json", home=tmp_path, **env)
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["capacity"] == 7

    # a record: a table of its fields
    out = boxoffice("--table", "events", "show", created["id"], home=tmp_path, **env)
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in out.stdout.splitlines() if line.count("│") == 3}
    assert rows["name"] == "Table Talk" and rows["available"] == "7", out.stdout
    with __import__("pytest").raises(json.JSONDecodeError):
        json.loads(out.stdout)
    # a list of records: a row each, under its name
    out = boxoffice("reaper", "runs", "--table", home=tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.lstrip().startswith("runs") or "runs: none" in out.stdout, out.stdout
    # into a pipe, without a flag: JSON, as scripts have always read it
    out = boxoffice("events", "show", created["id"], home=tmp_path, **env)
    assert json.loads(out.stdout) == json.loads(json.dumps(created))
    # both at once is refused
    out = boxoffice("--json", "events", "show", created["id"], "--table", home=tmp_path, **env)
    assert out.returncode == 2 and "conflicting" in out.stderr


def test_status_says_when_no_stack_is_running(tmp_path: Path) -> None:
    out = boxoffice("status", home=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"no stack is running on {tmp_path}: start one with "
                                  "`boxoffice up`")
    # a stack that stopped leaves its services.json; no `boxoffice up` holds the home: none runs
    (tmp_path / "services.json").write_text(json.dumps(
        {"payment": {"pid": 1, "ready": "http://127.0.0.1:1/readyz"}}))
    (tmp_path / "up.lock").write_text("12345")
    out = boxoffice("status", home=tmp_path)
    assert out.returncode == 2 and "no stack is running" in out.stderr


def test_up_refuses_a_second_instance_on_the_same_home(tmp_path: Path) -> None:
    """While a ``boxoffice up`` holds the home (its lock), another refuses at once in one line,
    before it starts any server; ``status`` then asks the services."""
    fd = os.open(tmp_path / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        out = boxoffice("up", home=tmp_path)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [
            f"boxoffice up: a stack is already running on {tmp_path} (pid 4242); stop it "
            "first, or set BOXOFFICE_HOME for another one"]
        assert not (tmp_path / "nats").exists() and not (tmp_path / "pgdata").exists()
        (tmp_path / "services.json").write_text(json.dumps(
            {"payment": {"pid": 1, "ready": "http://127.0.0.1:1/readyz"}}))
        out = boxoffice("status", home=tmp_path)
        assert out.returncode == 1 and "not ready: payment" in out.stderr
    finally:
        os.close(fd)
    # the holder gone (however it ended), the home is free again
    out = boxoffice("status", home=tmp_path)
    assert out.returncode == 2


def test_a_running_stack_refuses_a_second_up_and_status_follows_it(tmp_path: Path) -> None:
    import re
    import time

    from boxoffice.embedded import free_port
    from tests.stack_support import start_stack, stop_stack

    home = tmp_path / "home"
    began = time.monotonic()
    proc, lines = start_stack(home, free_port())
    took = time.monotonic() - began
    try:
        # the ready line's time counts from the start: the embedded servers' start included
        said = float(re.search(r"ready in ([\d.]+)s", "".join(lines)).group(1))
        assert took - 1.0 <= said <= took + 0.2, (said, took)
        second = boxoffice("up", home=home)
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"boxoffice up: a stack is already running on {home} (pid {proc.pid}); stop it "
            "first, or set BOXOFFICE_HOME for another one")
        assert boxoffice("status", home=home).returncode == 0  # the first is untouched
        _walk_through_to_a_sale(home)
        _logs_are_readable(home)
        out = boxoffice("migrate", "--status", home=home)  # DATABASE_URL from stack.env
        assert out.returncode == 0 and "Applied" in out.stdout and "Pending: 0" in out.stdout, (
            out.stdout + out.stderr)
    finally:
        stop_stack(proc)
    out = boxoffice("status", home=home)
    assert out.returncode == 2 and "no stack is running" in out.stderr


def _walk_through_to_a_sale(home: Path) -> None:
    """The README's walk-through with the CLI's help: a hold, its PaymentIntent, paid with
    ``boxoffice dev pay`` at localstripe, whose webhook sells the hold."""
    import time
    import urllib.request

    from boxoffice.stack import read_env

    env = read_env(home / "stack.env")

    def api(method: str, path: str, body: dict, **headers: str) -> dict:
        req = urllib.request.Request(env["INGRESS_URL"] + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {env['CLIENT_API_TOKEN']}",
                                              **headers})
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read())

    hold = api("POST", "/v1/reservations", {"event_id": env["DEMO_EVENT_ID"], "quantity": 2})
    pi = api("POST", "/v1/payment_intents", {"reservation_id": hold["id"]},
             **{"Idempotency-Key": f"walk-{hold['id']}"})
    out = boxoffice("dev", "pay", pi["id"], home=home)
    assert (out.returncode, out.stdout.strip()) == (0, f"{pi['id']}: succeeded"), out.stderr
    deadline = time.monotonic() + 30
    while api("GET", f"/v1/reservations/{hold['id']}", {})["status"] != "completed":
        assert time.monotonic() < deadline, "the hold was not sold"
        time.sleep(0.2)
    declined = api("POST", "/v1/payment_intents", {"reservation_id": api(
        "POST", "/v1/reservations", {"event_id": env["DEMO_EVENT_ID"], "quantity": 1})["id"]},
        **{"Idempotency-Key": f"walk-declined-{hold['id']}"})
    out = boxoffice("dev", "pay", declined["id"], "--card", "4000000000000341", home=home)
    assert out.returncode == 1


def _logs_are_readable(home: Path) -> None:
    out = boxoffice("logs", "-n", "30", home=home)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and not any(line.startswith("{") for line in lines), out.stdout[:2000]
    assert any(" ingress: " in line for line in lines) and any(" reaper: " in line
                                                               for line in lines)
    out = boxoffice("logs", "payment", "-n", "5", home=home)
    assert out.returncode == 0 and out.stdout.strip()
    assert all(" payment: " in line for line in out.stdout.splitlines() if line[:2] == "20")
    assert boxoffice("logs", "nosuch", home=home).returncode == 2
    # -f: lines written after it started are printed as they come
    follow = subprocess.Popen([sys.executable, "-m", "boxoffice.cli", "logs", "payment", "-f",
                               "-n", "0"], env={**os.environ, "BOXOFFICE_HOME": str(home)},
                              stdout=subprocess.PIPE, text=True)
    try:
        import time
        time.sleep(1.0)  # it has opened the files at their end
        with open(home / "logs" / "payment.log", "a") as log:
            log.write(json.dumps({"ts": "2026-12-01T18:00:00.000+00:00", "level": "warning",
                                  "service": "payment", "logger": "t", "msg": "followed",
                                  "request_id": "rid-f"}) + "\n")
        assert follow.stdout is not None
        assert follow.stdout.readline().strip() == (
            "2026-12-01T18:00:00.000+00:00 WARNING payment: followed  (request_id=rid-f)")
    finally:
        follow.terminate()
        follow.wait(10)
        assert follow.stdout is not None
        follow.stdout.close()
