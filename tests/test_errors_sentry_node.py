"""The unmodified @sentry/node (pinned in tests/node/package.json and its lockfile, installed
with `npm ci` by the ``node_sdk`` fixture) reports an error with its breadcrumb, attachment and
the user's feedback, and a cron check-in; transactions are refused so it stops sending them."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

from tests.errors_support import admin_json
from tests.harness import SENTRY_KEY, eventually


async def test_sentry_node_error_attachment_feedback_check_in(db, start_service, node_sdk) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="2=box-office-app")
    start_service("error_sink")
    out = subprocess.run(["node", "report.js", f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/2"],
                         cwd=node_sdk, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SENTRY")})
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    event_id = str(uuid.UUID(ids["event_id"]))

    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_logs WHERE id = $1::uuid", event_id))
    assert (row["service"], row["error_type"], row["release"]) == ("box-office-app", "SyntaxError", "jobs@1.4.0")
    ctx = row["context"]
    assert "took job 17" in [c.get("message") for c in ctx["breadcrumbs"]]
    assert ctx["exception"][-1]["mechanism"]["handled"] is True

    async def detail():
        d = await admin_json(f"{ingress.url}/v1/admin/errors/{row['group_id']}")
        return d if d["feedback"] and d["attachments"] else None
    group = await eventually(detail)
    assert [(f["message"], f["name"], f["source"]) for f in group["feedback"]] == [
        ("The export never arrived", "Dee", "feedback")]
    [att] = group["attachments"]
    assert (att["filename"], att["content_type"], att["size"]) == ("job.json", "application/json", 11)

    async def monitor():
        ms = (await admin_json(f"{ingress.url}/v1/admin/monitors?service=box-office-app"))["monitors"]
        return ms if ms and ms[0]["status"] == "ok" else None
    [m] = await eventually(monitor)
    assert (m["slug"], m["schedule_value"], m["checkin_margin"], m["max_runtime"], m["last_duration"]) == (
        "node-export", "30 4 * * *", 2, 10, 3)
    # transactions refused on the first answer: the SDK kept its span to itself
    assert await db.fetchval("SELECT count(*) FROM error_discards WHERE category = 'transaction' "
                             "AND origin = 'server'") == 0
