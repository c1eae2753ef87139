"""The SQL functions of Stripe events, called directly, outcome by outcome: seed the rows, call
the function, check the rows (payment_status_rank, advance_payment, emit_payment_event,
apply_stripe_event's outcomes not covered in test_sql_payments, and outbox_notify's quiet flag)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from tests.sql_support import hold, hold_with_intent, inventory, listening, new_event, outbox, pi, status, ts

ADVANCE = "SELECT * FROM advance_payment($1, $2, $3, $4, $5, to_timestamp($6))"
APPLY = ("SELECT * FROM apply_stripe_event($1, $2, to_timestamp($3), $4, $5, $6, $7, $8, $9, "
         "$10, $11)")


async def payment(db: asyncpg.Pool, pi_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM payments WHERE payment_intent_id = $1", pi_id)


async def apply(db: asyncpg.Pool | asyncpg.Connection, kind: str, pi_id: str | None,
                res: uuid.UUID | None, *, event_id: str | None = None,
                created: float | None = None, amount: int | None = 5000,
                currency: str | None = "eur", reason: str | None = None,
                refund_id: str | None = None, refunded: bool | None = None) -> asyncpg.Record:
    """apply_stripe_event for a synthetic event of ``kind``: its row (outcome, reservation_id,
    amount, currency)."""
    event_id = event_id or f"evt_{uuid.uuid4().hex}"
    payload = json.dumps({"id": event_id, "type": kind})
    return await db.fetchrow(APPLY, event_id, kind, time.time() if created is None else created,
                             payload, pi_id, res, amount, currency, reason, refund_id, refunded)


async def event_log(db: asyncpg.Pool, event_id: str) -> tuple[str, int]:
    row = await db.fetchrow("SELECT processing_status, attempts FROM webhook_events_log "
                            "WHERE event_id = $1", event_id)
    return row["processing_status"], row["attempts"]


# --- payment_status_rank ----------------------------------------------------------------------

async def test_payment_status_rank_orders_the_states(db: asyncpg.Pool) -> None:
    states = ["created", "processing", "failed", "canceled", "succeeded", "refunded", "disputed"]
    rows = await db.fetch("SELECT s, payment_status_rank(s) AS rank FROM unnest($1::text[]) s",
                          [*states, "bogus"])
    assert {r["s"]: r["rank"] for r in rows} == {
        "created": 0, "processing": 1, "failed": 1, "canceled": 2, "succeeded": 3,
        "refunded": 4, "disputed": 5, "bogus": None}
    assert await db.fetchval("SELECT payment_status_rank(NULL)") is None


# --- advance_payment --------------------------------------------------------------------------

async def test_advance_inserts_a_missing_payment(db: asyncpg.Pool) -> None:
    res = (await hold(db, await new_event(db)))["id"]
    p = pi()
    row = await db.fetchrow(ADVANCE, p, res, 5000, "EUR", "processing", 100.0)
    assert tuple(row) == (True, None, res, 5000, "eur")
    got = await payment(db, p)
    assert (got["reservation_id"], got["amount"], got["currency"], got["status"]) == (
        res, 5000, "eur", "processing")
    assert got["status_event_created"] == datetime.fromtimestamp(100, UTC)
    # an event without amount or currency still makes a row
    bare = pi()
    assert tuple(await db.fetchrow(ADVANCE, bare, None, None, None, "failed", 100.0)) == (
        True, None, None, 0, "")


async def test_advance_moves_forward_only(db: asyncpg.Pool) -> None:
    res, p = await hold_with_intent(db, await new_event(db))
    row = await db.fetchrow(ADVANCE, p, None, 9999, "usd", "succeeded", 200.0)
    # the row's reservation, amount and currency, whatever the event said
    assert tuple(row) == (True, "created", res, 5000, "eur")
    for back in ("processing", "failed", "canceled", "created", "succeeded"):
        row = await db.fetchrow(ADVANCE, p, res, 5000, "eur", back, 300.0)
        assert (row["moved"], row["previous"]) == (False, "succeeded"), back
    got = await payment(db, p)
    assert (got["status"], got["status_event_created"]) == (
        "succeeded", datetime.fromtimestamp(200, UTC))
    row = await db.fetchrow(ADVANCE, p, res, 5000, "eur", "refunded", 100.0)  # older, but ahead
    assert (row["moved"], row["previous"]) == (True, "succeeded")
    assert (await payment(db, p))["status"] == "refunded"


async def test_advance_orders_states_of_one_rank_by_created(db: asyncpg.Pool) -> None:
    p = pi()
    steps = [("failed", 100.0, True), ("processing", 200.0, True),
             ("failed", 150.0, False),  # older than the processing it would replace
             ("failed", 300.0, True), ("failed", 400.0, False),  # same state: nothing to move
             ("processing", 300.0, False)]  # not newer
    for state, created, moves in steps:
        row = await db.fetchrow(ADVANCE, p, None, 5000, "eur", state, created)
        assert row["moved"] is moves, (state, created)
    got = await payment(db, p)
    assert (got["status"], got["status_event_created"]) == (
        "failed", datetime.fromtimestamp(300, UTC))
    # a row written without an event time (the checkout's) is older than any event
    q = pi()
    await db.execute("INSERT INTO payments (payment_intent_id, amount, currency, status) "
                     "VALUES ($1, 5000, 'eur', 'processing')", q)
    assert (await db.fetchrow(ADVANCE, q, None, 5000, "eur", "failed", 0.0))["moved"] is True


async def test_advance_nulls_an_unknown_reservation_and_fills_a_missing_one(
        db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, other = (await hold(db, ev))["id"], (await hold(db, ev))["id"]
    p = pi()
    row = await db.fetchrow(ADVANCE, p, uuid.uuid4(), 5000, "eur", "created", 100.0)
    assert (row["moved"], row["reservation_id"]) == (True, None)
    assert (await payment(db, p))["reservation_id"] is None
    row = await db.fetchrow(ADVANCE, p, res, 5000, "eur", "processing", 200.0)
    assert row["reservation_id"] == res and (await payment(db, p))["reservation_id"] == res
    row = await db.fetchrow(ADVANCE, p, other, 5000, "eur", "succeeded", 300.0)
    assert row["reservation_id"] == res and (await payment(db, p))["reservation_id"] == res
    row = await db.fetchrow(ADVANCE, p, other, 5000, "eur", "processing", 400.0)  # not moved
    assert (row["moved"], row["reservation_id"]) == (False, res)


# --- emit_payment_event -----------------------------------------------------------------------

async def test_emit_payment_event_writes_one_outbox_row(db: asyncpg.Pool) -> None:
    res = (await hold(db, await new_event(db)))["id"]
    p = pi()
    fn = "SELECT emit_payment_event($1, $2, $3, $4, $5, to_timestamp($6), $7)"
    await db.execute(fn, "refunded", p, res, 5000, "eur", 100.0, "oversold")
    await db.execute("SELECT emit_payment_event('succeeded', $1, NULL, 700, 'usd', now())", p)
    [(s1, refunded), (s2, succeeded)] = await outbox(db, "payments.")
    assert (s1, s2) == ("payments.events.refunded", "payments.events.succeeded")
    assert refunded == {"payment_intent_id": p, "reservation_id": str(res), "amount": 5000,
                        "currency": "eur", "occurred_at": refunded["occurred_at"],
                        "reason": "oversold"}
    assert ts(refunded["occurred_at"]) == datetime.fromtimestamp(100, UTC)
    assert (succeeded["reservation_id"], succeeded["amount"], succeeded["currency"]) == (
        None, 700, "usd")
    assert "reason" in succeeded and succeeded["reason"] is None


# --- apply_stripe_event -----------------------------------------------------------------------

async def test_apply_a_duplicate_event_changes_nothing(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    assert (await apply(db, "payment_intent.succeeded", p, res, event_id="evt_1"))[
        "outcome"] == "completed"
    rows = len(await outbox(db))
    again = await apply(db, "payment_intent.succeeded", p, res, event_id="evt_1")
    assert tuple(again) == ("duplicate", None, None, None)
    assert await event_log(db, "evt_1") == ("processed", 1)
    assert len(await outbox(db)) == rows
    assert await inventory(db, ev) == (0, 2)


async def test_apply_takes_up_an_event_left_unfinished(db: asyncpg.Pool) -> None:
    p = pi()
    await db.execute("INSERT INTO webhook_events_log (event_id, event_type, event_created, "
                     "payload, processing_status, attempts) VALUES ('evt_1', "
                     "'payment_intent.processing', now(), '{}', 'failed', 1)")
    assert (await apply(db, "payment_intent.processing", p, None, event_id="evt_1"))[
        "outcome"] == "recorded"
    assert await event_log(db, "evt_1") == ("processed", 2)
    assert (await payment(db, p))["status"] == "processing"


async def test_apply_ignores_an_unhandled_type(db: asyncpg.Pool) -> None:
    p = pi()
    assert (await apply(db, "customer.created", p, None, event_id="evt_1"))[
        "outcome"] == "ignored"
    assert await event_log(db, "evt_1") == ("ignored", 1)
    assert await payment(db, p) is None
    assert (await apply(db, "customer.created", p, None, event_id="evt_1"))[
        "outcome"] == "duplicate"
    assert await outbox(db) == []


async def test_apply_without_a_payment_intent(db: asyncpg.Pool) -> None:
    for kind in ("charge.refunded", "charge.dispute.created"):
        row = await apply(db, kind, None, None, event_id=f"evt_{kind}", refunded=True)
        assert row["outcome"] == "no_payment_intent"
        assert await event_log(db, f"evt_{kind}") == ("processed", 1)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await outbox(db) == []


async def test_apply_a_partial_refund_leaves_the_sale(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    assert (await apply(db, "payment_intent.succeeded", p, res))["outcome"] == "completed"
    rows = len(await outbox(db))
    for refunded in (False, None):
        row = await apply(db, "charge.refunded", p, res, refunded=refunded, refund_id="re_1")
        assert row["outcome"] == "partial_refund"
    got = await payment(db, p)
    assert (got["status"], got["refund_id"]) == ("succeeded", None)
    assert await status(db, res) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert len(await outbox(db)) == rows


async def test_apply_a_stale_event_changes_nothing(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    assert (await apply(db, "payment_intent.succeeded", p, res))["outcome"] == "completed"
    rows = len(await outbox(db))
    for kind in ("payment_intent.processing", "payment_intent.payment_failed",
                 "payment_intent.canceled", "payment_intent.succeeded"):
        row = await apply(db, kind, p, res)
        assert (row["outcome"], row["reservation_id"]) == ("stale", res), kind
    assert (await payment(db, p))["status"] == "succeeded"
    assert await status(db, res) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert len(await outbox(db)) == rows
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 0


async def test_apply_a_success_for_no_reservation(db: asyncpg.Pool) -> None:
    for named in (None, uuid.uuid4()):  # no metadata, or metadata naming no hold of ours
        p = pi()
        row = await apply(db, "payment_intent.succeeded", p, named)
        assert tuple(row) == ("no_reservation", None, 5000, "eur")
        got = await payment(db, p)
        assert (got["status"], got["reservation_id"]) == ("succeeded", None)
    events = await outbox(db)
    assert [s for s, _ in events] == ["payments.events.succeeded"] * 2
    assert [body["reservation_id"] for _, body in events] == [None, None]
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 0


async def test_apply_a_failed_payment_is_recorded_and_the_hold_stays(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    row = await apply(db, "payment_intent.payment_failed", p, res, reason="card_declined")
    assert tuple(row) == ("recorded", res, 5000, "eur")
    assert (await payment(db, p))["status"] == "failed"
    assert await status(db, res) == "active"
    assert await inventory(db, ev) == (2, 0)
    [(subject, body)] = await outbox(db, "payments.")
    assert (subject, body["payment_intent_id"], body["reservation_id"], body["reason"]) == (
        "payments.events.failed", p, str(res), "card_declined")


async def test_apply_processing_is_recorded_without_an_event(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    assert tuple(await apply(db, "payment_intent.processing", p, res)) == (
        "recorded", res, 5000, "eur")
    assert (await payment(db, p))["status"] == "processing"
    assert await status(db, res) == "active"
    assert await outbox(db, "payments.") == []


async def test_apply_a_success_completes_the_hold(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    created = time.time() - 3
    assert tuple(await apply(db, "payment_intent.succeeded", p, res, created=created)) == (
        "completed", res, 5000, "eur")
    assert await status(db, res) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert (await payment(db, p))["status"] == "succeeded"
    events = await outbox(db)
    assert [s for s, _ in events[1:]] == ["payments.events.succeeded",
                                          "reservations.events.completed"]
    succeeded = events[1][1]
    assert (succeeded["payment_intent_id"], succeeded["reservation_id"], succeeded["amount"]) == (
        p, str(res), 5000)
    assert abs(ts(succeeded["occurred_at"]).timestamp() - created) < 1e-5
    assert events[2][1]["payment_intent_id"] == p
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 0


async def test_apply_a_full_refund_of_a_sale_returns_its_tickets(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    assert (await apply(db, "payment_intent.succeeded", p, res))["outcome"] == "completed"
    before = len(await outbox(db))
    row = await apply(db, "charge.refunded", p, None, refunded=True, refund_id="re_1")
    assert tuple(row) == ("tickets_returned", res, 5000, "eur")
    assert await status(db, res) == "cancelled"
    assert await inventory(db, ev) == (0, 0)
    got = await payment(db, p)
    assert (got["status"], got["refund_id"], got["refund_reason"]) == (
        "refunded", "re_1", "refunded_in_stripe")
    events = (await outbox(db))[before:]
    assert [s for s, _ in events] == ["payments.events.refunded", "reservations.events.cancelled"]
    assert (events[0][1]["reason"], events[1][1]["reason"], events[1][1]["payment_intent_id"]) == (
        "refunded_in_stripe", "refunded", p)
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 0


async def test_apply_a_full_refund_of_a_hold_releases_it(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res, p = await hold_with_intent(db, ev)
    row = await apply(db, "charge.refunded", p, res, refunded=True, refund_id="re_1")
    assert row["outcome"] == "tickets_returned"
    assert await status(db, res) == "cancelled"
    assert await inventory(db, ev) == (0, 0)
    assert (await payment(db, p))["status"] == "refunded"
    # the hold's own PaymentIntent is refunded, not live: no cancel is decided for it
    assert await db.fetchval("SELECT count(*) FROM stripe_actions") == 0


# --- outbox_notify and its quiet flag ---------------------------------------------------------

INSERT_OUTBOX = "INSERT INTO outbox (subject, payload) VALUES ('test.subject', '{}')"


async def test_outbox_notifies_unless_its_transaction_is_quiet(db: asyncpg.Pool) -> None:
    async with listening(db, "boxoffice_outbox") as heard, db.acquire() as conn:
        await conn.execute(INSERT_OUTBOX)
        assert await heard.next() == ""
        async with conn.transaction():
            await conn.execute("SELECT set_config('boxoffice.outbox_quiet', 'on', true)")
            await conn.execute(INSERT_OUTBOX)
        await heard.nothing_more()
        # the flag is the transaction's own: the connection's next one notifies again
        await conn.execute(INSERT_OUTBOX)
        assert await heard.next() == ""
        async with conn.transaction():
            await conn.execute("SELECT set_config('boxoffice.outbox_quiet', 'off', true)")
            await conn.execute(INSERT_OUTBOX)
        assert await heard.next() == ""
        await heard.nothing_more()
    assert await db.fetchval("SELECT count(*) FROM outbox") == 4  # quiet rows are written


async def test_apply_stripe_event_writes_its_outbox_rows_quietly(db: asyncpg.Pool) -> None:
    res, p = await hold_with_intent(db, await new_event(db))
    async with listening(db, "boxoffice_outbox") as heard, db.acquire() as conn:
        assert (await apply(conn, "payment_intent.succeeded", p, res))["outcome"] == "completed"
        await heard.nothing_more()
        assert len(await outbox(db, "payments.events.succeeded")) == 1
        await conn.execute(INSERT_OUTBOX)  # the quiet flag ended with the event's transaction
        assert await heard.next() == ""
