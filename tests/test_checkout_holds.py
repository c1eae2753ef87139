"""Holds through the real stack (ingress and payment processes, NATS, PostgreSQL), one behaviour
a test."""

from __future__ import annotations

import asyncio
import collections
import uuid

import asyncpg
import pytest

from tests.checkout_support import Api, start_checkout, stream_messages
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, CLIENT_TOKEN_2, eventually


@pytest.fixture
def api(start_service, http) -> Api:
    """A client of ingress, with payment behind it."""
    return start_checkout(start_service, http).api


async def test_a_hold_takes_tickets_at_the_events_price(api: Api, db: asyncpg.Pool):
    event_id = await api.create_event(capacity=10, price=4500)
    r = await api.hold(event_id, 3, customer_ref="cust-1")
    assert r.status == 201, r.body
    hold = r.json
    assert set(hold) >= {"id", "event_id", "quantity", "status", "expires_at", "amount", "currency"}
    assert (hold["event_id"], hold["quantity"], hold["status"]) == (event_id, 3, "active")
    assert (hold["amount"], hold["currency"], hold["customer_ref"]) == (13500, "eur", "cust-1")
    ttl = await db.fetchval("SELECT extract(epoch FROM expires_at - created_at) FROM reservations "
                            "WHERE id = $1", uuid.UUID(hold["id"]))
    assert abs(float(ttl) - 900) < 1  # RESERVATION_TTL_SECONDS default
    state = await api.event(event_id)
    assert (state["held"], state["sold"], state["available"]) == (3, 0, 7)
    got = await api.call("GET", f"/v1/reservations/{hold['id']}")
    assert got.status == 200 and got.json["status"] == "active" and got.json["id"] == hold["id"]


async def test_another_clients_hold_does_not_exist(api: Api):
    event_id = await api.create_event(capacity=10, price=4500)
    hold = (await api.hold(event_id, 3)).json
    other = await api.call("GET", f"/v1/reservations/{hold['id']}", token=CLIENT_TOKEN_2)
    assert (other.status, other.code) == (404, "reservation_not_found")
    other = await api.call("POST", f"/v1/reservations/{hold['id']}/cancel", token=CLIENT_TOKEN_2)
    assert (other.status, other.code) == (404, "reservation_not_found")
    assert (await api.event(event_id))["held"] == 3


async def test_cancel_releases_the_tickets_once_and_says_so_on_the_bus(
        api: Api, db: asyncpg.Pool, nats_url: str):
    event_id = await api.create_event(capacity=10, price=4500)
    hold = (await api.hold(event_id, 3)).json
    # cancel releases the tickets once; a second cancel changes nothing
    for _ in range(2):
        c = await api.call("POST", f"/v1/reservations/{hold['id']}/cancel")
        assert c.status == 200 and c.json["status"] == "cancelled", c.body
        assert (await api.event(event_id))["available"] == 10
    held = await db.fetchval("SELECT sum(held) FROM inventory_buckets WHERE event_id = $1",
                             uuid.UUID(event_id))
    assert held == 0
    # the hold and its release went out on RESERVATIONS, once each
    events = await eventually(lambda: stream_messages(nats_url, "RESERVATIONS", 2),
                              what="reservation events")
    assert [(m.subject, m.data["reservation_id"]) for m in events] == [
        ("reservations.events.held", hold["id"]), ("reservations.events.cancelled", hold["id"])]


async def test_an_idempotency_key_makes_a_hold_happen_once_per_client(api: Api):
    event_id = await api.create_event(capacity=10, price=4500)
    # an Idempotency-Key makes the hold happen once; the retry replays the stored body
    first = await api.hold(event_id, 2, key="hold-key-1")
    again = await api.hold(event_id, 2, key="hold-key-1")
    assert first.status == again.status == 201
    assert again.body == first.body and again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert (await api.event(event_id))["held"] == 2
    # same key, other request: 422; the same key under another client is another key
    mismatch = await api.hold(event_id, 1, key="hold-key-1")
    assert (mismatch.status, mismatch.code) == (422, "idempotency_key_mismatch")
    theirs = await api.hold(event_id, 2, key="hold-key-1", token=CLIENT_TOKEN_2)
    assert theirs.status == 201 and theirs.json["id"] != first.json["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert (await api.event(event_id))["held"] == 4


async def test_sold_out_and_unknown_get_clear_answers_and_store_nothing(api: Api):
    event_id = await api.create_event(capacity=10, price=4500)
    assert (await api.hold(event_id, 4)).status == 201
    # sold out and unknown events: clear answers, nothing stored under the key
    sold_out = await api.hold(event_id, 7, key="hold-key-2")
    assert (sold_out.status, sold_out.code) == (409, "sold_out")
    assert sold_out.headers["Content-Type"].startswith("application/problem+json")
    ok = await api.hold(event_id, 6, key="hold-key-2")
    assert ok.status == 201 and (await api.event(event_id))["available"] == 0
    unknown = await api.hold(str(uuid.uuid4()), 1)
    assert (unknown.status, unknown.code) == (404, "event_not_found")
    missing = await api.call("GET", f"/v1/reservations/{uuid.uuid4()}")
    assert (missing.status, missing.code) == (404, "reservation_not_found")
    junk = await api.call("GET", "/v1/reservations/not-a-uuid")
    assert (junk.status, junk.code) == (404, "reservation_not_found")


async def _burst(api, event_id: str, n: int, quantity: int) -> collections.Counter:
    results = await asyncio.gather(*(api.hold(event_id, quantity) for _ in range(n)))
    out = collections.Counter((r.status, r.code) for r in results)
    return out


async def test_concurrent_holds_never_oversell(start_service, http, db: asyncpg.Pool):
    checkout = start_checkout(start_service, http)
    api = checkout.api
    # 200 buyers, 50 tickets left (of 80), one at a time and then several at a time
    single = await api.create_event(capacity=80)
    pre = await api.hold(single, 30)
    assert pre.status == 201
    out = await _burst(api, single, 200, 1)
    assert out == {(201, None): 50, (409, "sold_out"): 150}, out
    assert (await api.event(single))["available"] == 0

    # quantities above 1 on an event split into 8 inventory rows: holds spanning rows too
    multi = await api.create_event(capacity=50, buckets=8)
    out = await _burst(api, multi, 200, 3)
    assert out == {(201, None): 16, (409, "sold_out"): 184}, out
    state = await api.event(multi)
    assert (state["held"], state["available"]) == (48, 2)
    rows = await db.fetch("SELECT capacity, held, sold FROM inventory_buckets WHERE event_id = $1",
                          uuid.UUID(multi))
    assert sum(r["held"] for r in rows) == 48
    assert all(r["held"] + r["sold"] <= r["capacity"] for r in rows)
    total = await db.fetchval("SELECT sum(quantity) FROM reservations WHERE event_id = $1 "
                              "AND status = 'active'", uuid.UUID(multi))
    assert total == 48

    # one Idempotency-Key sent 30 times at once: one hold; every 2xx the same body
    keyed = await api.create_event(capacity=100)
    results = await asyncio.gather(*(api.hold(keyed, 2, key="burst") for _ in range(30)))
    ok = [r for r in results if r.status == 201]
    assert ok and all(r.code == "idempotency_key_in_use" for r in results if r.status != 201)
    assert len({r.body for r in ok}) == 1
    assert (await api.event(keyed))["held"] == 2

    # mixed quantities race for the last 2 tickets: never more than 2 held
    out = await _burst(api, multi, 40, 1) + await _burst(api, multi, 10, 2)
    assert out[(201, None)] <= 2
    assert (await api.event(multi))["available"] >= 0
    assert await db.fetchval("SELECT bool_and(held + sold <= capacity) FROM inventory_buckets")
    # the bursts were served in shared transactions (group commit), with a slow path at the end
    async with http.get(checkout.payment.url + "/metrics") as r:
        metrics = await r.text()
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith(("boxoffice_hold_batch_size_count",
                                   "boxoffice_hold_batch_size_sum", "boxoffice_hold_slow_path"))}
    assert batches["boxoffice_hold_batch_size_sum"] > batches["boxoffice_hold_batch_size_count"]
    assert batches["boxoffice_hold_slow_path_total"] > 0


async def test_overdue_holds_never_count(start_service, http, db: asyncpg.Pool):
    # no reaper runs here: availability must ignore overdue holds by itself
    api = start_checkout(start_service, http, RESERVATION_TTL_SECONDS="1").api
    event_id = await api.create_event(capacity=4)
    r = await api.hold(event_id, 4)
    assert r.status == 201
    assert (await api.hold(event_id, 1)).code == "sold_out"

    async def overdue() -> bool:
        got = await api.call("GET", f"/v1/reservations/{r.json['id']}")
        return got.json["status"] == "expired"

    await eventually(overdue, timeout=10, what="the hold to be past its expires_at")
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                             uuid.UUID(r.json["id"])) == "active"  # not reaped yet
    assert (await api.event(event_id))["available"] == 4
    cancel = await api.call("POST", f"/v1/reservations/{r.json['id']}/cancel")
    assert (cancel.status, cancel.code) == (409, "reservation_not_active")
    again = await api.hold(event_id, 4)
    assert again.status == 201, again.body
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1",
                             uuid.UUID(r.json["id"])) == "expired"


async def test_bad_input_changes_nothing(start_service, http, db: asyncpg.Pool):
    api = start_checkout(start_service, http).api
    event_id = await api.create_event(capacity=5)
    good = {"event_id": event_id, "quantity": 1}
    cases = [
        ({"raw": b"{not json"}, 400, "invalid_json"),
        ({"raw": b""}, 400, "invalid_json"),
        ({"body": [good]}, 422, "validation_failed"),
        ({"body": {**good, "quantity": "1"}}, 422, "validation_failed"),
        ({"body": {**good, "quantity": 1.5}}, 422, "validation_failed"),
        ({"body": {**good, "quantity": True}}, 422, "validation_failed"),
        ({"body": {**good, "quantity": 0}}, 422, "validation_failed"),
        ({"body": {**good, "quantity": 101}}, 422, "validation_failed"),
        ({"body": {**good, "quantity": -3}}, 422, "validation_failed"),
        ({"body": {"event_id": event_id}}, 422, "validation_failed"),
        ({"body": {**good, "event_id": "nope"}}, 422, "validation_failed"),
        ({"body": {**good, "price": 1}}, 422, "validation_failed"),
        ({"body": {**good, "customer_ref": "x" * 201}}, 422, "validation_failed"),
        ({"raw": b'{"event_id": "' + b"a" * (2 << 20) + b'"}'}, 413, "payload_too_large"),
        ({"body": good, "token": None}, 401, "unauthorized"),
        ({"body": good, "token": "wrong-token-xxxxxxxxxxxxx"}, 401, "unauthorized"),
        ({"body": good, "token": ADMIN_TOKEN}, 403, "forbidden"),
        ({"body": good, "key": ""}, 400, "idempotency_key_invalid"),
        ({"body": good, "key": "k" * 256}, 400, "idempotency_key_invalid"),
        ({"body": good, "key": "tab\tkey"}, 400, "idempotency_key_invalid"),
    ]
    for kw, status, code in cases:
        r = await api.call("POST", "/v1/reservations", **kw)
        assert (r.status, r.code) == (status, code), (kw.get("body"), r.status, r.body[:300])
        assert r.headers["Content-Type"].startswith("application/problem+json")
    r = await api.call("POST", "/v1/reservations", body=good, headers={"Authorization": "Basic x"},
                       token=None)
    assert r.status == 401
    for path in ("/v1/reservations/" + str(uuid.uuid4()), ):
        r = await api.call("GET", path, token=ADMIN_TOKEN)
        assert (r.status, r.code) == (403, "forbidden")
    assert await db.fetchval("SELECT count(*) FROM reservations") == 0
    assert (await api.event(event_id))["available"] == 5
    assert (await api.hold(event_id, 5, token=CLIENT_TOKEN)).status == 201
