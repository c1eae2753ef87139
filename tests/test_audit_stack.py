"""The self-audit on a whole, busy stack: the five services as real processes, Stripe
(localstripe) paying through its own webhooks, buyers holding, paying (some late, after their
hold expired), cancelling and abandoning while the audit runs over HTTP: it finds nothing, during
the work or after it, incrementally or in full. Then a ticket sold by hand is found by the
reaper's timer, reported as a critical error that the error-sink groups and alerts on, shown by
``GET /v1/admin/invariants``, the metric and ``boxoffice audit``, and resolved once repaired."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest
import stripe

from boxoffice.embedded import LocalStripe
from tests.audit_support import AuditListsProxy
from tests.checkout_support import Api
from tests.harness import ADMIN_TOKEN, STRIPE_KEY, WEBHOOK_SECRET, eventually, metrics
from tests.webhooks_support import deliver, event, pay_at_stripe

TTL = 3  # seconds a hold lives: some expire, some are paid late
AUDIT = {"AUDIT_INTERVAL_SECONDS": "2", "AUDIT_GRACE_SECONDS": "30"}


def pay_unless_cancelled(sc: stripe.StripeClient, pi: str) -> None:
    """What Stripe.js does; a PaymentIntent cancelled when its hold ended can no longer be paid."""
    try:
        pay_at_stripe(sc, pi)
    except stripe.InvalidRequestError:
        assert sc.v1.payment_intents.retrieve(pi).status == "canceled"


async def refund_in_dashboard(api: Api, sc: stripe.StripeClient, hold: str, pi: str) -> None:
    """A refund made in Stripe's dashboard once the sale went through, and Stripe's
    charge.refunded delivered (localstripe sends none for refunds: signed here as Stripe does)."""
    async def sold() -> bool:
        r = await api.call("GET", f"/v1/reservations/{hold}")
        return r.json["status"] == "completed"
    await eventually(sold, 30, "the sale")
    refund = await asyncio.to_thread(sc.v1.refunds.create, params={"payment_intent": pi})
    charge = {"id": f"ch_{uuid.uuid4().hex[:20]}", "object": "charge", "payment_intent": pi,
              "amount": refund.amount, "amount_refunded": refund.amount, "currency": "eur",
              "refunded": True, "metadata": {"reservation_id": hold},
              "refunds": {"data": [{"id": refund.id}]}}
    await deliver(api.session, api.base, event("charge.refunded", charge))


async def buyer(api: Api, sc: stripe.StripeClient, event_id: str, i: int) -> None:
    r = await api.hold(event_id, 1 + i % 3)
    if r.status != 201:
        assert r.code == "sold_out", r.body
        return
    hold = r.json["id"]
    if i % 6 == 0:
        return  # abandoned: it expires
    if i % 6 == 1:
        assert (await api.call("POST", f"/v1/reservations/{hold}/cancel")).status == 200
        return
    p = await api.pay(hold, f"buyer-{i}-{uuid.uuid4()}")
    if p.status != 201:
        assert p.code == "reservation_not_active", p.body  # it expired meanwhile
        return
    if i % 6 == 2:
        await asyncio.sleep(TTL + 1)  # pays after the hold expired: sold anew or refunded
    elif i % 6 == 3:
        return  # never pays: the PaymentIntent is cancelled when the hold expires
    await asyncio.to_thread(pay_unless_cancelled, sc, p.json["id"])
    if i % 6 == 4:
        await refund_in_dashboard(api, sc, hold, p.json["id"])


async def audit_run(api: Api, full: bool) -> dict[str, Any]:
    r = await api.call("POST", "/v1/admin/invariants/run", token=ADMIN_TOKEN,
                       body={"full": full}, timeout=120)
    assert r.status == 200, r.body
    return r.json


async def cli(ingress_url: str, *args: str) -> tuple[int, str]:
    env = dict(os.environ, INGRESS_URL=ingress_url, ADMIN_API_TOKEN=ADMIN_TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "boxoffice.cli", "audit", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, (out + err).decode()


@pytest.mark.timeout(300)
async def test_busy_stack_is_clean_then_damage_is_found_alerted_and_resolved(
        db: asyncpg.Pool, start_service, own_stripe: LocalStripe, own_stripe_api: AuditListsProxy,
        http: aiohttp.ClientSession) -> None:
    start_service("payment", STRIPE_API_BASE=own_stripe_api.url, RESERVATION_TTL_SECONDS=str(TTL))
    start_service("webhook", STRIPE_API_BASE=own_stripe_api.url, **AUDIT)
    start_service("error_sink")
    reaper = start_service("reaper", **AUDIT)
    ingress = start_service("ingress")
    own_stripe.configure_webhook(f"{ingress.url}/v1/webhooks/stripe", WEBHOOK_SECRET)
    api = Api(http, ingress.url)
    sc = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": own_stripe.url})
    event_id = await api.create_event(capacity=60, price=1000, buckets=4)

    # the admin routes refuse what they should
    assert (await api.call("GET", "/v1/admin/invariants")).status == 403
    assert (await api.call("GET", "/v1/admin/invariants", token=None)).status == 401
    r = await api.call("POST", "/v1/admin/invariants/run", token=ADMIN_TOKEN, body={})
    assert (r.status, r.code) == (422, "validation_failed")
    r = await api.call("GET", "/v1/admin/invariants?limit=0", token=ADMIN_TOKEN)
    assert (r.status, r.code) == (422, "validation_failed")

    async def audits_meanwhile(done: asyncio.Event) -> int:
        runs = 0
        while not done.is_set():
            answer = await audit_run(api, full=runs % 2 == 1)
            assert answer["holds"] and answer["findings"] == [], (
                answer["findings"], [(c["check"], c["error"]) for c in answer["checks"]])
            runs += 1
        return runs

    done = asyncio.Event()
    during = asyncio.create_task(audits_meanwhile(done))
    for wave in range(4):
        await asyncio.gather(*(buyer(api, sc, event_id, wave * 10 + i) for i in range(10)))
        r = await api.call("POST", "/v1/errors", body={
            "id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
            "service": "shop-web", "level": "error", "message": f"wave {wave}"})
        assert r.status == 202, r.body
    done.set()
    assert await during >= 2

    async def settled() -> bool:  # holds expired, payments and refunds and cancels made
        return await db.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM reservations WHERE status = 'active') "
            "AND NOT EXISTS (SELECT 1 FROM stripe_actions WHERE status = 'pending') "
            "AND NOT EXISTS (SELECT 1 FROM outbox)")
    await eventually(settled, 60, "the stack to settle")
    sold = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'completed'")
    refunded = await db.fetchval("SELECT count(*) FROM payments WHERE status = 'refunded'")
    assert sold >= 5 and refunded >= 3, (sold, refunded)
    code, out = await cli(ingress.url, "--full")
    assert code == 0, out
    assert out.strip().endswith("every promise holds")
    code, out = await cli(ingress.url, "--json")
    answer = json.loads(out)
    assert code == 0 and answer["holds"] and answer["findings"] == []
    assert sorted(c["check"] for c in answer["checks"]) == [
        "errors", "inventory", "money", "stripe", "timeliness"]
    assert all(c["error"] is None for c in answer["checks"]), answer
    print(f"busy stack: {sold} holds sold, {refunded} payments refunded, audits held")

    # damage: a ticket sold without a hold; the reaper's timer finds it
    await db.execute("UPDATE inventory_buckets SET sold = sold + 1 WHERE event_id = $1 "
                     "AND bucket = 0", uuid.UUID(event_id))
    subject = f"event {event_id} bucket 0"

    async def listed() -> dict[str, Any] | None:
        r = await api.call("GET", "/v1/admin/invariants", token=ADMIN_TOKEN)
        assert r.status == 200, r.body
        return r.json if r.json["findings"] else None
    shown = await eventually(listed, 30, "the timer to find the damage")
    assert not shown["holds"]
    [f] = shown["findings"]
    assert (f["check"], f["kind"], f["subject"]) == ("inventory", "bucket_sold", subject)
    assert {c["check"] for c in shown["checks"]} == {"inventory", "money", "stripe",
                                                      "timeliness", "errors"}
    assert metrics(reaper)['boxoffice_audit_violations{check="inventory"}'] == 1

    # reported as a critical error: stored, grouped and alerted by the error-sink
    async def alerted() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT g.id, g.level, g.title, a.reason FROM error_groups g "
            "JOIN error_alerts a ON a.group_id = g.id "
            "WHERE g.service = 'reaper' AND g.title LIKE 'audit: inventory.bucket_sold%'")
    group = await eventually(alerted, 30, "the critical report grouped and alerted")
    assert (group["level"], group["reason"]) == ("critical", "level")
    assert subject in group["title"]

    code, out = await cli(ingress.url)
    assert code == 1 and f"VIOLATION inventory.bucket_sold {subject}" in out, out

    await db.execute("UPDATE inventory_buckets SET sold = sold - 1 WHERE event_id = $1 "
                     "AND bucket = 0", uuid.UUID(event_id))

    async def resolved() -> bool:
        return await db.fetchval("SELECT resolved_at IS NOT NULL FROM audit_findings "
                                 "WHERE id = $1", f["id"])
    await eventually(resolved, 30, "the timer to resolve the finding")
    r = await api.call("GET", "/v1/admin/invariants", token=ADMIN_TOKEN)
    assert r.json["holds"] and r.json["findings"] == [], r.json
    assert metrics(reaper)['boxoffice_audit_violations{check="inventory"}'] == 0
    code, out = await cli(ingress.url)
    assert code == 0, out
