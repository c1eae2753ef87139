"""The SQL functions of payments, called directly, outcome by outcome: seed the rows, call the
function, check the rows. (The services reach them through whole processes; these tests pin down
each outcome on its own.)"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import asyncpg
import pytest

from boxoffice.payment import intents
from tests.sql_support import (
    inventory,
    listening,
    new_event,
    new_hold,
    outbox,
    paid_by,
    pi,
    rows_read,
    status,
)


async def apply(db: asyncpg.Pool, kind: str, pi_id: str, res: uuid.UUID | None, *,
                created: float | None = None, refunded: bool | None = None,
                refund_id: str | None = None) -> str:
    """apply_stripe_event for a synthetic event of ``kind`` about ``pi_id``; returns the outcome."""
    event_id = f"evt_{uuid.uuid4().hex}"
    when = time.time() if created is None else created
    payload = json.dumps({"id": event_id, "type": kind})
    row = await db.fetchrow(
        "SELECT * FROM apply_stripe_event($1, $2, to_timestamp($3), $4, $5, $6, 5000, 'eur', "
        "NULL, $7, $8)", event_id, kind, when, payload, pi_id, res, refund_id,
        True if kind == "charge.refunded" and refunded is None else refunded)
    return row["outcome"]


async def actions(db: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await db.fetch("SELECT kind, payment_intent_id, reason, status FROM stripe_actions "
                          "ORDER BY id")
    return [tuple(r) for r in rows]


# --- return_reservation_tickets: only the payment that holds the tickets returns them ---------

async def test_return_tickets_outcomes(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    a, b = pi(), pi()
    sold = await new_hold(db, ev)
    await paid_by(db, sold, a)
    assert await db.fetchval("SELECT complete_reservation($1, $2)", sold, a) == "completed"
    active = await new_hold(db, ev)
    await paid_by(db, active, a.replace("pi_", "pi_b"))
    ended = await new_hold(db, ev)
    await db.execute("SELECT release_reservation($1)", ended)
    fn = "SELECT return_reservation_tickets($1, $2)"
    assert await db.fetchval(fn, uuid.uuid4(), a) == "unknown"
    assert await db.fetchval(fn, ended, a) == "not_held"
    assert await db.fetchval(fn, sold, b) == "not_holder"
    assert await db.fetchval(fn, active, b) == "not_holder"
    assert await inventory(db, ev) == (2, 2)  # nothing moved
    assert await db.fetchval(fn, active, a.replace("pi_", "pi_b")) == "released"
    assert await db.fetchval(fn, sold, a) == "returned"
    assert (await status(db, sold), await status(db, active)) == ("cancelled", "cancelled")
    assert await inventory(db, ev) == (0, 0)


async def test_refund_of_another_payment_never_resells_a_paid_hold(db: asyncpg.Pool) -> None:
    """A pays hold R; B, a second payment for R, is refunded and its charge.refunded arrives
    before its succeeded: R stays sold to A, its tickets stay sold, B ends refunded."""
    ev = await new_event(db, capacity=2)
    res = await new_hold(db, ev)
    a, b = pi(), pi()
    await paid_by(db, res, a)
    assert await apply(db, "payment_intent.succeeded", a, res) == "completed"
    assert await apply(db, "charge.refunded", b, res) == "recorded"
    assert await status(db, res) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert await apply(db, "payment_intent.succeeded", b, res, created=time.time() - 5) == "stale"
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1", res) == a
    assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1",
                             b) == "refunded"
    # no one can hold the sold tickets
    with pytest.raises(asyncpg.PostgresError, match="sold_out"):
        await new_hold(db, ev, 1)


async def test_cancel_of_another_payment_never_releases_a_hold(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    a, b = pi(), pi()
    await paid_by(db, res, a)
    assert await apply(db, "payment_intent.canceled", b, res) == "recorded"
    assert await status(db, res) == "active"
    assert await apply(db, "payment_intent.canceled", a, res) == "released"
    assert await status(db, res) == "cancelled"


# --- apply_stripe_event: refunds decided durably, in the event's transaction ------------------

async def test_oversold_payment_decides_a_refund(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=2)
    res = await new_hold(db, ev, ttl=0)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await new_hold(db, ev)  # someone else takes the tickets
    a = pi()
    assert await apply(db, "payment_intent.succeeded", a, res) == "refund_oversold"
    assert await actions(db) == [("refund", a, "oversold", "pending")]
    row = await db.fetchrow("SELECT status, refund_reason FROM payments WHERE payment_intent_id "
                            "= $1", a)
    assert tuple(row) == ("succeeded", "oversold")
    assert await inventory(db, ev) == (2, 0)
    # the refund's own charge.refunded: recognised as ours (action confirmed, reason kept)
    assert await apply(db, "charge.refunded", a, res, refund_id="re_1") == "recorded"
    row = await db.fetchrow("SELECT status, refund_reason, refund_id FROM payments "
                            "WHERE payment_intent_id = $1", a)
    assert tuple(row) == ("refunded", "oversold", "re_1")
    act = await db.fetchrow("SELECT status, result_id FROM stripe_actions")
    assert tuple(act) == ("done", "re_1")
    reasons = await db.fetch("SELECT payload->>'reason' AS r FROM outbox "
                             "WHERE subject = 'payments.events.refunded'")
    assert [r["r"] for r in reasons] == ["oversold"]


async def test_second_payment_of_a_sold_hold_decides_a_refund(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    a, b = pi(), pi()
    await paid_by(db, res, a)
    assert await apply(db, "payment_intent.succeeded", a, res) == "completed"
    assert await apply(db, "payment_intent.succeeded", b, res) == "refund_duplicate_payment"
    assert await actions(db) == [("refund", b, "duplicate_payment", "pending")]
    assert await inventory(db, ev) == (0, 2)


async def test_dispute_before_success_sells_the_hold(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    a = pi()
    await paid_by(db, res, a)
    assert await apply(db, "charge.dispute.created", a, res) == "disputed"
    assert await status(db, res) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert await apply(db, "payment_intent.succeeded", a, res,
                       created=time.time() - 5) == "stale"
    assert await inventory(db, ev) == (0, 2)


# --- stripe_actions: request, lease, confirm --------------------------------------------------

async def test_request_stripe_action_is_once_per_kind_and_payment(db: asyncpg.Pool) -> None:
    a = pi()
    fn = "SELECT request_stripe_action($1, $2, NULL, $3, 100)"
    first = await db.fetchval(fn, "refund", a, "oversold")
    assert await db.fetchval(fn, "refund", a, "duplicate_payment") == first
    other = await db.fetchval(fn, "cancel", a, "hold_expired")
    assert other != first
    keys = [r["idempotency_key"] for r in await db.fetch(
        "SELECT idempotency_key FROM stripe_actions ORDER BY id")]
    assert keys == [f"refund-{a}", f"cancel-{a}"]


async def test_claim_stripe_actions_leases_and_counts(db: asyncpg.Pool) -> None:
    a = pi()
    await db.execute("SELECT request_stripe_action('refund', $1, NULL, 'oversold', 100)", a)
    got = await db.fetch("SELECT * FROM claim_stripe_actions(10, 60)")
    assert [(r["payment_intent_id"], r["attempts"]) for r in got] == [(a, 1)]
    assert await db.fetch("SELECT * FROM claim_stripe_actions(10, 60)") == []  # leased
    await db.execute("UPDATE stripe_actions SET next_attempt_at = now() - interval '1 s'")
    again = await db.fetch("SELECT * FROM claim_stripe_actions(10, 60)")  # the lease lapsed
    assert [r["attempts"] for r in again] == [2]


async def test_claim_stripe_actions_reads_the_actions_due_not_every_pending_one(
        db: asyncpg.Pool) -> None:
    # the due time is a bound of the claim's index scan: with 2,000 actions leased (pending, due
    # in a minute) and one due, a claim fetches that one (with clock_timestamp() itself in the
    # WHERE, a volatile call, it was a filter, and each claim fetched all of them)
    await db.execute("SELECT request_stripe_action('refund', 'pi_leased_' || g, NULL, "
                     "'oversold', 100) FROM generate_series(1, 2000) g")
    assert len(await db.fetch("SELECT * FROM claim_stripe_actions(5000, 60)")) >= 2000
    a = pi()
    await db.execute("SELECT request_stripe_action('refund', $1, NULL, 'oversold', 100)", a)
    async with db.acquire() as conn, conn.transaction():
        before = await rows_read(conn, "stripe_actions")
        got = await conn.fetch("SELECT * FROM claim_stripe_actions(10, 60)")
        assert [r["payment_intent_id"] for r in got] == [a]
        assert await rows_read(conn, "stripe_actions") - before <= 10


async def test_finish_stripe_action_outcomes(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    fn = "SELECT finish_stripe_action($1, $2, $3, $4, $5)"
    ids = {}
    for name in ("refund", "cancel", "moot", "failed", "retry"):
        res = await new_hold(db, ev, 1)
        p = pi()
        await paid_by(db, res, p)
        await db.execute("UPDATE payments SET status = 'succeeded' WHERE payment_intent_id = $1 "
                         "AND $2 = 'refund'", p, name)
        kind = "refund" if name == "refund" else "cancel"
        ids[name] = (p, await db.fetchval("SELECT request_stripe_action($1, $2, $3, 'test', 5000)",
                                          kind, p, res))
    assert await db.fetchval(fn, ids["refund"][1], "done", "re_9", None, 0) == "done"
    assert await db.fetchval(fn, ids["cancel"][1], "done", ids["cancel"][0], None, 0) == "done"
    assert await db.fetchval(fn, ids["moot"][1], "moot", None, "PaymentIntent is succeeded",
                             0) == "moot"
    assert await db.fetchval(fn, ids["failed"][1], "failed", None, "refused", 0) == "failed"
    assert await db.fetchval(fn, ids["retry"][1], "retry", None, "timeout", 30) == "pending"
    assert await db.fetchval(fn, ids["refund"][1], "done", "re_9", None, 0) is None  # once
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await db.fetchval(fn, ids["retry"][1], "bogus", None, None, 0)
    pays = {r["payment_intent_id"]: (r["status"], r["refund_id"], r["refund_reason"])
            for r in await db.fetch("SELECT * FROM payments")}
    assert pays[ids["refund"][0]] == ("refunded", "re_9", "test")
    assert pays[ids["cancel"][0]][0] == "canceled"
    assert pays[ids["moot"][0]][0] == "created" and pays[ids["failed"][0]][0] == "created"
    row = await db.fetchrow("SELECT status, last_error, next_attempt_at > now() + interval '20 s' "
                            "AS later FROM stripe_actions WHERE id = $1", ids["retry"][1])
    assert tuple(row) == ("pending", "timeout", True)
    assert await db.fetchval("SELECT last_error FROM stripe_actions WHERE id = $1",
                             ids["failed"][1]) == "refused"


# --- the hold's end cancels its live PaymentIntents -------------------------------------------

async def test_hold_ending_decides_the_cancel_of_its_payment_intents(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    expiring, cancelled, sold, bare = (await new_hold(db, ev, 1, ttl=0), await new_hold(db, ev, 1),
                                       await new_hold(db, ev, 1), await new_hold(db, ev, 1, ttl=0))
    p_exp, p_can, p_sold, p_other = pi(), pi(), pi(), pi()
    await paid_by(db, expiring, p_exp)
    await paid_by(db, cancelled, p_can)
    await paid_by(db, sold, p_other)  # the hold's first PaymentIntent ...
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, 5000, 'eur', 'created')", p_sold, sold)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 2
    await db.execute("SELECT release_reservation($1)", cancelled)
    # ... is cancelled when another PaymentIntent pays for the hold
    assert await apply(db, "payment_intent.succeeded", p_sold, sold) == "completed"
    got = {(k, p, r) for k, p, r, _ in await actions(db)}
    assert got == {("cancel", p_exp, "hold_expired"), ("cancel", p_can, "hold_cancelled"),
                   ("cancel", p_other, "hold_completed")}
    assert bare  # a hold without a PaymentIntent decides nothing (no row above names it)


# --- claim_payment_intent / record_payment_intent ---------------------------------------------

CLAIM = "SELECT * FROM claim_payment_intent($1, $2, $3, $4, $5, 'POST /v1/payment_intents', $6)"
RECORD = "SELECT * FROM record_payment_intent($1, $2, $3, $4, $5, $6, $7, $8::jsonb)"


async def claim(db: asyncpg.Pool | asyncpg.Connection, res: uuid.UUID, key: str = "k1",
                fp: str = "fp", client: str = "client", lease: float = 5.0) -> asyncpg.Record:
    return await db.fetchrow(CLAIM, client, key, fp, res, f"sk-{key}-{fp}", lease)


async def record(db: asyncpg.Pool, row: asyncpg.Record, key: str = "k1", fp: str = "fp",
                 status: int = 201, pi_id: str | None = None,
                 client: str = "client") -> asyncpg.Record:
    return await db.fetchrow(RECORD, row["log_id"], client, key, f"sk-{key}-{fp}", status,
                             '{"ok": true}', pi_id, '{"e": 1}' if pi_id else None)


async def test_claim_outcomes(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    first = await claim(db, res)
    assert first["outcome"] == "claimed" and first["lease_token"] is not None
    assert await db.fetchval("SELECT payment_idempotency_key FROM reservations WHERE id = $1",
                             res) == "k1"
    assert (await claim(db, res))["outcome"] == "in_use"
    assert (await claim(db, res, fp="other"))["outcome"] == "mismatch"
    assert (await claim(db, res, key="k2"))["outcome"] == "exists"
    assert (await claim(db, res, client="someone"))["outcome"] == "not_found"
    assert (await claim(db, uuid.uuid4()))["outcome"] == "not_found"
    resumed = await claim(db, res, lease=0)  # the lease lapsed: taken over, with a new token
    assert resumed["outcome"] == "resumed" and resumed["lease_token"] != first["lease_token"]
    p = pi()
    assert (await record(db, first, pi_id=p))["outcome"] == "recorded"
    replay = await claim(db, res)
    assert (replay["outcome"], replay["response_status"]) == ("replay", 201)
    ended = await new_hold(db, ev)
    await db.execute("SELECT release_reservation($1)", ended)
    not_active = await claim(db, ended, key="k3")
    assert (not_active["outcome"], not_active["detail"]) == ("not_active", "cancelled")


async def test_claim_is_durable(db: asyncpg.Pool) -> None:
    """Nothing in the claim turns off the WAL flush at commit: a claim that returned survives a
    PostgreSQL crash, before Stripe is ever called."""
    ev = await new_event(db)
    res = await new_hold(db, ev)
    async with db.acquire() as conn, conn.transaction():
        assert (await claim(conn, res))["outcome"] == "claimed"
        assert await conn.fetchval("SELECT current_setting('synchronous_commit')") == "on"


async def test_one_live_payment_intent_per_hold_survives_key_retention(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    row = await claim(db, res)
    assert (await record(db, row, pi_id=pi()))["outcome"] == "recorded"
    await db.execute("DELETE FROM payment_intents_log")  # retention purged the key
    assert (await claim(db, res, key="k2"))["outcome"] == "exists"


async def test_definitive_refusal_frees_the_hold_for_another_key(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    row = await claim(db, res)
    assert (await record(db, row, status=402))["outcome"] == "recorded"
    assert (await claim(db, res, key="k2"))["outcome"] == "claimed"


async def test_record_outcomes(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    row = await claim(db, res)
    p = pi()
    assert (await record(db, row, pi_id=p))["outcome"] == "recorded"
    again = await record(db, row, pi_id=p)
    assert (again["outcome"], again["response_status"]) == ("replayed", 201)
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1", res) == p
    assert await db.fetchval("SELECT status FROM payments WHERE payment_intent_id = $1",
                             p) == "created"


async def test_record_writes_its_outbox_row_without_a_notify(db: asyncpg.Pool) -> None:
    """The record's payments.events.created row is written quiet (its process wakes its own
    relay): no NOTIFY, so records never queue on PostgreSQL's notify lock; a refusal writes none."""
    ev = await new_event(db)
    res, refused = await new_hold(db, ev), await new_hold(db, ev)
    async with listening(db, "boxoffice_outbox") as heard:
        p = pi()
        assert (await record(db, await claim(db, res), pi_id=p))["outcome"] == "recorded"
        assert (await record(db, await claim(db, refused, key="k2"), key="k2",
                             status=402))["outcome"] == "recorded"
        await heard.nothing_more()
        # the flag was the record's transaction's own: the next outbox row notifies again
        await db.execute("INSERT INTO outbox (subject, payload) VALUES ('test.subject', '{}')")
        assert await heard.next() == ""
    assert [subject for subject, _ in await outbox(db, "payments.")] == [
        "payments.events.created"]


async def test_record_of_a_lost_claim_writes_nothing(db: asyncpg.Pool) -> None:
    """The claim vanished (a crash erased it) or its id now names another client's key (an id
    recycled after the crash): the record refuses instead of finishing someone else's key."""
    ev = await new_event(db)
    mine, theirs = await new_hold(db, ev), await new_hold(db, ev, client="other")
    row = await claim(db, mine)
    await db.execute("DELETE FROM payment_intents_log")
    await db.execute("UPDATE reservations SET payment_idempotency_key = NULL")
    assert (await record(db, row, pi_id=pi()))["outcome"] == "lost"
    # the same log id, now another client's key
    await db.execute("INSERT INTO payment_intents_log (id, client_id, idempotency_key, request_path,"
                     " request_fingerprint, reservation_id, stripe_idempotency_key, amount, "
                     "currency, locked_at) VALUES ($1, 'other', 'kb', 'p', 'fp', $2, 'sk-kb-fp', "
                     "5000, 'eur', now())", row["log_id"], theirs)
    assert (await record(db, row, pi_id=pi()))["outcome"] == "lost"
    left = await db.fetchrow("SELECT recovery_point, stripe_payment_intent_id FROM "
                             "payment_intents_log WHERE id = $1", row["log_id"])
    assert tuple(left) == ("started", None)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_record_after_the_hold_ended_decides_a_cancel(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    row = await claim(db, res)
    await db.execute("SELECT release_reservation($1)", res)  # ended while Stripe was called
    p = pi()
    assert (await record(db, row, pi_id=p))["outcome"] == "recorded"
    assert await actions(db) == [("cancel", p, "hold_cancelled", "pending")]


async def test_a_lapsed_lease_is_not_cleared_by_its_first_worker(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    res = await new_hold(db, ev)
    first = await claim(db, res, lease=0)
    second = await claim(db, res, lease=0)  # the first worker's lease lapsed: taken over
    assert second["outcome"] == "resumed"
    late = intents.Claim(log_id=first["log_id"], client_id="client", idempotency_key="k1",
                         lease_token=first["lease_token"], stripe_key=first["stripe_key"],
                         amount=5000, currency="eur", reservation_id=str(res))
    await intents._release(db, late, "TimeoutError")  # the first worker gives up, late
    row = await db.fetchrow("SELECT locked_at, lease_token FROM payment_intents_log")
    assert row["locked_at"] is not None and row["lease_token"] == second["lease_token"]
