"""intents.py's own mechanisms, in process: the payment domain called directly with a real pool
and a real Stripe emulator, for what a whole-process test cannot observe (the relay's wake-up
event, the lease renewal's timing)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import stripe

from boxoffice import idempotency
from boxoffice.embedded import LocalStripe
from boxoffice.payment import intents
from boxoffice.payment.stripe_client import StripeGateway
from boxoffice.wire import payments as pw
from tests.harness import STRIPE_KEY
from tests.sql_support import new_event, new_hold, outbox


@pytest_asyncio.fixture
async def gateway(localstripe: LocalStripe) -> AsyncIterator[StripeGateway]:
    http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=5))
    try:
        yield StripeGateway(stripe.StripeClient(STRIPE_KEY, http_client=http,
                                                base_addresses={"api": localstripe.url}))
    finally:
        await http.close_async()


def request(res: uuid.UUID, key: str = "k1") -> pw.CreateIntentRequest:
    return pw.CreateIntentRequest(client_id="client", idempotency_key=key,
                                  reservation_id=str(res), fingerprint="fp")


async def turns_until(event: asyncio.Event, most: int = 10) -> int:
    """How many turns of the event loop pass before ``event`` is set (``most`` + 1: never)."""
    for turn in range(most + 1):
        if event.is_set():
            return turn
        await asyncio.sleep(0)
    return most + 1


async def test_a_record_wakes_its_own_relay(db: asyncpg.Pool, gateway: StripeGateway) -> None:
    """The record's outbox row is written without a NOTIFY: the process's relay is woken
    directly, once the row is committed, and not before the turn of the event loop that writes
    the reply (the handler's caller queues it when create_intent returns; the NATS client's
    flusher writes it one turn later); a replay writes nothing and wakes nobody."""
    wake = asyncio.Event()
    deps = intents.Deps(pool=db, stripe=gateway, relay_wake=wake)
    res = await new_hold(db, await new_event(db))
    created = await intents.create_intent(deps, request(res))
    assert created.status == 201 and not created.replayed, created.body
    assert not wake.is_set()  # the reply is queued in this turn: the relay must not run first
    assert await turns_until(wake) == 2
    [(subject, event)] = await outbox(db, "payments.")  # committed before the wake-up
    assert subject == "payments.events.created" and event["reservation_id"] == str(res)
    wake.clear()
    replay = await intents.create_intent(deps, request(res))
    assert replay.replayed and replay.body == created.body
    assert await turns_until(wake) > 10


async def claimed(db: asyncpg.Pool, res: uuid.UUID, lease: float, key: str = "k1"
                  ) -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT * FROM claim_payment_intent('client', $1, 'fp', $2, $3, $4, $5)", key, res,
        idempotency.stripe_key("client", key, "fp"), pw.CREATE_INTENT_ROUTE, lease)


def as_claim(row: asyncpg.Record, res: uuid.UUID) -> intents.Claim:
    return intents.Claim(log_id=row["log_id"], client_id="client", idempotency_key="k1",
                         lease_token=row["lease_token"], stripe_key=row["stripe_key"],
                         amount=row["amount"], currency=row["currency"],
                         reservation_id=str(res))


async def test_a_slow_call_keeps_its_lease_and_stops_renewing_after(
        db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that outlasts the lease several times over keeps the key: another worker is told
    it is in use throughout (a lease not renewed would lapse and be taken over). Once the call
    is over, no renewal runs any more: the lease lapses as a crashed worker's would."""
    lease = 1.0
    monkeypatch.setattr(intents, "RENEW_EVERY", 0.2)
    res = await new_hold(db, await new_event(db))
    row = await claimed(db, res, lease)
    assert row["outcome"] == "claimed"
    async with intents._leased(db, as_claim(row, res)):
        for _ in range(8):  # 3.2 s, three leases long
            await asyncio.sleep(0.4)
            other = await claimed(db, res, lease)
            assert other["outcome"] == "in_use", dict(other)
    after = await db.fetchval("SELECT locked_at FROM payment_intents_log WHERE id = $1",
                              row["log_id"])
    await asyncio.sleep(0.7)  # more than three renewal periods
    assert await db.fetchval("SELECT locked_at FROM payment_intents_log WHERE id = $1",
                             row["log_id"]) == after
    await asyncio.sleep(lease)
    assert (await claimed(db, res, lease))["outcome"] == "resumed"


async def test_a_fast_call_never_renews(db: asyncpg.Pool) -> None:
    """A call shorter than RENEW_EVERY writes nothing to the key (no renewal starts later)."""
    res = await new_hold(db, await new_event(db))
    row = await claimed(db, res, 5.0)
    before = await db.fetchval("SELECT locked_at FROM payment_intents_log WHERE id = $1",
                               row["log_id"])
    async with intents._leased(db, as_claim(row, res)):
        await asyncio.sleep(0.01)
    await asyncio.sleep(intents.RENEW_EVERY + 0.3)
    assert await db.fetchval("SELECT locked_at FROM payment_intents_log WHERE id = $1",
                             row["log_id"]) == before


async def test_a_renewal_never_extends_a_lease_taken_over(
        db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose lease lapsed and was taken over keeps renewing in vain: the successor's
    lease is untouched (the renewal is conditional on the token)."""
    monkeypatch.setattr(intents, "RENEW_EVERY", 0.1)
    res = await new_hold(db, await new_event(db))
    first = await claimed(db, res, 0)
    async with intents._leased(db, as_claim(first, res)):
        second = await claimed(db, res, 0)  # lapsed at once: taken over
        assert second["outcome"] == "resumed"
        taken = await db.fetchrow("SELECT locked_at, lease_token FROM payment_intents_log")
        await asyncio.sleep(0.45)  # several renewals of the first worker
    assert await db.fetchrow("SELECT locked_at, lease_token FROM payment_intents_log") == taken
