"""The reaper's checks of the self-audit, run in-process against a real PostgreSQL (and a real
nats-server where they read the bus): clean books find nothing; each kind of damage made by hand
in SQL is found, named, recorded, reported as critical, and resolved once repaired."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import asyncpg
import pytest

from boxoffice import audit
from boxoffice import bus as busmod
from boxoffice.reaper.audit_inventory import Inventory
from boxoffice.reaper.audit_money import Money
from boxoffice.reaper.audit_timeliness import Timeliness
from tests.audit_support import apply, auditor, hold, named, new_event, run, sold


async def busy_books(db: asyncpg.Pool) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Two events with every kind of hold: active, sold, expired, cancelled, sold then refunded,
    and a second payment for a sold hold, refunded as a duplicate."""
    ev, other = await new_event(db, 40, buckets=4), await new_event(db, 10, buckets=1)
    await hold(db, ev, 3)
    res, _pi = await sold(db, ev, 2)
    await sold(db, other, 1)
    gone = await hold(db, ev, 1, ttl=0)
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await db.execute("SELECT release_reservation($1)", await hold(db, ev, 2))
    back, back_pi = await sold(db, ev, 1)
    assert (await apply(db, "charge.refunded", back_pi, back, 2500, refunded=True))["outcome"] \
        == "tickets_returned"
    dup = f"pi_{uuid.uuid4().hex[:24]}"
    assert (await apply(db, "payment_intent.succeeded", dup, res, 5000))["outcome"] \
        == "refund_duplicate_payment"
    return ev, [res, gone, back]


async def test_clean_books_find_nothing_full_or_incremental(db: asyncpg.Pool) -> None:
    await busy_books(db)
    a = auditor(db, Inventory(db), Money(db, overlap=timedelta(0)))
    first = await run(a)  # no checkpoint yet: a full pass
    assert first.holds and first.findings == [], first
    assert [(c.check, c.mode) for c in first.checks] == [("inventory", "full"), ("money", "full")]
    assert first.checks[0].examined == 5  # every bucket of both events
    again = await run(a)  # nothing changed: nothing to sum again
    assert again.holds and [c.mode for c in again.checks] == ["incremental", "incremental"]
    assert [c.examined for c in again.checks] == [0, 0]
    ev = await new_event(db, 8, buckets=1)
    await sold(db, ev, 3)
    after = await run(a)  # only what changed: the new event's one bucket, its hold and payment
    assert after.holds and [c.examined for c in after.checks] == [1, 2], after.checks
    assert (await run(a, full=True)).holds


async def test_a_ticket_sold_without_a_hold_is_found_named_and_resolved(
        db: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    ev, _ = await busy_books(db)
    a = auditor(db, Inventory(db))
    assert (await run(a)).holds
    bucket = await db.fetchval("SELECT min(bucket) FROM inventory_buckets WHERE event_id = $1 "
                               "AND capacity > held + sold", ev)
    before = await db.fetchval("SELECT sold FROM inventory_buckets WHERE event_id = $1 "
                               "AND bucket = $2", ev, bucket)
    await db.execute("UPDATE inventory_buckets SET sold = sold + 1 WHERE event_id = $1 "
                     "AND bucket = $2", ev, bucket)
    with caplog.at_level(logging.CRITICAL, logger="boxoffice.audit"):
        found = await run(a)  # incremental: the bucket moved since it was verified
    subject = f"event {ev} bucket {bucket}"
    assert not found.holds and named(found) == {("inventory", "bucket_sold", subject)}
    [f] = found.findings
    assert (f.expected.split(" (")[0], f.found) == (f"sold {before}", f"sold {before + 1}")
    assert f.ids == {"event_id": str(ev), "bucket": bucket}
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "inventory.bucket_sold" in record.getMessage() and str(ev) in record.getMessage()
    assert audit.VIOLATIONS.labels("inventory")._value.get() == 1

    caplog.clear()
    still = await run(a)  # seen again: the same finding, not a new one, nothing reported again
    assert [x.id for x in still.findings] == [f.id] and still.checks[0].new == 0
    assert not [r for r in caplog.records if r.levelno == logging.CRITICAL]

    await db.execute("UPDATE inventory_buckets SET sold = sold - 1 WHERE event_id = $1 "
                     "AND bucket = $2", ev, bucket)
    fixed = await run(a)
    assert fixed.holds and fixed.checks[0].resolved == 1
    row = await db.fetchrow("SELECT * FROM audit_findings WHERE id = $1", f.id)
    assert row["resolved_at"] is not None and row["last_seen"] >= row["first_seen"]
    assert audit.VIOLATIONS.labels("inventory")._value.get() == 0


async def test_held_tickets_of_no_active_hold_and_an_over_capacity_bucket(db: asyncpg.Pool) -> None:
    ev, _ = await busy_books(db)
    a = auditor(db, Inventory(db))
    assert (await run(a)).holds
    # a hold ended by hand without its tickets going back; an event's capacity cut by hand
    res = await hold(db, ev, 2)
    await db.execute("UPDATE reservations SET status = 'cancelled', released_at = now() "
                     "WHERE id = $1", res)
    [(bucket,)] = await db.fetch("SELECT bucket FROM reservation_allocations "
                                 "WHERE reservation_id = $1", res)
    small = await new_event(db, 4, buckets=1)
    await sold(db, small, 3)
    await db.execute("ALTER TABLE inventory_buckets DROP CONSTRAINT never_oversold")
    await db.execute("UPDATE inventory_buckets SET capacity = 2 WHERE event_id = $1", small)
    found = await run(a)
    assert named(found) == {("inventory", "bucket_held", f"event {ev} bucket {bucket}"),
                            ("inventory", "over_capacity", f"event {small} bucket 0"),
                            ("inventory", "capacity_split", f"event {small}")}


async def test_a_hold_stuck_active_is_found_and_resolved(db: asyncpg.Pool, nats_url: str) -> None:
    ev = await new_event(db)
    async with busmod.connect(nats_url, "audit-test") as bus:
        a = auditor(db, Timeliness(db, bus, grace=900))
        assert (await run(a)).holds
        await hold(db, ev, 1, ttl=600)  # not due: fine
        stuck = await hold(db, ev, 2, ttl=-30)  # no reaper runs here: nobody releases it
        found = await run(a)
        assert named(found) == {("timeliness", "hold_overdue", f"hold {stuck}")}
        assert found.findings[0].found.startswith("still active 3")
        assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
        fixed = await run(a)
        assert fixed.holds and fixed.checks[0].resolved == 1


async def test_failed_stripe_event_and_stale_stripe_action_are_named(
        db: asyncpg.Pool, nats_url: str) -> None:
    async with busmod.connect(nats_url, "audit-test") as bus:
        a = auditor(db, Timeliness(db, bus, grace=60))
        await db.execute("INSERT INTO webhook_events_log (event_id, event_type, event_created, "
                         "payload, processing_status, attempts, last_error) VALUES "
                         "('evt_broken', 'payment_intent.succeeded', now(), '{}', 'failed', 8, "
                         "'boom')")
        await db.execute("INSERT INTO stripe_actions (kind, payment_intent_id, reason, "
                         "idempotency_key, created_at) VALUES ('refund', 'pi_slow', 'oversold', "
                         "'refund-pi_slow', now() - interval '2 minutes')")
        found = await run(a)
        assert named(found) == {("timeliness", "webhook_event_failed", "stripe event evt_broken"),
                                ("timeliness", "stripe_action_overdue", "refund of pi_slow")}
        await db.execute("UPDATE webhook_events_log SET processing_status = 'processed' "
                         "WHERE event_id = 'evt_broken'")
        await db.execute("SELECT finish_stripe_action(id, 'failed', NULL, 'refused') "
                         "FROM stripe_actions")
        assert (await run(a)).holds


async def test_money_kept_without_tickets_and_a_sale_without_money(db: asyncpg.Pool) -> None:
    _ev, (res, gone, _back) = await busy_books(db)
    a = auditor(db, Money(db))
    assert (await run(a)).holds
    # a payment marked succeeded by hand on the hold that expired; a sold hold's payment set
    # back to created by hand
    late = f"pi_{uuid.uuid4().hex[:24]}"
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, 2500, 'eur', 'succeeded')", late, gone)
    holder = await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1", res)
    await db.execute("UPDATE payments SET status = 'created', updated_at = now() "
                     "WHERE payment_intent_id = $1", holder)
    found = await run(a)
    assert named(found) == {("money", "paid_without_tickets", f"payment {late}"),
                            ("money", "hold_not_paid", f"hold {res}")}
    by_kind = {f.kind: f for f in found.findings}
    assert by_kind["paid_without_tickets"].found == \
        f"succeeded, hold {gone} expired, no refund decided"
    assert by_kind["hold_not_paid"].found == f"PaymentIntent {holder} created"
    # repaired: the refund decided, the status put back
    await db.execute("SELECT request_stripe_action('refund', $1, $2, 'oversold', 2500)", late, gone)
    await db.execute("UPDATE payments SET status = 'succeeded', updated_at = now() "
                     "WHERE payment_intent_id = $1", holder)
    fixed = await run(a)
    assert fixed.holds and fixed.checks[0].resolved == 2
    # a refund Stripe refused for good is no refund: the money is kept again
    await db.execute("SELECT finish_stripe_action(id, 'failed', NULL, 'refused') "
                     "FROM stripe_actions WHERE payment_intent_id = $1", late)
    assert named(await run(a)) == {("money", "paid_without_tickets", f"payment {late}")}
