"""The unmodified @sentry/browser (tests/node, npm ci) in headless Chromium (Debian's, installed
by .ci/run), on a page of another origin than ingress: an error with its breadcrumb and the
user's feedback stored and linked (CORS), and the page's CSP violation stored as a warning."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid

from aiohttp import web

from tests.errors_support import ahttp
from tests.harness import ADMIN_TOKEN, SENTRY_KEY, eventually, free_port

PAGE = """<!doctype html>
<html><head><script type="importmap">{importmap}</script></head>
<body>loading<img src="{ingress}/blocked.png">
<script type="module">
import * as Sentry from "@sentry/browser";
Sentry.init({{ dsn: "{dsn}", release: "web@2.0.0", environment: "production" }});
Sentry.addBreadcrumb({{ category: "ui.click", message: "clicked pay" }});
let id;
try {{ null.pay(); }} catch (e) {{ id = Sentry.captureException(e); }}
Sentry.captureFeedback({{ message: "Pay button broken", name: "Eve", associatedEventId: id }});
await Sentry.flush(8000);
document.body.textContent = "done " + id;
</script></body></html>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (.ci/run installs it)"
    return found


async def test_sentry_browser_in_chromium(db, start_service, node_sdk, tmp_path) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="1=shop-web")
    start_service("error_sink")
    importmap = subprocess.run(["node", "importmap.mjs"], cwd=node_sdk, capture_output=True,
                               text=True, check=True, timeout=60).stdout
    dsn = f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/1"
    csp = (f"img-src 'self'; report-uri http://127.0.0.1:{ingress.port}/api/1/security/"
           f"?sentry_key={SENTRY_KEY}")

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE.format(importmap=importmap, dsn=dsn, ingress=ingress.url),
                            content_type="text/html", headers={"Content-Security-Policy": csp})

    app = web.Application()
    app.router.add_get("/page.html", page)
    app.router.add_static("/node_modules", node_sdk / "node_modules")
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()  # another origin than ingress
    try:
        proc = await asyncio.create_subprocess_exec(
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000",
            "--dump-dom", f"http://127.0.0.1:{port}/page.html",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await runner.cleanup()
    dom = out.decode(errors="replace")
    assert "done " in dom, (dom[-2000:], err.decode(errors="replace")[-3000:])
    event_id = str(uuid.UUID(dom.split("done ", 1)[1][:32]))

    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_logs WHERE id = $1::uuid", event_id))
    assert (row["service"], row["error_type"], row["release"]) == ("shop-web", "TypeError", "web@2.0.0")
    assert "clicked pay" in [c.get("message") for c in row["context"]["breadcrumbs"]]
    assert row["context"]["exception"][-1]["mechanism"]["handled"] is True

    async def feedback():
        status, _, raw = await ahttp("GET", f"{ingress.url}/v1/admin/errors/{row['group_id']}", None,
                                     {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        fb = json.loads(raw)["feedback"] if status == 200 else []
        return fb or None
    [fb] = await eventually(feedback)
    assert (fb["message"], fb["name"]) == ("Pay button broken", "Eve")

    csp_row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE error_type = 'CspViolation'"))
    assert csp_row["severity"] == "warning" and "img-src" in csp_row["error_message"]
