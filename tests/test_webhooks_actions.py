"""Refunds and cancels are decided durably and made by the webhook service's action worker:
a Stripe outage delays the money, never the events, and a hold that ends cancels its
PaymentIntent at Stripe."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import asyncpg

from boxoffice.embedded import free_port
from tests.harness import eventually
from tests.sql_support import inventory, new_event, new_hold
from tests.webhooks_support import (
    deliver,
    event,
    log_status,
    new_pi,
    paid_intent,
    payment_intent,
    stripe_client,
)


async def _sold_out_hold(db: asyncpg.Pool) -> asyncpg.Record:
    """A hold that expired, whose tickets someone else then took."""
    ev = await new_event(db, capacity=2)
    gone = await new_hold(db, ev, 2, ttl=0)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await new_hold(db, ev, 2)
    return gone


async def test_stripe_down_delays_the_refund_not_the_events(db: asyncpg.Pool, start_service,
                                                            localstripe) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    broken = start_service("webhook", STRIPE_API_BASE=dead)
    ingress = start_service("ingress")
    sc = stripe_client(localstripe)
    gone = await _sold_out_hold(db)
    paid = paid_intent(sc, gone)
    roomy = await new_event(db, capacity=10)
    fine_hold = await new_hold(db, roomy, 2)
    oversold = event("payment_intent.succeeded", paid)
    fine = event("payment_intent.succeeded", payment_intent(new_pi(), fine_hold))
    async with aiohttp.ClientSession() as s:
        await deliver(s, ingress.url, oversold)
        await eventually(lambda: log_status(db, json.loads(oversold)["id"]),
                         what="the oversold payment to apply")
        # Stripe is down and the refund waits: the next event is applied all the same
        await deliver(s, ingress.url, fine)
        await eventually(lambda: log_status(db, json.loads(fine)["id"]), what="the next event")
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                             fine_hold) == "completed"
    logged = await db.fetchrow("SELECT processing_status, attempts FROM webhook_events_log "
                               "WHERE event_id = $1", json.loads(oversold)["id"])
    assert tuple(logged) == ("processed", 1)  # the event is done: only the refund waits
    action = await eventually(lambda: db.fetchrow(
        "SELECT * FROM stripe_actions WHERE attempts >= 2"), what="the refund to be retried")
    assert (action["kind"], action["status"], action["reason"]) == ("refund", "pending", "oversold")
    assert "APIConnectionError" in action["last_error"]
    assert sc.v1.refunds.list(params={"payment_intent": paid["id"]}).data == []

    # Stripe is back: the refund is made, once, and confirmed
    assert broken.stop() == 0
    await db.execute("UPDATE stripe_actions SET next_attempt_at = now()")  # skip the back-off
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    pay = await eventually(lambda: db.fetchrow(
        "SELECT * FROM payments WHERE payment_intent_id = $1 AND status = 'refunded'",
        paid["id"]), what="the refund")
    assert pay["refund_reason"] == "oversold"
    refunds = sc.v1.refunds.list(params={"payment_intent": paid["id"]}).data
    assert [r.id for r in refunds] == [pay["refund_id"]]
    assert await db.fetchval("SELECT status FROM stripe_actions") == "done"


async def test_hold_that_ends_cancels_its_payment_intent_at_stripe(db: asyncpg.Pool, start_service,
                                                                    localstripe) -> None:
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    sc = stripe_client(localstripe)
    ev = await new_event(db, capacity=4)
    res = await new_hold(db, ev, 2, ttl=1)
    pi = sc.v1.payment_intents.create(params={
        "amount": 5000, "currency": "eur", "metadata": {"reservation_id": str(res)}})
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, 5000, 'eur', 'created')", pi.id, res)
    await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2", pi.id, res)
    await asyncio.sleep(1.1)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await eventually(lambda: db.fetchval("SELECT status = 'done' FROM stripe_actions"),
                     what="the cancel to be made")
    assert sc.v1.payment_intents.retrieve(pi.id).status == "canceled"
    row = await db.fetchrow("SELECT kind, reason, idempotency_key FROM stripe_actions")
    assert tuple(row) == ("cancel", "hold_expired", f"cancel-{pi.id}")
    assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1",
                             pi.id) == "canceled"


async def test_cancel_too_late_applies_the_payment_at_once(db: asyncpg.Pool, start_service,
                                                           localstripe) -> None:
    """The buyer paid as the hold expired, and Stripe's event is late: the cancel finds the
    PaymentIntent succeeded and the payment is applied then (the tickets were still free)."""
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    sc = stripe_client(localstripe)
    ev = await new_event(db, capacity=4)
    res = await new_hold(db, ev, 2, ttl=1)
    paid = paid_intent(sc, res)
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, 5000, 'eur', 'created')", paid["id"], res)
    await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2",
                     paid["id"], res)
    await asyncio.sleep(1.1)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await eventually(lambda: db.fetchval("SELECT status = 'completed' FROM reservations"),
                     what="the late payment to sell the hold")
    assert await inventory(db, ev) == (0, 2)
    action = await db.fetchrow("SELECT status, detail FROM stripe_actions")
    assert tuple(action) == ("moot", "PaymentIntent is succeeded")
    assert await db.fetchval("SELECT status FROM payments") == "succeeded"


async def test_a_wake_up_during_an_empty_pass_is_kept(monkeypatch) -> None:
    """An action decided just after the worker's pass read nothing (its NOTIFY arrives while that
    pass runs) is performed at once, not at the next sweep: the worker clears its wake-up before
    a pass reads, never after."""
    from boxoffice.webhook import actions

    passes: list[float] = []
    wake, stopping = asyncio.Event(), asyncio.Event()

    async def run_once(_pool, _refunds) -> int:  # type: ignore[no-untyped-def]
        passes.append(asyncio.get_running_loop().time())
        if len(passes) == 1:
            wake.set()  # the NOTIFY of an action committed after this pass's read
        return 0

    monkeypatch.setattr(actions, "run_once", run_once)
    task = asyncio.create_task(actions.run_worker(None, None, stopping, wake, sweep=60))  # type: ignore[arg-type]
    try:
        await eventually(lambda: len(passes) >= 2, timeout=5, what="a second pass, woken")
    finally:
        stopping.set()
        wake.set()
        await task
    assert passes[1] - passes[0] < 5
