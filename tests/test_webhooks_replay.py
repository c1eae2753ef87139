"""A failing event is retried with back-off, then marked failed and reported; an operator lists
and replays it through the admin API and the CLI, and it is applied once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import asyncpg

from boxoffice.embedded import free_port
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN
from tests.test_webhooks_support import (deliver, event, hold, inventory, new_event, paid_intent,
                                         stripe_client, wait_for)


def cli(ingress_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INGRESS_URL=ingress_url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", "webhooks", *args], env=env,
                          capture_output=True, text=True, timeout=90)


async def test_failed_event_is_kept_reported_and_replayable(
        db: asyncpg.Pool, start_service, localstripe) -> None:
    # Stripe unreachable: the oversell refund cannot be made, so the event fails
    dead_stripe = f"http://127.0.0.1:{free_port()}"
    broken = start_service("webhook", STRIPE_API_BASE=dead_stripe, WEBHOOK_RETRY_DELAYS="0.2,0.3")
    ingress = start_service("ingress")

    full = await new_event(db, capacity=2)
    gone = await hold(db, full, 2, ttl=1)
    await asyncio.sleep(1.1)
    await db.fetchval("SELECT cleanup_expired_reservations()")
    await hold(db, full, 2)
    sc = stripe_client(localstripe)
    paid = paid_intent(sc, gone)
    pi_id = paid["id"]
    body = event("payment_intent.succeeded", paid)
    event_id = json.loads(body)["id"]

    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, body)

        async def failed() -> asyncpg.Record | None:
            return await db.fetchrow("SELECT * FROM webhook_events_log WHERE event_id = $1 "
                                     "AND processing_status = 'failed'", event_id)
        row = await wait_for(failed, 60, "the event to be marked failed")
        assert row["attempts"] == 3 and row["processed_at"] is None
        assert "APIConnectionError" in row["last_error"]
        # nothing of the failed attempts stayed: no payment recorded, no refund made
        assert await db.fetchval("SELECT count(*) FROM payments") == 0
        assert sc.v1.refunds.list(params={"payment_intent": pi_id}).data == []
        assert await inventory(db, full) == (2, 0)
        await wait_for(lambda: asyncio.to_thread(lambda: "failed after 3 attempts" in broken.logs()),
                       what="the final failure to be reported")

        # operators see it, through the API and the CLI
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with s.get(f"{ingress.url}/v1/admin/webhooks/events?status=failed",
                         headers=admin) as resp:
            listed = await resp.json()
        assert resp.status == 200 and [e["event_id"] for e in listed["events"]] == [event_id]
        assert listed["events"][0]["attempts"] == 3
        async with s.get(f"{ingress.url}/v1/admin/webhooks/events?status=bogus",
                         headers=admin) as resp:
            assert resp.status == 422 and (await resp.json())["code"] == "validation_failed"
        async with s.get(f"{ingress.url}/v1/admin/webhooks/events",
                         headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as resp:
            assert resp.status == 403
        async with s.post(f"{ingress.url}/v1/admin/webhooks/events/evt_nope/replay",
                          headers=admin) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == "webhook_event_not_found"
    out = await asyncio.to_thread(cli, ingress.url, "list", "--status", "failed")
    assert out.returncode == 0 and json.loads(out.stdout)["events"][0]["event_id"] == event_id

    # a replay while Stripe is still down fails again: recorded, still failed, CLI exits 1
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 1 and json.loads(out.stdout)["outcome"] == "failed"
    assert await db.fetchval("SELECT attempts FROM webhook_events_log WHERE event_id = $1",
                             event_id) == 4

    # Stripe is back (the service restarted with a working Stripe): the replay refunds once
    assert broken.stop() == 0
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["outcome"] == "refunded_oversold"
    assert result["event"]["processing_status"] == "processed"
    pay = await db.fetchrow("SELECT * FROM payments WHERE payment_intent_id = $1", pi_id)
    assert (pay["status"], pay["refund_reason"]) == ("refunded", "oversold")
    assert [r.id for r in sc.v1.refunds.list(params={"payment_intent": pi_id}).data] == [pay["refund_id"]]
    # a second replay is refused: its effects are applied
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 1 and "webhook_event_already_processed" in out.stderr
    assert await db.fetchval("SELECT processing_status FROM webhook_events_log") == "processed"
