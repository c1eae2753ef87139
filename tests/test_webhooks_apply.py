"""The webhook service applies each Stripe event once, whatever the duplicates and the order."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import asyncpg

from boxoffice import bus as busmod
from tests.harness import eventually
from tests.sql_support import inventory, new_event, new_hold
from tests.webhooks_support import (
    charge,
    deliver,
    event,
    log_status,
    new_pi,
    paid_intent,
    payment_intent,
    relayed,
    stripe_client,
)


async def drained(nats_url: str) -> None:
    """Wait until the webhook consumer has nothing pending or unacked."""
    async with busmod.connect(nats_url, "probe") as bus:
        async def idle() -> bool:
            info = await bus.js.consumer_info("STRIPE_EVENTS", "webhook")
            return info.num_pending == 0 and info.num_ack_pending == 0
        await eventually(idle, 30, "the webhook consumer to drain")


async def subject_counts(nats_url: str, stream: str) -> dict[str, int]:
    async with busmod.connect(nats_url, "probe") as bus:
        info = await bus.js.stream_info(stream, subjects_filter=">")
        return dict(info.state.subjects or {})


async def outbox_empty(db: asyncpg.Pool) -> bool:
    return await relayed(db)


async def test_one_event_delivered_200_times_concurrently_applies_once(
        db: asyncpg.Pool, start_service, nats_url: str, localstripe) -> None:
    start_service("webhook", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=10)
    res = await new_hold(db, ev, 2)
    pi = new_pi()
    body = event("payment_intent.succeeded", payment_intent(pi, res))
    event_id = json.loads(body)["id"]
    async with aiohttp.ClientSession() as s, busmod.connect(nats_url, "stripe-again") as bus:
        # 100 deliveries through ingress at once, and 100 more straight onto the stream with
        # fresh message ids, as if Stripe delivered again after the stream's dedup window
        results = await asyncio.gather(
            *(deliver(s, ingress.url, body) for _ in range(100)),
            *(bus.publish("stripe.events.payment_intent.succeeded", body, f"{event_id}-{i}")
              for i in range(100)))
    assert sum(1 for r in results[:100] if not r["duplicate"]) == 1
    await eventually(lambda: log_status(db, event_id), what="the event to be logged")
    await drained(nats_url)
    row = await db.fetchrow("SELECT count(*) OVER () AS n, * FROM webhook_events_log")
    assert (row["n"], row["event_id"], row["processing_status"]) == (1, event_id, "processed")
    assert row["attempts"] == 1 and row["processed_at"] is not None
    assert row["payload"]["data"]["object"]["id"] == pi  # stored as a JSON object
    r = await db.fetchrow("SELECT status, payment_intent_id FROM reservations WHERE id = $1", res)
    assert (r["status"], r["payment_intent_id"]) == ("completed", pi)
    assert await inventory(db, ev) == (0, 2)
    assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1", pi) == "succeeded"
    await eventually(lambda: outbox_empty(db), what="the outbox to be relayed")
    assert (await subject_counts(nats_url, "PAYMENTS")) == {"payments.events.succeeded": 1}
    assert (await subject_counts(nats_url, "RESERVATIONS")).get("reservations.events.completed") == 1


async def test_state_machine_never_moves_back_whatever_the_order(
        db: asyncpg.Pool, start_service, nats_url: str, localstripe) -> None:
    webhook = start_service("webhook", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    ev = await new_event(db, capacity=20)
    t = int(time.time())
    holds = {name: await new_hold(db, ev, 2) for name in "ABCDEF"}
    pis = {name: new_pi() for name in holds}
    for name in "CDEF":  # the checkout's rows (A and B: events that beat the checkout's write)
        await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, "
                         "currency, status) VALUES ($1, $2, 5000, 'eur', 'created')",
                         pis[name], holds[name])
        await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2",
                         pis[name], holds[name])

    def pi_event(name: str, kind: str, created: int) -> bytes:
        return event(f"payment_intent.{kind}", payment_intent(pis[name], holds[name]),
                     created=created)

    sequence = [
        # A: an older failure arrives after the success: stays succeeded
        pi_event("A", "succeeded", t), pi_event("A", "payment_failed", t - 10),
        # B: failure, then the buyer retries and pays
        pi_event("B", "payment_failed", t - 10), pi_event("B", "succeeded", t),
        # C: the refund arrives before the success it refunds: refunded, hold released, and the
        # late success changes nothing (no sale of refunded tickets)
        event("charge.refunded", charge(pis["C"]), created=t + 5), pi_event("C", "succeeded", t),
        # D: processing / failed / processing again (a retry), then a stale failure
        pi_event("D", "processing", t), pi_event("D", "payment_failed", t + 1),
        pi_event("D", "processing", t + 2), pi_event("D", "payment_failed", t),
        # E: canceled: the hold is released
        pi_event("E", "canceled", t),
        # F: sold, then refunded in full (tickets come back); a partial refund changes nothing
        pi_event("F", "succeeded", t),
        event("charge.refunded", charge(pis["F"], refunded=False), created=t + 1),
        event("charge.refunded", charge(pis["F"]), created=t + 2),
        event("charge.dispute.created", {"id": "dp_1", "object": "dispute", "charge": "ch_x",
                                         "payment_intent": pis["F"], "amount": 5000,
                                         "currency": "eur", "reason": "fraudulent"}, created=t + 3),
        event("customer.created", {"id": "cus_1", "object": "customer"}, created=t),
    ]
    ids = [json.loads(b)["id"] for b in sequence]
    async with aiohttp.ClientSession() as s:
        for body in sequence:  # one after the other: this order is the point of the test
            await deliver(s, ingress.url, body)
            await eventually(lambda: _done(db, json.loads(body)["id"]), what="the event to apply")

    status = {n: await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1", p)
              for n, p in pis.items()}
    assert status == {"A": "succeeded", "B": "succeeded", "C": "refunded", "D": "processing",
                      "E": "canceled", "F": "disputed"}
    res = {n: await db.fetchval("SELECT status FROM reservations WHERE id = $1", r)
           for n, r in holds.items()}
    assert res == {"A": "completed", "B": "completed", "C": "cancelled", "D": "active",
                   "E": "cancelled", "F": "cancelled"}
    # sold: A and B (2 each); held: D only; C, E released; F's tickets came back
    assert await inventory(db, ev) == (2, 4)
    logged = dict(await db.fetch("SELECT event_id, processing_status FROM webhook_events_log"))
    assert logged == {i: ("ignored" if i == ids[-1] else "processed") for i in ids}

    # the runbook's query works as the original deployment's did
    rows = await db.fetch("SELECT event_id, event_type, processing_status, processed_at "
                          "FROM webhook_events_log ORDER BY processed_at DESC LIMIT 20")
    assert len(rows) == len(ids) and rows[0]["event_id"] == ids[-1]

    await eventually(lambda: outbox_empty(db), what="the outbox to be relayed")
    assert await subject_counts(nats_url, "PAYMENTS") == {
        "payments.events.succeeded": 3,  # A, B, F (C's came after its refund: stale)
        "payments.events.failed": 3,  # B's failure, D's first failure, E's cancel (not A's)
        "payments.events.refunded": 2,  # C, F
    }
    logs = webhook.logs()
    assert '"level":"critical"' in logs and "a charge was disputed" in logs


async def _done(db: asyncpg.Pool, event_id: str) -> bool:
    return await log_status(db, event_id) in ("processed", "ignored")


async def test_payment_after_the_hold_expired(db: asyncpg.Pool, start_service, localstripe,
                                              nats_url: str) -> None:
    """Tickets left: the late payment still buys them. None left: the buyer gets a refund."""
    webhook = start_service("webhook", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    sc = stripe_client(localstripe)

    roomy = await new_event(db, capacity=10)
    late = await new_hold(db, roomy, 2, ttl=1)
    full = await new_event(db, capacity=2)
    gone = await new_hold(db, full, 2, ttl=1)
    await asyncio.sleep(1.1)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") >= 2
    taker = await new_hold(db, full, 2)  # someone else takes the released tickets

    paid = paid_intent(sc, gone)
    oversold = event("payment_intent.succeeded", paid)
    fine = event("payment_intent.succeeded", payment_intent(new_pi(), late))
    async with aiohttp.ClientSession() as s:
        for body in (fine, oversold):
            await deliver(s, ingress.url, body)
        for body in (fine, oversold):
            await eventually(lambda: _done(db, json.loads(body)["id"]), what="the late payments")
    # delivered again after the stream's dedup window (a new message): no second refund
    async with busmod.connect(nats_url, "stripe-again") as bus:
        await bus.publish("stripe.events.payment_intent.succeeded", oversold, "again-1")
    await drained(nats_url)

    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", late) == "completed"
    assert await inventory(db, roomy) == (0, 2)
    # the refund was decided with the event and is made by the action worker, just after
    pay = await eventually(lambda: db.fetchrow(
        "SELECT * FROM payments WHERE payment_intent_id = $1 AND status = 'refunded'", paid["id"]),
        what="the refund to be made")
    assert (pay["status"], pay["refund_reason"]) == ("refunded", "oversold")
    refunds = sc.v1.refunds.list(params={"payment_intent": paid["id"]}).data
    assert [r.id for r in refunds] == [pay["refund_id"]] and refunds[0].amount == 5000
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", gone) == "expired"
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", taker) == "active"
    assert await inventory(db, full) == (2, 0)  # nothing sold twice
    assert "tickets were sold: refund decided" in webhook.logs()
    action = await db.fetchrow("SELECT * FROM stripe_actions WHERE payment_intent_id = $1",
                               paid["id"])
    assert (action["kind"], action["status"], action["reason"], action["result_id"]) == (
        "refund", "done", "oversold", pay["refund_id"])
    assert uuid.UUID(str(pay["reservation_id"])) == gone


async def test_second_payment_for_one_hold_is_refunded(db: asyncpg.Pool, start_service,
                                                       localstripe) -> None:
    """Two PaymentIntents for one hold, both paid: the first buys the tickets, the second is
    given back (the buyer never pays twice), and nothing is sold twice."""
    webhook = start_service("webhook", STRIPE_API_BASE=localstripe.url)
    ingress = start_service("ingress")
    sc = stripe_client(localstripe)
    ev = await new_event(db, capacity=4)
    res = await new_hold(db, ev, 2)
    first, second = paid_intent(sc, res), paid_intent(sc, res)
    async with aiohttp.ClientSession() as s:
        for pi in (first, second):
            body = event("payment_intent.succeeded", pi)
            await deliver(s, ingress.url, body)
            await eventually(lambda: _done(db, json.loads(body)["id"]), what="the payment")
    r = await db.fetchrow("SELECT status, payment_intent_id FROM reservations WHERE id = $1", res)
    assert (r["status"], r["payment_intent_id"]) == ("completed", first["id"])
    assert await inventory(db, ev) == (0, 2)
    await eventually(lambda: db.fetchval("SELECT 1 FROM payments WHERE payment_intent_id = $1 "
                                       "AND status = 'refunded'", second["id"]),
                     what="the second payment's refund")
    rows = {p["payment_intent_id"]: p for p in await db.fetch("SELECT * FROM payments")}
    assert rows[first["id"]]["status"] == "succeeded"
    assert (rows[second["id"]]["status"], rows[second["id"]]["refund_reason"]) == (
        "refunded", "duplicate_payment")
    assert sc.v1.refunds.list(params={"payment_intent": first["id"]}).data == []
    assert [r.id for r in sc.v1.refunds.list(params={"payment_intent": second["id"]}).data] == [
        rows[second["id"]]["refund_id"]]
    assert "second payment for an already completed reservation" in webhook.logs()
