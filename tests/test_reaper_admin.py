"""Operators: hold statistics, manual expiry and the reaper's runs over HTTP and the CLI; bad
input answered with problem+json that changes nothing; retention configured by environment."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from datetime import timedelta

from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, eventually
from tests.reaper_support import assert_inventory_consistent, get_json, hold, hold_unannounced, make_event


def _request(method: str, url: str, body: bytes | None = None,
             token: str | None = ADMIN_TOKEN) -> tuple[int, str, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], json.loads(exc.read())


async def _cli(ingress_url: str, *args: str) -> tuple[int, str]:
    env = dict(os.environ, INGRESS_URL=ingress_url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "boxoffice.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, (out or err).decode()


async def test_stats_cleanup_and_runs_over_http_and_cli(db, start_service):
    # keys two hours old go, half an hour old stay (IDEMPOTENCY_KEY_TTL_HOURS=1)
    for key, age in (("old", timedelta(hours=2)), ("young", timedelta(minutes=30))):
        await db.execute(
            "INSERT INTO payment_intents_log (client_id, idempotency_key, request_path, "
            "request_fingerprint, stripe_idempotency_key, created_at) "
            "VALUES ('c_1', $1, '/v1/payment_intents', 'fp', $1, now() - $2::interval)", key, age)
    # no catch-up sweep and no re-read of the next due time for an hour: holds nobody announced
    # stay overdue until cleaned up
    reaper = start_service("reaper", REAPER_SWEEP_SECONDS="3600", REAPER_ARM_SECONDS="3600",
                           IDEMPOTENCY_KEY_TTL_HOURS="1")
    ingress = start_service("ingress")
    base = f"{ingress.url}/v1/admin"
    event = await make_event(db, capacity=20, buckets=2)
    for _ in range(2):
        await hold(db, event, 1, ttl=600)
    for _ in range(3):
        await hold_unannounced(db, event, 2, ttl=0)

    status, _, stats = _request("GET", f"{base}/reservations/stats")
    assert status == 200
    assert (stats["active"], stats["overdue"], stats["expired"]) == (5, 3, 0)
    assert stats["oldest_active_hold"] is not None and stats["next_expiry"] is not None

    # bad input: a clear 4xx problem, and nothing changes
    bad = [("GET", f"{base}/reaper/runs?limit=0", None, ADMIN_TOKEN, 422, "validation_failed"),
           ("GET", f"{base}/reaper/runs?limit=abc", None, ADMIN_TOKEN, 422, "validation_failed"),
           ("GET", f"{base}/reaper/runs?kind=bogus", None, ADMIN_TOKEN, 422, "validation_failed"),
           ("GET", f"{base}/reaper/runs?color=red", None, ADMIN_TOKEN, 422, "validation_failed"),
           ("GET", f"{base}/reaper/runs?limit=1&limit=2", None, ADMIN_TOKEN, 422, "validation_failed"),
           ("POST", f"{base}/reservations/cleanup", b'{"event_id": "nope"}', ADMIN_TOKEN, 422,
            "validation_failed"),
           ("POST", f"{base}/reservations/cleanup", b'{"limit": 5}', ADMIN_TOKEN, 422,
            "validation_failed"),
           ("POST", f"{base}/reservations/cleanup", b"not json", ADMIN_TOKEN, 400, "invalid_json"),
           ("POST", f"{base}/reservations/cleanup", b"{}", None, 401, "unauthorized"),
           ("POST", f"{base}/reservations/cleanup", b"{}", CLIENT_TOKEN, 403, "forbidden"),
           ("GET", f"{base}/reservations/stats", None, "wrong-token-xxxxxxxxxxxx", 401, "unauthorized"),
           ("GET", f"{base}/reservations/stats", None, CLIENT_TOKEN, 403, "forbidden")]
    for method, url, body, token, code, problem in bad:
        status, ctype, answer = _request(method, url, body, token)
        assert (status, answer["code"]) == (code, problem), (url, body, answer)
        assert ctype.startswith("application/problem+json")
    assert _request("GET", f"{base}/reservations/stats")[2] == stats

    status, _, result = _request("POST", f"{base}/reservations/cleanup")  # no body at all
    assert status == 200 and result["expired"] == 3
    status, _, after = _request("GET", f"{base}/reservations/stats")
    assert (after["active"], after["overdue"], after["expired"]) == (2, 0, 3)
    await assert_inventory_consistent(db)

    status, _, page = _request("GET", f"{base}/reaper/runs?kind=manual")
    assert status == 200 and [r["id"] for r in page["runs"]] == [result["run_id"]]
    assert page["runs"][0]["expired"] == 3 and page["runs"][0]["error"] is None

    async def purged() -> list:
        return _request("GET", f"{base}/reaper/runs?kind=retention")[2]["runs"]
    [purge] = await eventually(purged, what="the start-up retention run")
    assert purge["purged"]["payment_intents_log"] == 1 and purge["error"] is None
    assert [r[0] for r in await db.fetch("SELECT idempotency_key FROM payment_intents_log")] == ["young"]
    assert _request("GET", f"{base}/reaper/runs?errors=true")[2]["runs"] == []

    # the same from the CLI
    code, out = await _cli(ingress.url, "reservations", "stats")
    assert code == 0 and json.loads(out)["active"] == 2
    code, out = await _cli(ingress.url, "reaper", "runs", "--kind", "manual", "--limit", "5")
    assert code == 0 and json.loads(out)["runs"][0]["id"] == result["run_id"]
    await hold_unannounced(db, event, 1, ttl=0)
    code, out = await _cli(ingress.url, "reservations", "cleanup", "--event-id", event)
    assert code == 0 and json.loads(out)["expired"] == 1
    code, out = await _cli(ingress.url, "reaper", "runs", "--limit", "0")
    assert code == 1 and json.loads(out)["code"] == "validation_failed"

    # the reaper gone (stopped gracefully): a 503 problem, not a hang
    assert reaper.stop() == 0
    status, ctype, answer = _request("GET", f"{base}/reservations/stats")
    assert status == 503 and answer["code"] == "service_unavailable"
    assert ctype.startswith("application/problem+json")
    assert get_json(f"{ingress.url}/healthz")[0] == 200  # ingress itself is fine
