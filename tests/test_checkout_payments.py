"""PaymentIntents through the real stack: ingress and payment processes, NATS, PostgreSQL, and
localstripe behind a stand-in for Stripe's idempotency-key layer (tests/stripe_keys_proxy.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from boxoffice import idempotency
from boxoffice.embedded import LocalStripe
from tests.checkout_support import Api, Checkout, nobody_answers, start_checkout, stream_messages
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, CLIENT_TOKEN_2, STRIPE_KEY, eventually
from tests.stripe_keys_proxy import StripeKeysProxy

PI_PATH = "/v1/payment_intents"


@pytest_asyncio.fixture
async def stripe_proxy(localstripe: LocalStripe) -> AsyncIterator[StripeKeysProxy]:
    proxy = await StripeKeysProxy(localstripe.url).start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def stripe_intents(session: aiohttp.ClientSession, localstripe: LocalStripe,
                         reservation_id: str) -> list[dict]:
    """Every PaymentIntent localstripe holds for this reservation (its metadata says which)."""
    async with session.get(f"{localstripe.url}/v1/payment_intents?limit=1000000",
                           headers={"Authorization": f"Bearer {STRIPE_KEY}"}) as r:
        assert r.status == 200
        data = (await r.json())["data"]
    return [pi for pi in data if pi.get("metadata", {}).get("reservation_id") == reservation_id]


async def new_hold(api: Api, event_id: str, token: str = CLIENT_TOKEN, quantity: int = 2) -> str:
    r = await api.hold(event_id, quantity, token=token)
    assert r.status == 201, r.body
    return r.json["id"]


@pytest.fixture
def api(start_service, http, stripe_proxy: StripeKeysProxy) -> Api:
    """A client of ingress, with payment behind it talking to Stripe through ``stripe_proxy``."""
    return start_checkout(start_service, http, STRIPE_API_BASE=stripe_proxy.url).api


async def test_a_payment_intent_is_created_once_and_replayed(
        api: Api, http, db: asyncpg.Pool, localstripe, stripe_proxy):
    rid = await new_hold(api, await api.create_event(capacity=20, price=4200))
    r = await api.pay(rid, "order-1")
    assert r.status == 201, r.body
    pi = r.json
    assert set(pi) == {"id", "client_secret", "amount", "currency", "status", "reservation_id"}
    assert (pi["amount"], pi["currency"], pi["reservation_id"]) == (8400, "eur", rid)
    assert pi["id"].startswith("pi_") and pi["client_secret"].startswith(pi["id"])
    assert "Idempotent-Replayed" not in r.headers
    [at_stripe] = await stripe_intents(http, localstripe, rid)
    assert (at_stripe["id"], at_stripe["amount"], at_stripe["metadata"]) == (
        pi["id"], 8400, {"reservation_id": rid})
    key_row = await db.fetchrow("SELECT client_id, request_fingerprint FROM payment_intents_log "
                                "WHERE idempotency_key = 'order-1'")
    assert stripe_proxy.keys_for(PI_PATH) == [idempotency.stripe_key(
        key_row["client_id"], "order-1", key_row["request_fingerprint"])]

    # a retry replays the stored answer byte for byte, whatever the body's spelling
    for raw in (json.dumps({"reservation_id": rid}).encode(),
                b'{ "reservation_id" : "' + rid.upper().encode() + b'" }'):
        again = await api.call("POST", PI_PATH, raw=raw, key="order-1")
        assert (again.status, again.body) == (201, r.body)
        assert again.headers["Idempotent-Replayed"] == "true"
    assert len(stripe_proxy.keys_for(PI_PATH)) == 1  # replays never reach Stripe


async def test_a_key_or_a_reservation_used_twice_is_refused(api: Api, http, localstripe):
    event_id = await api.create_event(capacity=20, price=4200)
    rid = await new_hold(api, event_id)
    assert (await api.pay(rid, "order-1")).status == 201
    # the same key for another request: 422, nothing done
    other_rid = await new_hold(api, event_id)
    mismatch = await api.pay(other_rid, "order-1")
    assert (mismatch.status, mismatch.code) == (422, "idempotency_key_mismatch")
    assert await stripe_intents(http, localstripe, other_rid) == []
    # one reservation, one live PaymentIntent: another key for it is refused (not stored)
    second = await api.pay(rid, "order-1-again")
    assert (second.status, second.code) == (409, "payment_intent_exists")


async def test_a_missing_or_invalid_key_is_refused(api: Api):
    rid = await new_hold(api, await api.create_event(capacity=20, price=4200))
    for key, code in ((None, "idempotency_key_missing"), ("", "idempotency_key_invalid"),
                      ("x" * 256, "idempotency_key_invalid"),
                      ("caf\u00e9", "idempotency_key_invalid"),
                      ("new\nline", "idempotency_key_invalid")):
        try:
            bad = await api.pay(rid, key)
        except ValueError:  # aiohttp refuses to send some of these header values at all
            continue
        assert (bad.status, bad.code) == (400, code), (key, bad.body)
        assert bad.headers["Content-Type"].startswith("application/problem+json")
    assert (await api.pay(rid, "k" * 255)).status == 201


async def test_keys_and_reservations_are_scoped_to_the_client(api: Api):
    event_id = await api.create_event(capacity=20, price=4200)
    rid = await new_hold(api, event_id)
    pi = (await api.pay(rid, "order-1")).json
    # the same key from client 2 is its own
    rid2 = await new_hold(api, event_id, token=CLIENT_TOKEN_2)
    theirs = await api.pay(rid2, "order-1", token=CLIENT_TOKEN_2)
    assert theirs.status == 201 and theirs.json["id"] != pi["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    # and client 2 cannot pay (or probe) client 1's reservation
    stolen = await api.pay(rid, "steal-1", token=CLIENT_TOKEN_2)
    assert (stolen.status, stolen.code) == (404, "reservation_not_found")


async def test_a_refused_request_leaves_its_key_free(api: Api, db: asyncpg.Pool):
    event_id = await api.create_event(capacity=20, price=4200)
    # validation failures are not stored: the key is free for the corrected request
    unknown = await api.pay(str(uuid.uuid4()), "order-3")
    assert (unknown.status, unknown.code) == (404, "reservation_not_found")
    cancelled = await new_hold(api, event_id)
    assert (await api.call("POST", f"/v1/reservations/{cancelled}/cancel")).status == 200
    inactive = await api.pay(cancelled, "order-3")
    assert (inactive.status, inactive.code) == (409, "reservation_not_active")
    rid3 = await new_hold(api, event_id)
    assert (await api.pay(rid3, "order-3")).status == 201
    for body, status in (({"reservation_id": "nope"}, 422), ({}, 422),
                         ({"reservation_id": rid3, "amount": 1}, 422)):
        bad = await api.call("POST", PI_PATH, body=body, key="order-4")
        assert bad.status == status, bad.body
    assert (await api.call("POST", PI_PATH, raw=b"{", key="order-4")).code == "invalid_json"
    assert (await api.call("POST", PI_PATH, raw=b"{}" + b" " * (2 << 20),
                           key="order-4")).status == 413
    assert (await api.call("POST", PI_PATH, body={"reservation_id": rid3}, key="order-4",
                           token=None)).status == 401
    assert (await api.call("POST", PI_PATH, body={"reservation_id": rid3}, key="order-4",
                           token=ADMIN_TOKEN)).status == 403
    assert await db.fetchval("SELECT count(*) FROM payment_intents_log WHERE idempotency_key "
                             "IN ('order-3', 'order-4')") == 1


async def test_a_payment_intent_is_recorded_audited_and_announced(
        api: Api, db: asyncpg.Pool, nats_url):
    rid = await new_hold(api, await api.create_event(capacity=20, price=4200))
    pi = (await api.pay(rid, "order-1")).json
    # the record: payments row, reservation, audit trail, PAYMENTS event
    row = await db.fetchrow("SELECT * FROM payments WHERE payment_intent_id = $1", pi["id"])
    assert (row["status"], row["amount"], str(row["reservation_id"])) == ("created", 8400, rid)
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1",
                             uuid.UUID(rid)) == pi["id"]
    audit = await api.call("GET", f"/v1/admin/payments?reservation_id={rid}", token=ADMIN_TOKEN)
    assert audit.status == 200
    [entry] = [e for e in audit.json["items"] if e["idempotency_key"] == "order-1"]
    assert (entry["recovery_point"], entry["response_status"], entry["stripe_payment_intent_id"],
            entry["attempts"], entry["payment_status"]) == ("finished", 201, pi["id"], 1, "created")
    assert pi["client_secret"] not in audit.body.decode()
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "boxoffice.cli", "payments", "--reservation-id", rid,
        env={**os.environ, "INGRESS_URL": api.base, "ADMIN_API_TOKEN": ADMIN_TOKEN,
             "BOXOFFICE_HOME": "/nonexistent"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await cli.communicate()
    assert cli.returncode == 0, err
    assert [e["stripe_payment_intent_id"] for e in json.loads(out)["items"]] == [pi["id"]]
    assert (await api.call("GET", "/v1/admin/payments?limit=0", token=ADMIN_TOKEN)).status == 422
    assert (await api.call("GET", "/v1/admin/payments?bogus=1", token=ADMIN_TOKEN)).status == 422
    assert (await api.call("GET", "/v1/admin/payments")).status == 403
    events = await eventually(lambda: stream_messages(nats_url, "PAYMENTS", 1), what="PAYMENTS")
    created = [m.data for m in events if m.data["payment_intent_id"] == pi["id"]]
    assert [(m["reservation_id"], m["amount"], m["currency"]) for m in created] == [
        (rid, 8400, "eur")]
    assert {m.subject for m in events} == {"payments.events.created"}


async def test_stripes_definitive_refusal_is_stored_and_replayed(api: Api, db: asyncpg.Pool):
    # a definitive refusal from Stripe (here: a free ticket, amount 0) is stored and replayed;
    # it holds no PaymentIntent, so the client may try again under a new key
    free = await new_hold(api, await api.create_event(capacity=5, price=0))
    refused = await api.pay(free, "free-1")
    assert (refused.status, refused.code) == (422, "payment_rejected"), refused.body
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    again = await api.pay(free, "free-1")
    assert (again.status, again.body) == (422, refused.body)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await api.pay(free, "free-2")).code == "payment_rejected"
    assert await db.fetchval("SELECT count(*) FROM payments WHERE reservation_id = $1",
                             uuid.UUID(free)) == 0
    assert await db.fetchval("SELECT recovery_point FROM payment_intents_log "
                             "WHERE idempotency_key = 'free-1'") == "finished"


async def test_one_key_fifty_concurrent_requests(start_service, http,
                                                 db: asyncpg.Pool, localstripe, stripe_proxy):
    api = start_checkout(start_service, http, STRIPE_API_BASE=stripe_proxy.url).api
    rid = await new_hold(api, await api.create_event(capacity=5))
    results = await asyncio.gather(*(api.pay(rid, "burst-key") for _ in range(50)))
    by_status = collections.Counter(r.status for r in results)
    ok = [r for r in results if r.status == 201]
    assert ok and by_status[201] + by_status[409] == 50, by_status
    assert len({r.body for r in ok}) == 1  # every 2xx body identical
    for r in results:
        if r.status == 409:
            assert r.code == "idempotency_key_in_use" and int(r.headers["Retry-After"]) >= 1
    assert len(await stripe_intents(http, localstripe, rid)) == 1
    assert await db.fetchval("SELECT count(*) FROM payment_intents_log") == 1
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


async def _crash_and_retry(checkout: Checkout, http, localstripe, stripe_proxy, db,
                           failpoint: str) -> tuple[str, dict, list]:
    """Arm a failpoint, send one request (the service SIGKILLs itself there), restart the
    service without it and retry the same key until a final answer."""
    api = checkout.api
    checkout.payment.stop()
    # (extra variables of a start are not kept: name Stripe's address again)
    checkout.payment.start(BOXOFFICE_FAILPOINT=failpoint, STRIPE_API_BASE=stripe_proxy.url)
    rid = await new_hold(api, await api.create_event(capacity=5))
    first = asyncio.ensure_future(api.pay(rid, "crash-key"))
    await eventually(lambda: not checkout.payment.running, timeout=15, what="the crash")
    assert checkout.payment.proc.returncode == -9  # a real SIGKILL, mid-request
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    row = await db.fetchrow("SELECT recovery_point, locked_at, attempts FROM payment_intents_log")
    assert (row["recovery_point"], row["attempts"]) == ("started", 1) and row["locked_at"]
    checkout.payment.start(STRIPE_API_BASE=stripe_proxy.url)
    final, tried = await api.pay_until_done(rid, "crash-key")
    assert final.status == 201, final.body
    return rid, final.json, tried


async def test_crash_after_stripe_answered(start_service, http, db, localstripe,
                                           stripe_proxy):
    checkout = start_checkout(start_service, http, STRIPE_API_BASE=stripe_proxy.url)
    rid, pi, tried = await _crash_and_retry(checkout, http, localstripe, stripe_proxy, db,
                                            "after_stripe_call")
    # the retry sent Stripe the same key and got the original PaymentIntent back
    keys = stripe_proxy.keys_for(PI_PATH)
    assert len(keys) == 2 and keys[0] == keys[1]
    assert [r.replayed for r in stripe_proxy.requests if r.path == PI_PATH] == [False, True]
    [at_stripe] = await stripe_intents(http, localstripe, rid)
    assert at_stripe["id"] == pi["id"]
    log = await db.fetchrow("SELECT recovery_point, attempts, stripe_payment_intent_id "
                            "FROM payment_intents_log")
    assert (log["recovery_point"], log["attempts"], log["stripe_payment_intent_id"]) == (
        "finished", 2, pi["id"])
    # while the dead worker's lease lasted, retries were told to come back later
    assert all(r.code == "idempotency_key_in_use" for r in tried[:-1])
    replay = await checkout.api.pay(rid, "crash-key")
    assert replay.json == pi and replay.headers["Idempotent-Replayed"] == "true"


async def test_crash_before_stripe_called(start_service, http, db, localstripe,
                                          stripe_proxy):
    checkout = start_checkout(start_service, http, STRIPE_API_BASE=stripe_proxy.url)
    rid, pi, _ = await _crash_and_retry(checkout, http, localstripe, stripe_proxy, db,
                                        "before_stripe_call")
    assert len(stripe_proxy.keys_for(PI_PATH)) == 1
    [at_stripe] = await stripe_intents(http, localstripe, rid)
    assert at_stripe["id"] == pi["id"]
    assert await db.fetchval("SELECT count(*) FROM payments WHERE reservation_id = $1",
                             uuid.UUID(rid)) == 1


async def test_stripe_unreachable_then_back(start_service, http, db, localstripe,
                                            stripe_proxy, nats_url):
    checkout = start_checkout(start_service, http, STRIPE_API_BASE=stripe_proxy.url)
    api = checkout.api
    rid = await new_hold(api, await api.create_event(capacity=5))
    await stripe_proxy.stop()
    r = await api.pay(rid, "outage-key")
    assert (r.status, r.code) == (503, "upstream_unavailable")
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["Content-Type"].startswith("application/problem+json")
    row = await db.fetchrow("SELECT recovery_point, locked_at, last_error FROM payment_intents_log")
    assert row["recovery_point"] == "started" and row["locked_at"] is None and row["last_error"]
    assert STRIPE_KEY not in r.body.decode() and STRIPE_KEY not in row["last_error"]

    await stripe_proxy.start()
    again = await api.pay(rid, "outage-key")
    assert again.status == 201, again.body
    assert len(await stripe_intents(http, localstripe, rid)) == 1
    assert (await api.pay(rid, "outage-key")).body == again.body

    # the payment service itself away: 503 at once, with Retry-After, never a hang or a 500;
    # a finished key is still replayed (ingress keeps finished answers for a minute)
    rid2 = await new_hold(api, await api.create_event(capacity=5))
    checkout.payment.kill()
    await eventually(lambda: nobody_answers(nats_url, "payments.intents.create"),
                     what="NATS to drop the killed service's subscription")
    down = await api.pay(rid2, "outage-key-2", timeout=5)
    assert (down.status, down.code) == (503, "service_unavailable")
    assert down.headers["Retry-After"]
    cached = await api.pay(rid, "outage-key", timeout=5)
    assert (cached.status, cached.body) == (201, again.body)
    assert cached.headers["Idempotent-Replayed"] == "true"
    assert (await api.pay(rid2, "outage-key", timeout=5)).code == "idempotency_key_mismatch"
    hold = await api.hold(str(uuid.uuid4()), 1)
    assert hold.status == 503 and "Retry-After" in hold.headers
    assert STRIPE_KEY not in checkout.payment.logs()
