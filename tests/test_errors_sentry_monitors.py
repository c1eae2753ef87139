"""Cron check-ins and sessions from the unmodified sentry-sdk: monitors created from
monitor_config and listed, a missed run and a timed-out run reported and alerted on time by the
reaper, release health (crash-free sessions and users) per release and environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from tests.errors_support import ADMIN, admin_json, ahttp
from tests.harness import ADMIN_TOKEN, SENTRY_KEY, eventually

SCRIPT = r"""
import sys, sentry_sdk
from sentry_sdk.crons import capture_checkin
from sentry_sdk.utils import event_from_exception

sentry_sdk.init(dsn=sys.argv[1], release="shop@4.0.0", environment="production")
nightly = {"schedule": {"type": "crontab", "value": "0 3 * * *"}, "checkin_margin": 5,
           "max_runtime": 30, "timezone": "Europe/Berlin"}
cid = capture_checkin(monitor_slug="nightly-export", status="in_progress", monitor_config=nightly)
capture_checkin(monitor_slug="nightly-export", check_in_id=cid, status="ok", duration=12.5)
capture_checkin(monitor_slug="stuck-job", status="in_progress", monitor_config={
    "schedule": {"type": "interval", "value": 1, "unit": "hour"}, "max_runtime": 1})

scope = sentry_sdk.get_isolation_scope()
for user, crash in (("user-a", False), ("user-b", True)):
    scope.set_user({"id": user})
    scope.start_session(session_mode="application")
    if crash:
        try:
            raise MemoryError("out of memory while rendering seats")
        except MemoryError:
            event, hint = event_from_exception(sys.exc_info(), sentry_sdk.get_client().options,
                                               mechanism={"type": "test", "handled": False})
            sentry_sdk.capture_event(event, hint)
    scope.end_session()
sentry_sdk.flush(timeout=10)
"""


async def test_check_ins_sessions_and_missed_runs(db, start_service, tmp_path) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web")
    start_service("error_sink")
    start_service("reaper")
    (tmp_path / "job.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "job.py"),
                          f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/1"],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SENTRY")})
    assert out.returncode == 0, out.stderr

    async def monitors():
        got = {m["slug"]: m for m in (await admin_json(f"{ingress.url}/v1/admin/monitors"))["monitors"]}
        ok = got.get("nightly-export", {}).get("status") == "ok" and "stuck-job" in got
        return got if ok else None
    got = await eventually(monitors)
    nightly = got["nightly-export"]
    assert (nightly["service"], nightly["schedule_type"], nightly["schedule_value"]) == (
        "shop-web", "crontab", "0 3 * * *")
    assert (nightly["checkin_margin"], nightly["max_runtime"], nightly["timezone"]) == (5, 30, "Europe/Berlin")
    assert nightly["last_duration"] == 12.5
    due = datetime.fromisoformat(nightly["next_expected_at"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert (due.hour, due.minute) == (3, 0) and due > datetime.now(UTC)
    assert got["stuck-job"]["status"] == "in_progress"

    # release health: two sessions of shop@4.0.0, one crashed
    async def releases():
        rel = (await admin_json(f"{ingress.url}/v1/admin/releases"))["releases"]
        return rel if rel and rel[0]["sessions"] == 2 else None
    [rel] = await eventually(releases)
    assert (rel["service"], rel["release"], rel["environment"]) == ("shop-web", "shop@4.0.0", "production")
    assert (rel["crashed"], rel["crash_free_rate"], rel["users"], rel["crash_free_users_rate"]) == (
        1, 0.5, 2, 0.5)

    # the nightly run does not come: as if its time (plus the 5-minute margin) ends in 2 s
    await db.execute("UPDATE monitors SET next_expected_at = now() - interval '5 minutes' + interval '2 seconds' "
                     "WHERE slug = 'nightly-export'")
    deadline = time.time() + 2
    # and the stuck job's hour-long... one-minute maximum runtime ends in 2 s as well
    await db.execute("UPDATE monitor_checkins SET started_at = now() - interval '58 seconds' "
                     "WHERE slug = 'stuck-job'")
    assert await db.fetchval("SELECT count(*) FROM error_logs WHERE error_type LIKE 'Monitor%'") == 0

    async def reported():
        rows = await db.fetch("SELECT * FROM error_logs WHERE error_type LIKE 'Monitor%'")
        return rows if len(rows) == 2 else None
    rows = {r["error_type"]: r for r in await eventually(reported, timeout=15)}
    found_at = time.time()
    assert found_at - deadline < 4, "reported late"
    missed, timeout = rows["MonitorMissed"], rows["MonitorTimeout"]
    assert missed["timestamp"].timestamp() >= deadline - 0.5, "reported before its time"
    assert (missed["service"], missed["severity"]) == ("shop-web", "critical")
    assert "nightly-export missed" in missed["error_message"]
    assert "stuck-job ran longer than 1 minutes" in timeout["error_message"]
    # alerted like any critical error, once per run
    alerts = await eventually(lambda: _alerts(db, [missed["group_id"], timeout["group_id"]]))
    assert {a["level"] for a in alerts} == {"critical"}
    got = {m["slug"]: m for m in (await admin_json(f"{ingress.url}/v1/admin/monitors"))["monitors"]}
    assert got["nightly-export"]["status"] == "missed" and got["stuck-job"]["status"] == "timeout"
    # the next run still awaited: its check-in window (time plus the 5-minute margin) not yet over
    # (a real 03:00 Berlin run can be that one, when this runs within 5 minutes after it)
    next_due = datetime.fromisoformat(got["nightly-export"]["next_expected_at"])
    assert next_due + timedelta(minutes=5) > datetime.now(UTC)
    assert next_due.timestamp() > deadline - 300  # after the run it missed (due 5 min before)
    # the same from the CLI
    env = dict(os.environ, INGRESS_URL=ingress.url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    for verb, key in (("monitors", "monitors"), ("releases", "releases")):
        out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", verb, "--service", "shop-web"],
                             capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0 and json.loads(out.stdout)[key], out.stderr
    # an operator's monitor: due from now, missed like any other
    out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", "monitor", "shop-web",
                          "hourly-report", "--every", "1", "--unit", "hour", "--margin", "0"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    status, _, raw = await ahttp("POST", f"{ingress.url}/v1/admin/monitors", json.dumps(
        {"service": "shop-web", "slug": "bad", "schedule_type": "crontab", "schedule_value": "61 * * * *"}
    ).encode(), ADMIN)
    assert status == 422 and json.loads(raw)["code"] == "invalid_monitor"
    got = {m["slug"]: m for m in (await admin_json(f"{ingress.url}/v1/admin/monitors"))["monitors"]}
    assert got["hourly-report"]["status"] == "new" and "bad" not in got
    due = datetime.fromisoformat(got["hourly-report"]["next_expected_at"])
    assert 3590 < (due - datetime.now(UTC)).total_seconds() <= 3600
    await db.execute("UPDATE monitors SET next_expected_at = now() WHERE slug = 'hourly-report'")
    await eventually(lambda: db.fetchval("SELECT count(*) FROM error_logs WHERE error_type = 'MonitorMissed' "
                                         "AND error_message LIKE 'Monitor hourly-report%'"), timeout=10)
    time.sleep(2)
    assert await db.fetchval("SELECT count(*) FROM error_logs WHERE error_type LIKE 'Monitor%'") == 3


async def _alerts(db, group_ids):
    rows = await db.fetch("SELECT * FROM error_alerts WHERE group_id = ANY($1::uuid[])", group_ids)
    return rows if len(rows) == 2 else None
