"""The README's walk-through, tried as a new user would: its shell blocks run as they are
written, one after the other in one shell (as in a terminal), against `boxoffice up`; its
console steps in Chromium. It reaches a sale, a failed webhook replayed and an error resolved,
in the console and in the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from boxoffice.embedded import free_port
from boxoffice.stack import read_env
from tests.stack_support import start_stack, stop_stack
from tests.test_console_browser import ARTIFACTS, CHROMIUM

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## A walk-through: a sale, a failed webhook replayed, an error resolved"


def blocks() -> list[str]:
    """The walk-through's ``sh`` blocks, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


class Terminal:
    """One bash, fed a block at a time like a person pasting into a terminal."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def run(self, block: str, timeout: float = 90) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(block + "\necho __walked__\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("the shell ended:\n" + "".join(out))
            if line.strip() == "__walked__":
                return "".join(out)
            out.append(line)
        raise AssertionError("the block did not finish:\n" + "".join(out))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _api(settings: dict[str, str], path: str) -> dict:
    req = urllib.request.Request(settings["INGRESS_URL"] + path, headers={
        "Authorization": f"Bearer {settings['ADMIN_API_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


@pytest.mark.timeout(300)
def test_the_readme_walk_through(tmp_path: Path) -> None:
    steps = blocks()
    assert len(steps) == 5, steps
    assert steps[0].strip() == "WEBHOOK_RETRY_DELAYS=1,2 make up"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # what `make up` creates in the checkout
    home = tmp_path / ".boxoffice"
    # `make up` is `.venv/bin/boxoffice up`, with the walk-through's setting
    proc, _ = start_stack(home, free_port(8080), WEBHOOK_RETRY_DELAYS="1,2")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "DATABASE_", "STRIPE_", "BOXOFFICE_", "INGRESS_",
                                "ADMIN_", "CLIENT_"))}
    env["BOXOFFICE_HOME"] = str(home)
    shell = Terminal(tmp_path, env)
    try:
        settings = read_env(home / "stack.env")
        demo = settings["DEMO_EVENT_ID"]

        # a sale
        out = shell.run(steps[1])
        assert re.search(r"pi_\w+: succeeded", out), out
        assert re.search(r"sold\W+2\b", out), out
        assert _api(settings, f"/v1/admin/events/{demo}")["sold"] == 2

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(settings["INGRESS_URL"] + "/console")
            page.fill("#token", settings["ADMIN_API_TOKEN"])
            page.click("#signin-form button[type=submit]")
            bar = page.locator(f'[data-event-id="{demo}"]')
            expect(bar.locator('[data-count="sold"]')).to_have_text("2")

            # the outage: two payments' events fail and are reported
            out = shell.run(steps[2])
            assert "webhook outage drill on" in out and "webhook outage drill off" in out, out

            def failed() -> list[dict] | None:
                events = _api(settings, "/v1/admin/webhooks/events?status=failed")["events"]
                return events if len(events) == 2 else None

            first, second = _wait(failed, "two failed events")
            assert "webhook outage drill" in out  # the list printed their last error
            expect(bar.locator('[data-count="held"]')).to_have_text("2")

            # one replayed in the console ...
            page.click('.tab[data-tab="webhooks"]')
            row = page.locator("#webhook-list tbody tr", has_text=second["event_id"])
            row.click()
            expect(page.locator("#webhook-detail .last-error")).to_contain_text("outage drill")
            row.locator("button.replay").click()
            expect(page.locator("#message")).to_contain_text(
                f"Replayed {second['event_id']}: completed")
            page.click('.tab[data-tab="events"]')
            expect(bar.locator('[data-count="sold"]')).to_have_text("3")

            # ... the other in the CLI
            out = shell.run(steps[3])
            assert f"[1/1] {first['event_id']}: completed" in out, out
            assert '"succeeded": 1' in out and re.search(r"sold\W+4\b", out), out
            expect(bar.locator('[data-count="sold"]')).to_have_text("4")  # live, no reload

            # the error resolved in the console, then through the CLI
            page.click('.tab[data-tab="errors"]')
            page.locator("#error-groups tbody tr", has_text="stripe event").first.click()
            expect(page.locator("#error-detail .context")).to_contain_text("evt_")
            page.click("#resolve-group")
            expect(page.locator("#error-detail .meta")).to_contain_text(" · resolved · ")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "walk-through.png"), full_page=True)
            browser.close()
        out = shell.run(steps[4])
        assert re.search(r"status\W+resolved", out), out
        groups = _api(settings, "/v1/admin/errors?service=webhook")["groups"]
        assert groups and {g["status"] for g in groups} == {"resolved"}
    finally:
        shell.close()
        if proc.poll() is None:
            stop_stack(proc)
