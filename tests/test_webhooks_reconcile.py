"""Reconciliation with Stripe: what webhooks missed is recovered from Stripe's own records.

The webhook service reconciles every second here (``STRIPE_RECONCILE_INTERVAL_SECONDS=1``) and
looks at what is older than two seconds. It talks to localstripe through ``StripeListsProxy``
(Stripe's list filters and order; stopping it is Stripe going down). localstripe is shared by the
session, so each test first sets the reconciled points to its own start: what earlier tests left
at Stripe is not this test's.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import stripe

from boxoffice import bus as busmod
from boxoffice.webhook import reconcile_runs as runs
from boxoffice.webhook.reconcile import OVERLAP
from tests.checkout_support import Api
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, WEBHOOK_SECRET, eventually, http_ready
from tests.sql_support import inventory, new_event, new_hold
from tests.stripe_lists_proxy import StripeListsProxy
from tests.webhooks_support import paid_intent, pay_at_stripe, stripe_client

RECONCILE = {"STRIPE_RECONCILE_INTERVAL_SECONDS": "1", "STRIPE_RECONCILE_GRACE_SECONDS": "2"}
ENDPOINT = "reconcile"
DECLINED = "4000000000000341"  # attaches, then the charge is declined


@pytest_asyncio.fixture
async def stripe_api(localstripe: Any) -> AsyncIterator[StripeListsProxy]:
    proxy = await StripeListsProxy(localstripe.url).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
def dead_endpoint(localstripe: Any) -> Any:
    """Stripe's deliveries go nowhere during the test (and after it)."""
    localstripe.configure_webhook("http://127.0.0.1:9/gone", "whsec_unused_unused", ENDPOINT)
    yield localstripe
    localstripe.configure_webhook("http://127.0.0.1:9/gone", "whsec_unused_unused", ENDPOINT)


async def start_points(db: asyncpg.Pool, *, events: bool = True) -> None:
    """Reconciled up to now (the overlap re-lists a minute before a point, hence the minute
    added). ``events=False``: the events pass sees nothing in this test, as if Stripe's events of
    this test had left its list (it keeps 30 days), so the other passes must do the work."""
    await db.execute(
        "UPDATE stripe_reconciliation SET intents_until = now() + make_interval(secs => $1), "
        "events_until = CASE WHEN $2 THEN now() + make_interval(secs => $1) "
        "                    ELSE now() + interval '1 day' END", OVERLAP, events)


async def finished_run(db: asyncpg.Pool, after: int = 0, *, ok: bool = True,
                       timeout: float = 30.0) -> asyncpg.Record:
    """The first run after run ``after`` that finished (without error when ``ok``)."""
    return await eventually(lambda: db.fetchrow(
        "SELECT * FROM stripe_reconcile_runs WHERE id > $1 AND finished_at IS NOT NULL "
        "AND (error IS NULL) = $2 ORDER BY id LIMIT 1", after, ok),
        timeout, f"a reconciliation run after run {after} ({'ok' if ok else 'failed'})")


async def checkout(api: Api, event_id: str) -> tuple[uuid.UUID, str]:
    r = await api.hold(event_id, 2)
    assert r.status == 201, r.body
    p = await api.pay(r.json["id"], f"reconcile-{uuid.uuid4()}")
    assert p.status == 201, p.body
    return uuid.UUID(r.json["id"]), p.json["id"]


async def reservation_status(db: asyncpg.Pool, rid: uuid.UUID) -> str:
    return await db.fetchval("SELECT status FROM reservations WHERE id = $1", rid)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_events_missed_while_ingress_was_unreachable_are_recovered_and_applied_once(
        db: asyncpg.Pool, start_service, localstripe, stripe_api: StripeListsProxy,
        nats_url: str, http: aiohttp.ClientSession) -> None:
    await start_points(db)
    t0 = int(await db.fetchval("SELECT extract(epoch FROM now())"))
    start_service("payment", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    # two replicas: they take turns, never reconcile at once, never feed an event twice
    replicas = [start_service("webhook", STRIPE_API_BASE=stripe_api.url, **RECONCILE)
                for _ in range(2)]
    localstripe.configure_webhook(f"{ingress.url}/v1/webhooks/stripe", WEBHOOK_SECRET, ENDPOINT)
    try:
        api = Api(http, ingress.url)
        event_id = await api.create_event(capacity=4, price=3000)
        rid, pi = await checkout(api, event_id)
        sc = stripe_client(localstripe)
        # what Stripe sent so far is delivered before ingress goes (on a loaded machine a
        # delivery can lag, and would then be one more missed event)
        so_far = [e.id for e in sc.v1.events.list(params={"created": {"gte": t0},
                                                          "limit": 100}).data]
        await eventually(lambda: db.fetchval(
            "SELECT count(*) = $2 FROM webhook_events_log WHERE event_id = ANY($1)",
            so_far, len(so_far)), 30, "every event so far delivered")
        ingress.stop()  # from here Stripe's deliveries find nobody
        pay_at_stripe(sc, pi)

        await eventually(lambda: db.fetchval("SELECT status = 'completed' FROM reservations "
                                           "WHERE id = $1", rid), 30, "the hold to be sold")
        missed = [e for e in sc.v1.events.list(params={"created": {"gte": t0}, "limit": 100}).data
                  if e.type == "payment_intent.succeeded" and e.data.object.id == pi]
        assert len(missed) == 1
        row = await db.fetchrow("SELECT * FROM webhook_events_log WHERE event_id = $1",
                                missed[0].id)
        assert row["processing_status"] == "processed"
        assert row["payload"]["data"]["object"]["id"] == pi

        recovering = await eventually(lambda: db.fetchrow(
            "SELECT * FROM stripe_reconcile_runs WHERE events_recovered > 0 "
            "AND finished_at IS NOT NULL"), 10, "the run that recovered it")
        again = await finished_run(db, recovering["id"])
        assert again["events_seen"] >= 1 and again["events_recovered"] == 0  # seen, not fed again
        assert await db.fetchval("SELECT sum(events_recovered) FROM stripe_reconcile_runs") == 1

        # applied once: one sale, one payments.events.succeeded
        assert await inventory(db, uuid.UUID(event_id)) == (0, 2)
        assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1",
                                 pi) == "succeeded"
        await eventually(lambda: db.fetchval("SELECT count(*) = 0 FROM outbox"), 20, "the outbox")
        async with busmod.connect(nats_url, "probe") as bus:
            info = await bus.js.stream_info("PAYMENTS", subjects_filter=">")
        assert (info.state.subjects or {}).get("payments.events.succeeded") == 1

        done = await db.fetch("SELECT started_at, finished_at FROM stripe_reconcile_runs "
                              "WHERE finished_at IS NOT NULL ORDER BY started_at")
        assert all(a["finished_at"] <= b["started_at"] for a, b in itertools.pairwise(done))
        counted = 0.0
        for replica in replicas:
            async with http.get(f"{replica.url}/metrics") as r:
                counted += metric(await r.text(), "boxoffice_stripe_reconciled_total", kind="event")
            assert "Traceback" not in replica.logs()
        assert counted == 1
    finally:
        localstripe.configure_webhook("http://127.0.0.1:9/gone", "whsec_unused_unused", ENDPOINT)


async def test_payment_that_succeeded_at_stripe_without_its_events_is_applied(
        db: asyncpg.Pool, start_service, dead_endpoint, stripe_api: StripeListsProxy,
        http: aiohttp.ClientSession) -> None:
    await start_points(db, events=False)
    start_service("payment", STRIPE_API_BASE=dead_endpoint.url)
    ingress = start_service("ingress")
    api = Api(http, ingress.url)
    event_id = await api.create_event(capacity=6, price=2000)
    (paid, pi_paid), (waiting, pi_waiting), (declined, pi_declined) = [
        await checkout(api, event_id) for _ in range(3)]
    sc = stripe_client(dead_endpoint)
    pay_at_stripe(sc, pi_paid)
    with pytest.raises(stripe.CardError):
        pay_at_stripe(sc, pi_declined, DECLINED)
    webhook = start_service("webhook", STRIPE_API_BASE=stripe_api.url, **RECONCILE)

    await eventually(lambda: db.fetchval("SELECT count(*) = 2 FROM payments WHERE status IN "
                                       "('succeeded', 'failed')"), 30, "both payments corrected")
    assert await reservation_status(db, paid) == "completed"
    assert await inventory(db, uuid.UUID(event_id)) == (4, 2)
    statuses = dict(await db.fetch("SELECT payment_intent_id, status FROM payments"))
    assert statuses == {pi_paid: "succeeded", pi_declined: "failed", pi_waiting: "created"}
    assert await reservation_status(db, waiting) == "active"
    assert await reservation_status(db, declined) == "active"  # a decline keeps the hold
    logged = dict(await db.fetch("SELECT event_id, processing_status FROM webhook_events_log"))
    assert logged == {f"evt_reconcile_{pi_paid}_succeeded": "processed",
                      f"evt_reconcile_{pi_declined}_payment_failed": "processed"}

    last = await eventually(lambda: db.fetchrow(
        "SELECT * FROM stripe_reconcile_runs WHERE intents_corrected > 0 ORDER BY id DESC"),
        10, "the correcting run")
    # the two left non-final are compared again by later runs, and nothing more is fed
    later = await eventually(lambda: db.fetchrow(
        "SELECT * FROM stripe_reconcile_runs WHERE id > $1 AND intents_checked = 2 "
        "AND finished_at IS NOT NULL", last["id"]), 15, "a run comparing both again")
    assert later["intents_corrected"] == 0 and later["error"] is None
    assert await db.fetchval("SELECT sum(intents_corrected) FROM stripe_reconcile_runs") == 2
    assert await db.fetchval("SELECT count(*) FROM stripe_reconcile_checks") == 2
    assert "Traceback" not in webhook.logs()


async def test_orphan_payment_intents_naming_our_holds_are_cancelled_or_applied(
        db: asyncpg.Pool, start_service, dead_endpoint, stripe_api: StripeListsProxy,
        http: aiohttp.ClientSession) -> None:
    await start_points(db, events=False)
    ev = await new_event(db, capacity=10)
    h_cancel, h_paid, h_other = [await new_hold(db, ev, 2) for _ in range(3)]
    sc = stripe_client(dead_endpoint)
    # PaymentIntents made at Stripe for our holds, never recorded (a checkout that died)
    to_cancel = sc.v1.payment_intents.create(params={
        "amount": 5000, "currency": "eur", "metadata": {"reservation_id": str(h_cancel)}}).id
    paid = paid_intent(sc, h_paid)["id"]
    # not ours: a hold of no database of ours, and no metadata at all
    foreign = sc.v1.payment_intents.create(params={
        "amount": 5000, "currency": "eur", "metadata": {"reservation_id": str(uuid.uuid4())}}).id
    bare = sc.v1.payment_intents.create(params={"amount": 5000, "currency": "eur"}).id
    webhook = start_service("webhook", STRIPE_API_BASE=stripe_api.url, **RECONCILE)
    ingress = start_service("ingress")

    await eventually(lambda: db.fetchval("SELECT status = 'done' FROM stripe_actions "
                                       "WHERE payment_intent_id = $1", to_cancel), 30,
                     "the orphan's cancel to be made")
    assert sc.v1.payment_intents.retrieve(to_cancel).status == "canceled"
    await eventually(lambda: reservation_status(db, h_paid), 10, "the paid hold")
    await eventually(lambda: db.fetchval("SELECT status = 'completed' FROM reservations "
                                       "WHERE id = $1", h_paid), 10, "the paid hold to be sold")
    assert await inventory(db, ev) == (4, 2)
    assert await reservation_status(db, h_cancel) == "active"  # its own hold is not its to end
    assert await reservation_status(db, h_other) == "active"
    assert sc.v1.payment_intents.retrieve(foreign).status == "requires_payment_method"
    assert sc.v1.payment_intents.retrieve(bare).status == "requires_payment_method"
    action = await db.fetchrow("SELECT * FROM stripe_actions WHERE payment_intent_id = $1",
                               to_cancel)
    assert (action["kind"], action["reason"]) == ("cancel", "orphan")
    assert action["reservation_id"] == h_cancel
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 1
    logged = dict(await db.fetch("SELECT event_id, processing_status FROM webhook_events_log"))
    assert logged == {f"evt_reconcile_{paid}_succeeded": "processed"}

    # what was done, as the operators see it
    async with http.get(f"{ingress.url}/v1/admin/webhooks/reconciliation?limit=100",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 200, await r.text()
        report = await r.json()
    orphans = {o["payment_intent_id"]: o for run in report["runs"] for o in run["orphans"]}
    assert set(orphans) == {to_cancel, paid}
    assert orphans[to_cancel]["action"] == "cancel_requested"
    assert orphans[to_cancel]["cancel_status"] == "done"
    assert orphans[to_cancel]["reservation_id"] == str(h_cancel)
    assert orphans[paid]["action"] == "fed_succeeded"
    assert orphans[paid]["stripe_status"] == "succeeded"
    assert sum(run["orphans_found"] for run in report["runs"]) == 2
    assert "Traceback" not in webhook.logs()


async def test_admin_route_and_command_report_the_last_run(
        db: asyncpg.Pool, start_service, dead_endpoint, stripe_api: StripeListsProxy,
        http: aiohttp.ClientSession) -> None:
    await start_points(db)
    sc = stripe_client(dead_endpoint)
    customer = sc.v1.customers.create(params={"email": "reconcile@example.com"}).id
    start_service("webhook", STRIPE_API_BASE=stripe_api.url, **RECONCILE)
    ingress = start_service("ingress")
    recovered = await eventually(lambda: db.fetchrow(
        "SELECT * FROM stripe_reconcile_runs WHERE events_recovered = 1 "
        "AND finished_at IS NOT NULL"),
        30, "the customer.created event to be recovered")
    # the run counts the event once it is published; the consumer records it after
    logged = await eventually(lambda: db.fetchrow("SELECT * FROM webhook_events_log "
                                                  "WHERE event_type = 'customer.created'"),
                              20, "the recovered event recorded")
    assert logged["processing_status"] == "ignored"  # recorded, as a delivered one would be
    assert logged["payload"]["data"]["object"]["id"] == customer

    url = f"{ingress.url}/v1/admin/webhooks/reconciliation"
    async with http.get(url) as r:
        assert r.status == 401
    async with http.get(url, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as r:
        assert r.status == 403
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for bad in ("limit=0", "limit=abc", "limit=1&limit=2", "bogus=1"):
        async with http.get(f"{url}?{bad}", headers=admin) as r:
            assert r.status == 422, (bad, await r.text())
    async with http.get(f"{url}?limit=100", headers=admin) as r:
        assert r.status == 200, await r.text()
        report = await r.json()
    ids = [run["id"] for run in report["runs"]]
    assert ids == sorted(ids, reverse=True) and report["last_run"] == report["runs"][0]
    by_id = {run["id"]: run for run in report["runs"]}
    run = by_id[recovered["id"]]
    assert run["error"] is None and run["finished_at"] is not None and run["replica"]
    assert (run["events_seen"], run["events_recovered"], run["intents_checked"],
            run["intents_corrected"], run["orphans_found"], run["orphans"]) == (1, 1, 0, 0, 0, [])
    assert report["events_until"] is not None and report["intents_until"] is not None

    # the command's --limit 2 is only seen to cut the list once there are two runs or more (a
    # run a second, but a loaded machine may not have finished the second one yet)
    await eventually(lambda: db.fetchval("SELECT count(*) >= 2 FROM stripe_reconcile_runs"),
                     30, "a second reconciliation run")
    env = {**os.environ, "INGRESS_URL": ingress.url, "ADMIN_API_TOKEN": ADMIN_TOKEN,
           "BOXOFFICE_HOME": str(os.path.dirname(ingress.log))}
    done = subprocess.run([sys.executable, "-m", "boxoffice.cli", "webhooks", "reconciliation",
                           "--limit", "2"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert len(printed["runs"]) == 2 and printed["last_run"]["id"] >= run["id"]


async def test_run_while_stripe_is_down_is_recorded_and_the_next_one_recovers(
        db: asyncpg.Pool, start_service, dead_endpoint, stripe_api: StripeListsProxy) -> None:
    await start_points(db)
    webhook = start_service("webhook", STRIPE_API_BASE=stripe_api.url, **RECONCILE)
    first = await finished_run(db)
    await stripe_api.stop()  # Stripe unreachable
    sc = stripe_client(dead_endpoint)  # localstripe itself still takes what happens meanwhile
    customer = sc.v1.customers.create(params={"email": "outage@example.com"}).id
    failed = await finished_run(db, first["id"], ok=False)
    assert failed["error"].startswith("Stripe") and failed["events_recovered"] == 0
    # three failures in a row are an error for an operator; the service stays up and ready
    async def third_failure_reported() -> bool:
        return any('"level":"error"' in line and "failed (3 in a row)" in line
                   for line in webhook.logs().splitlines())
    await eventually(third_failure_reported, 20, "the third failure to be logged as an error")
    assert webhook.running and http_ready(f"{webhook.url}/readyz")
    assert await db.fetchval("SELECT count(*) FROM webhook_events_log") == 0

    await stripe_api.start()
    back = await finished_run(db, failed["id"])
    assert back["events_recovered"] == 1
    # the run counts the event once it is published; the consumer applies it after
    logged = await eventually(lambda: db.fetchrow("SELECT * FROM webhook_events_log"), 20,
                              "the recovered event applied")
    assert (logged["event_type"], logged["payload"]["data"]["object"]["id"]) == (
        "customer.created", customer)
    assert await db.fetchval("SELECT sum(events_recovered) FROM stripe_reconcile_runs") == 1
    assert "Traceback" not in webhook.logs()


async def test_one_replica_at_a_time_and_points_only_move_forward(db: asyncpg.Pool) -> None:
    a = await runs.acquire(db, "a", interval=60, lease_seconds=60)
    assert a is not None and a.events_until is None
    assert await runs.acquire(db, "b", interval=0, lease_seconds=60) is None  # a holds the lease
    now = await db.fetchval("SELECT now()")
    tally = runs.Tally(events_seen=3, events_recovered=1)
    await runs.checkpoint(db, a, tally, lease_seconds=60, events_until=now)
    await runs.checkpoint(db, a, tally, lease_seconds=60, events_until=now - timedelta(hours=1),
                          intents_until=now)
    state = await db.fetchrow("SELECT * FROM stripe_reconciliation")
    assert (state["events_until"], state["intents_until"]) == (now, now)  # never back
    await runs.finish(db, a, tally, None)
    assert await runs.acquire(db, "b", interval=60, lease_seconds=60) is None  # not due yet

    b = await runs.acquire(db, "b", interval=0, lease_seconds=0.05)
    assert b is not None and b.events_until == now
    await eventually(lambda: db.fetchval("SELECT lease_until < clock_timestamp() "
                                       "FROM stripe_reconciliation"), 5, "b's lease to lapse")
    c = await runs.acquire(db, "c", interval=0, lease_seconds=60)  # b died mid-run
    assert c is not None
    with pytest.raises(runs.LeaseLost):
        await runs.checkpoint(db, b, runs.Tally(), lease_seconds=60,
                              events_until=now + timedelta(days=1))
    assert await db.fetchval("SELECT events_until FROM stripe_reconciliation") == now
    rows = {r["replica"]: r for r in await db.fetch("SELECT * FROM stripe_reconcile_runs")}
    assert rows["a"]["error"] is None
    assert (rows["a"]["events_seen"], rows["a"]["events_recovered"]) == (3, 1)
    assert rows["b"]["error"].startswith("interrupted") and rows["b"]["finished_at"] is not None
    assert rows["c"]["finished_at"] is None
