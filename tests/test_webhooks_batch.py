"""Stripe events applied in batches: one transaction a batch, each event in a savepoint of its
own. An event that fails is rolled back alone and counted once; its neighbours commit."""

from __future__ import annotations

import json
import uuid

import asyncpg

from boxoffice import wire
from boxoffice.webhook.stripe_events import Failure, Processor, describe
from boxoffice.wire.stripe import StripeEvent
from tests.harness import eventually
from tests.sql_support import inventory, new_event, new_hold
from tests.test_webhooks_faults import publish_all
from tests.webhooks_support import event, new_pi, payment_intent


async def refuse_payments_of(db: asyncpg.Pool, pi_id: str) -> None:
    """The effects of ``pi_id``'s events fail (a bug, stood in for by a refusing trigger)."""
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


async def paid_holds(db: asyncpg.Pool, n: int, buckets: int = 1
                     ) -> tuple[uuid.UUID, list[uuid.UUID], list[str], list[bytes]]:
    """``n`` holds of one ticket and a payment_intent.succeeded event for each."""
    ev = await new_event(db, capacity=n, buckets=buckets)
    holds = [await new_hold(db, ev, 1) for _ in range(n)]
    pis = [new_pi() for _ in holds]
    bodies = [event("payment_intent.succeeded", payment_intent(pi, hold, amount=2500))
              for pi, hold in zip(pis, holds)]
    return ev, holds, pis, bodies


async def test_a_failing_event_is_rolled_back_alone_and_counted_once(db: asyncpg.Pool) -> None:
    ev, holds, pis, bodies = await paid_holds(db, 5)
    await refuse_payments_of(db, pis[2])
    bodies.append(bodies[0])  # a redelivery of the first, in the same batch
    batch = [(wire.decode(b, StripeEvent), b.decode()) for b in bodies]
    processor = Processor(db, (0.2, 0.3))
    async with db.acquire() as conn:
        results = await processor.apply_batch(batch, conn)

    assert [r.name for r in results if not isinstance(r, Failure)] == [
        "completed", "completed", "completed", "completed", "duplicate"]
    failure = results[2]
    assert isinstance(failure, Failure)
    assert failure.result == (1, "received")  # counted once, to be retried
    assert "effects refused for this test" in describe(failure.exc)
    rows = {r["event_id"]: r for r in await db.fetch("SELECT * FROM webhook_events_log")}
    ids = [json.loads(b)["id"] for b in bodies[:5]]
    assert [rows[i]["processing_status"] for i in ids] == [
        "processed", "processed", "received", "processed", "processed"]
    assert all(rows[i]["attempts"] == 1 for i in ids)
    assert "effects refused for this test" in rows[ids[2]]["last_error"]
    # the failed event left nothing; its neighbours are committed
    assert await db.fetchval("SELECT count(*) FROM payments WHERE status = 'succeeded'") == 4
    assert await db.fetchval("SELECT count(*) FROM payments WHERE payment_intent_id = $1",
                             pis[2]) == 0
    statuses = {r["id"]: r["status"] for r in await db.fetch(
        "SELECT id, status FROM reservations WHERE id = ANY($1::uuid[])", holds)}
    assert [statuses[h] for h in holds] == [
        "completed", "completed", "active", "completed", "completed"]
    assert await inventory(db, ev) == (1, 4)


async def test_an_event_of_the_other_mode_fails_at_once_and_alone(db: asyncpg.Pool) -> None:
    _, holds, _, bodies = await paid_holds(db, 3)
    live = json.loads(bodies[1])
    live["livemode"] = True
    bodies[1] = json.dumps(live).encode()
    batch = [(wire.decode(b, StripeEvent), b.decode()) for b in bodies]
    async with db.acquire() as conn:
        results = await Processor(db, (0.2, 0.3)).apply_batch(batch, conn)
    assert isinstance(results[1], Failure) and results[1].result == (1, "failed")
    assert [getattr(r, "name", None) for r in results] == ["completed", None, "completed"]
    assert await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'completed' "
                             "AND id = ANY($1::uuid[])", holds) == 2


async def test_the_service_commits_the_neighbours_of_a_failing_event(
        db: asyncpg.Pool, start_service, nats_url: str) -> None:
    ev, _, pis, bodies = await paid_holds(db, 120, buckets=8)
    await refuse_payments_of(db, pis[60])
    refused = json.loads(bodies[60])["id"]
    await publish_all(nats_url, bodies)  # all waiting: the service takes them in full batches
    webhook = start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3", WEBHOOK_BATCH_SIZE="40")

    async def failed() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM webhook_events_log WHERE event_id = $1 "
                                 "AND processing_status = 'failed'", refused)
    row = await eventually(failed, 60, "the refused event to be marked failed")
    assert row["attempts"] == 3  # each attempt counted once, none lost to a rolled-back batch
    await eventually(lambda: "failed after 3 attempts" in webhook.logs(),
                     what="the final failure to be reported")
    others = await db.fetch("SELECT processing_status, attempts FROM webhook_events_log "
                            "WHERE event_id <> $1", refused)
    assert len(others) == 119
    assert {(r["processing_status"], r["attempts"]) for r in others} == {("processed", 1)}
    assert await inventory(db, ev) == (1, 119)


async def test_an_event_that_fails_its_whole_batch_is_found_and_counted_alone(
        db: asyncpg.Pool, start_service, nats_url: str) -> None:
    ev, _, _, bodies = await paid_holds(db, 60, buckets=4)
    # an amount PostgreSQL cannot take as bigint: the batch's statement itself is refused
    huge = json.loads(bodies[30])
    huge["data"]["object"]["amount"] = 2**63 + 5
    bodies[30] = json.dumps(huge).encode()
    await publish_all(nats_url, bodies)
    webhook = start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3", WEBHOOK_BATCH_SIZE="60")

    async def failed() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM webhook_events_log WHERE event_id = $1 "
                                 "AND processing_status = 'failed'", huge["id"])
    row = await eventually(failed, 60, "the event to be marked failed")
    assert row["attempts"] == 3
    assert "applied one at a time" in webhook.logs()
    others = await db.fetch("SELECT processing_status, attempts FROM webhook_events_log "
                            "WHERE event_id <> $1", huge["id"])
    assert len(others) == 59
    assert {(r["processing_status"], r["attempts"]) for r in others} == {("processed", 1)}
    assert await inventory(db, ev) == (1, 59)
