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

from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, eventually
from tests.sql_support import inventory, new_event, new_hold
from tests.webhooks_support import deliver, event, new_pi, payment_intent


def cli(ingress_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INGRESS_URL=ingress_url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    return subprocess.run([sys.executable, "-m", "boxoffice.cli", "webhooks", *args], env=env,
                          capture_output=True, text=True, timeout=90)


async def test_failed_event_is_kept_reported_and_replayable(
        db: asyncpg.Pool, start_service) -> None:
    # the event's own effects fail (a bug, stood in for by a trigger that refuses its payment)
    broken = start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3")
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=2)
    res = await new_hold(db, ev, 2)
    pi_id = new_pi()
    await db.execute(f"""
        CREATE FUNCTION refuse_payment() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.payment_intent_id = '{pi_id}' THEN
                RAISE EXCEPTION 'effects refused for this test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_payment BEFORE INSERT ON payments
            FOR EACH ROW EXECUTE FUNCTION refuse_payment();""")
    body = event("payment_intent.succeeded", payment_intent(pi_id, res))
    event_id = json.loads(body)["id"]

    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, body)

        async def failed() -> asyncpg.Record | None:
            return await db.fetchrow("SELECT * FROM webhook_events_log WHERE event_id = $1 "
                                     "AND processing_status = 'failed'", event_id)
        row = await eventually(failed, 60, "the event to be marked failed")
        assert row["attempts"] == 3 and row["processed_at"] is None
        assert "effects refused for this test" in row["last_error"]
        # nothing of the failed attempts stayed: no payment recorded, nothing sold
        assert await db.fetchval("SELECT count(*) FROM payments") == 0
        assert await inventory(db, ev) == (2, 0)
        await eventually(lambda: "failed after 3 attempts" in broken.logs(),
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

    # a replay while the bug is still there fails again: recorded, still failed, CLI exits 1
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 1 and json.loads(out.stdout)["outcome"] == "failed"
    assert await db.fetchval("SELECT attempts FROM webhook_events_log WHERE event_id = $1",
                             event_id) == 4

    # the bug is fixed: the replay applies the event once
    await db.execute("DROP TRIGGER refuse_payment ON payments")
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["outcome"] == "completed"
    assert result["event"]["processing_status"] == "processed"
    assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1",
                             pi_id) == "succeeded"
    assert await inventory(db, ev) == (0, 2)
    # a second replay is refused: its effects are applied
    out = await asyncio.to_thread(cli, ingress.url, "replay", event_id)
    assert out.returncode == 1 and "webhook_event_already_processed" in out.stderr
    assert await db.fetchval("SELECT processing_status FROM webhook_events_log") == "processed"
