"""Holds and cancels fire no outbox NOTIFY (notifying transactions cannot group-commit): the
payment service wakes its own relay after each commit instead, and the rows are all there."""

from __future__ import annotations

import asyncio

import asyncpg

from boxoffice.payment import reservations
from boxoffice.payment.hold_batch import HoldBatcher
from boxoffice.wire.reservations import HoldRequest
from tests.sql_support import listening, new_event

HELD = "SELECT count(*) FROM outbox WHERE subject = 'reservations.events.held'"


def _req(event_id: str, client: str = "c", key: str | None = None) -> HoldRequest:
    return HoldRequest(client_id=client, event_id=event_id, quantity=1, customer_ref=None,
                       idempotency_key=key, fingerprint="f" if key else None)


async def test_batched_holds_wake_the_relay_instead_of_notifying(db: asyncpg.Pool) -> None:
    event_id = str(await new_event(db, capacity=100, buckets=4))
    wake = asyncio.Event()
    batcher = HoldBatcher(db, 900, wake=wake)
    async with listening(db, "boxoffice_outbox") as heard:
        answers = await asyncio.gather(*(batcher.hold(_req(event_id, key=f"k{i}" if i % 2
                                                           else None)) for i in range(20)))
        assert all(a.status == 201 and not a.replayed for a in answers)
        assert wake.is_set()
        await heard.nothing_more()
    assert await db.fetchval(HELD) == 20  # one 'held' row per hold


async def test_the_full_path_and_cancels_wake_the_relay_instead_of_notifying(
        db: asyncpg.Pool) -> None:
    event_id = str(await new_event(db, capacity=10))
    async with listening(db, "boxoffice_outbox") as heard:
        for key in (None, "k"):
            wake = asyncio.Event()
            answer = await reservations.hold(db, _req(event_id, key=key), 900, wake)
            assert answer.status == 201 and wake.is_set()
            wake.clear()
            hold_id = await db.fetchval("SELECT id FROM reservations ORDER BY created_at DESC, "
                                        "idempotency_key NULLS LAST LIMIT 1")
            cancelled = await reservations.cancel(db, "c", str(hold_id), wake)
            assert cancelled.status == "cancelled" and wake.is_set()
        await heard.nothing_more()
    assert await db.fetchval(HELD) == 2
    assert await db.fetchval("SELECT count(*) FROM outbox "
                             "WHERE subject = 'reservations.events.cancelled'") == 2
    # the quiet flag ended with the cancel's transaction: others notify as before
    async with listening(db, "boxoffice_outbox") as heard:
        await db.execute("INSERT INTO outbox (subject, payload) VALUES ('test.subject', '{}')")
        assert await heard.next() == ""


async def test_a_hold_that_expires_others_wakes_the_reapers_relay(db: asyncpg.Pool) -> None:
    """The full path expires the event's overdue holds before saying sold out: those 'expired'
    rows are the reaper's to relay, so that hold notifies even in a quiet transaction."""
    ev = await new_event(db, capacity=2)
    await db.fetchrow("SELECT id FROM hold_tickets($1, 2, 'c', 0)", ev)
    async with listening(db, "boxoffice_outbox") as heard, db.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT set_config('boxoffice.outbox_quiet', 'on', true)")
            await conn.fetchrow("SELECT id FROM hold_tickets($1, 1, 'c', 900)", ev)
        assert await heard.next() == ""
        await heard.nothing_more()
    assert await db.fetchval("SELECT count(*) FROM outbox "
                             "WHERE subject = 'reservations.events.expired'") == 1
