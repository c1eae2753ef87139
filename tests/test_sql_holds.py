"""The SQL functions of holds, called directly, outcome by outcome: seed the rows, call the
function, check the rows (create_ticketed_event, hold_tickets and its passes, hold_probe,
hold_tickets_batch, release_reservation, complete_reservation, the never_oversold constraint)."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from datetime import timedelta

import asyncpg
import pytest

from boxoffice.payment import reservations
from boxoffice.wire.reservations import HoldRequest
from tests.sql_support import (
    allocations,
    buckets,
    hold,
    inventory,
    listening,
    new_event,
    no_wait,
    outbox,
    pi,
    sqlstate_of,
    status,
    ts,
    waiting_for_lock,
)

HELD = "reservations.events.held"
INSERT_OUTBOX = "INSERT INTO outbox (subject, payload) VALUES ('test.subject', '{}')"


# --- create_ticketed_event --------------------------------------------------------------------

async def test_create_ticketed_event_spreads_capacity_over_buckets(db: asyncpg.Pool) -> None:
    given = uuid.uuid4()
    ev = await db.fetchval("SELECT create_ticketed_event($1, 'show', 10, 2500, 'eur', 4)", given)
    assert ev == given
    row = await db.fetchrow("SELECT name, capacity, price, currency, buckets FROM ticketed_events "
                            "WHERE id = $1", ev)
    assert tuple(row) == ("show", 10, 2500, "eur", 4)
    assert await buckets(db, ev) == [(3, 0, 0), (3, 0, 0), (2, 0, 0), (2, 0, 0)]
    # fewer tickets than buckets: the first ones get one each, the rest none
    assert await buckets(db, await new_event(db, capacity=2, buckets=4)) == [
        (1, 0, 0), (1, 0, 0), (0, 0, 0), (0, 0, 0)]
    assert await buckets(db, await new_event(db, capacity=7)) == [(7, 0, 0)]  # one by default


async def test_a_hot_events_buckets_are_spread_over_pages(db: asyncpg.Pool) -> None:
    """Every hold updates a bucket row: rows packed on one page that every hold pins could not be
    pruned of their dead versions under load (inventory_buckets' fillfactor)."""
    ev = await new_event(db, capacity=6400, buckets=64)
    pages = await db.fetchval("SELECT count(DISTINCT (ctid::text::point)[0]) FROM inventory_buckets "
                              "WHERE event_id = $1", ev)
    assert pages >= 4
    # and each page keeps room for its rows' next versions: updates stay on the page (HOT)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE inventory_buckets SET held = held + 1 WHERE event_id = $1", ev)
        hot = await conn.fetchval("SELECT n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                  "WHERE relname = 'inventory_buckets'")
    assert hot == 64


async def test_create_ticketed_event_refuses_bad_arguments(db: asyncpg.Pool) -> None:
    fn = "SELECT create_ticketed_event(gen_random_uuid(), 'show', $1, 2500, $2, $3)"
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval(fn, 10, "eur", 0)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval(fn, 10, "EUR", 1)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval(fn, -1, "eur", 1)
    assert await db.fetchval("SELECT count(*) FROM ticketed_events") == 0
    assert await db.fetchval("SELECT count(*) FROM inventory_buckets") == 0


# --- hold_tickets -----------------------------------------------------------------------------

async def test_hold_takes_one_bucket_and_announces_the_hold(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=8, buckets=4)
    r = await hold(db, ev, 2, ttl=900, client="c1", customer_ref="ref-1", key="k1")
    assert (r["event_id"], r["client_id"], r["customer_ref"], r["idempotency_key"]) == (
        ev, "c1", "ref-1", "k1")
    assert (r["status"], r["quantity"], r["amount"], r["currency"]) == ("active", 2, 5000, "eur")
    assert timedelta(seconds=899) < r["expires_at"] - r["created_at"] < timedelta(seconds=901)
    [(bucket, quantity)] = await allocations(db, r["id"])
    assert quantity == 2
    assert [held for _, held, _ in await buckets(db, ev)] == [2 if b == bucket else 0
                                                               for b in range(4)]
    [(subject, payload)] = await outbox(db)
    assert subject == HELD
    assert (payload["reservation_id"], payload["event_id"], payload["quantity"]) == (
        str(r["id"]), str(ev), 2)
    assert ts(payload["expires_at"]) == r["expires_at"]
    assert ts(payload["occurred_at"]) == r["created_at"]


async def test_hold_skips_buckets_other_transactions_hold(db: asyncpg.Pool) -> None:
    """Pass 1, the fast probe: a bucket locked by another transaction is passed over, not
    waited for."""
    ev = await new_event(db, capacity=8, buckets=4)
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 AND bucket <> 2 "
                            "FOR UPDATE", ev)
        async with db.acquire() as conn:
            await no_wait(conn)
            r = await hold(conn, ev, 2)
    assert await allocations(db, r["id"]) == [(2, 2)]


async def test_hold_wraps_round_past_the_locked_buckets_after_its_start(db: asyncpg.Pool) -> None:
    """Pass 1 is one statement of two scans: from its random start upwards, then from bucket 0.
    With the upper buckets locked by another transaction, every hold, whatever its start, takes
    a lower bucket without waiting (a start in the locked range must wrap round: in 24 holds the
    chance that none starts there is 2**-24)."""
    ev = await new_event(db, capacity=400, buckets=4)
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 AND bucket >= 2 "
                            "FOR UPDATE", ev)
        async with db.acquire() as conn:
            for _ in range(24):
                async with conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '2s'")
                    r = await hold(conn, ev, 1)
                [(bucket, quantity)] = await allocations(db, r["id"])
                assert bucket in (0, 1) and quantity == 1
    assert sum(held for _, held, _ in await buckets(db, ev)) == 24
    assert len(await outbox(db)) == 24


async def test_hold_waits_for_a_locked_bucket_when_no_other_has_enough(db: asyncpg.Pool) -> None:
    """Pass 2: every bucket with enough is locked, so the hold waits in bucket order; the bucket
    it waited for was drained meanwhile, so it is re-checked and the next one taken."""
    ev = await new_event(db, capacity=4, buckets=2)
    async with db.acquire() as other:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 FOR UPDATE", ev)
        task = asyncio.create_task(hold(db, ev, 2))
        await waiting_for_lock(db)
        assert not task.done()
        await other.execute("UPDATE inventory_buckets SET held = 2 WHERE event_id = $1 "
                            "AND bucket = 0", ev)
        await tx.commit()
        r = await asyncio.wait_for(task, 5)
    assert await allocations(db, r["id"]) == [(1, 2)]
    assert await buckets(db, ev) == [(2, 2, 0), (2, 2, 0)]


async def test_hold_gathers_across_buckets_when_no_single_one_has_enough(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=6, buckets=3)
    r = await hold(db, ev, 5)
    assert await allocations(db, r["id"]) == [(0, 2), (1, 2), (2, 1)]
    assert await buckets(db, ev) == [(2, 2, 0), (2, 2, 0), (2, 1, 0)]
    assert [s for s, _ in await outbox(db)] == [HELD]


async def test_hold_expires_overdue_holds_of_its_event_before_saying_sold_out(
        db: asyncpg.Pool) -> None:
    ev, elsewhere = await new_event(db, capacity=4), await new_event(db, capacity=2)
    overdue = (await hold(db, ev, 2, ttl=0))["id"]
    overdue_elsewhere = (await hold(db, elsewhere, 1, ttl=0))["id"]
    # while free tickets suffice, an overdue hold is left to the reaper
    first = (await hold(db, ev, 2))["id"]
    assert await status(db, overdue) == "active"
    # now only the overdue hold's tickets are left: it is expired, and they are taken
    second = (await hold(db, ev, 2))["id"]
    assert await status(db, overdue) == "expired"
    assert await status(db, overdue_elsewhere) == "active"  # only the hold's own event
    assert (await status(db, first), await status(db, second)) == ("active", "active")
    assert await inventory(db, ev) == (4, 0)
    assert await inventory(db, elsewhere) == (1, 0)
    expired = await outbox(db, "reservations.events.expired")
    assert [p["reservation_id"] for _, p in expired] == [str(overdue)]


async def test_hold_sold_out_raises_bx409_and_writes_nothing(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=3, buckets=2)
    sold = (await hold(db, ev, 1))["id"]
    assert await db.fetchval("SELECT complete_reservation($1, $2)", sold, pi()) == "completed"
    await hold(db, ev, 1)
    before = await db.fetchval("SELECT count(*) FROM outbox")
    assert await sqlstate_of(hold(db, ev, 2)) == "BX409"  # 1 held + 1 sold of 3
    assert await db.fetchval("SELECT count(*) FROM reservations") == 2
    assert await db.fetchval("SELECT count(*) FROM outbox") == before
    assert await inventory(db, ev) == (1, 1)


async def test_hold_of_an_unknown_event_raises_bx404(db: asyncpg.Pool) -> None:
    assert await sqlstate_of(hold(db, uuid.uuid4(), 1)) == "BX404"
    assert await sqlstate_of(hold(db, uuid.uuid4(), 0)) == "BX404"  # the event is checked first
    assert await db.fetchval("SELECT count(*) FROM reservations") == 0


async def test_hold_refuses_a_quantity_below_one(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    for quantity in (0, -1, None):
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await db.fetchrow("SELECT * FROM hold_tickets($1, $2, 'client', 900)", ev, quantity)
    assert await db.fetchval("SELECT count(*) FROM reservations") == 0
    assert await inventory(db, ev) == (0, 0)


# --- hold_probe -------------------------------------------------------------------------------

async def test_hold_probe_takes_the_first_bucket_with_enough_from_its_start(
        db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=8, buckets=4)
    await db.execute("UPDATE inventory_buckets SET held = 2 WHERE event_id = $1 AND bucket = 1",
                     ev)
    probe = "SELECT hold_probe($1, $2, $3)"
    assert await db.fetchval(probe, ev, 2, 0) == 0
    assert await db.fetchval(probe, ev, 2, 1) == 2  # bucket 1 is full
    assert await db.fetchval(probe, ev, 2, 3) == 3
    assert await db.fetchval(probe, ev, 3, 0) is None  # no bucket has 3
    await db.execute("UPDATE inventory_buckets SET held = 1 WHERE event_id = $1 AND bucket = 3",
                     ev)
    assert await db.fetchval(probe, ev, 2, 3) == 0  # wraps round to the start
    assert await db.fetchval(probe, ev, 1, 3) == 3
    assert await db.fetchval(probe, uuid.uuid4(), 1, 0) is None


async def test_hold_probe_skips_locked_buckets_and_locks_its_own(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=8, buckets=4)
    probe = "SELECT hold_probe($1, $2, $3)"
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 "
                            "AND bucket IN (0, 2) FOR UPDATE", ev)
        async with db.acquire() as conn:
            await no_wait(conn)
            assert await conn.fetchval(probe, ev, 1, 0) == 1
            assert await conn.fetchval(probe, ev, 1, 2) == 3
            await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 "
                                "FOR UPDATE", ev)
            assert await conn.fetchval(probe, ev, 1, 0) is None  # all locked: no wait
    async with db.acquire() as conn, conn.transaction():
        got = await conn.fetchval(probe, ev, 1, 0)
        async with db.acquire() as other:
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 "
                                    "AND bucket = $2 FOR UPDATE NOWAIT", ev, got)


# --- hold_tickets_batch -----------------------------------------------------------------------

Item = tuple[int, str, str | None, str | None, str | None]  # quantity, client, ref, key, fp


async def batch(db: asyncpg.Pool | asyncpg.Connection, ev: uuid.UUID, items: list[Item],
                ttl: int = 900) -> list[asyncpg.Record]:
    cols = list(zip(*items)) if items else [(), (), (), (), ()]
    return await db.fetch("SELECT * FROM hold_tickets_batch($1, $2, $3, $4, $5, $6, $7) "
                          "ORDER BY idx", ev, ttl, *(list(c) for c in cols))


async def test_batch_holds_each_item_on_the_fast_path(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=10, buckets=2)
    rows = await batch(db, ev, [(2, "a", None, None, None), (3, "b", "ref", "k1", "fp1")])
    assert [(r["idx"], r["outcome"], r["amount"], r["currency"]) for r in rows] == [
        (0, "held", 5000, "eur"), (1, "held", 7500, "eur")]
    for r in rows:
        assert timedelta(seconds=899) < r["expires_at"] - r["created_at"] < timedelta(seconds=901)
        assert r["response_body"] is None
    got = {r["id"]: tuple(r) for r in await db.fetch(
        "SELECT id, client_id, quantity, customer_ref, idempotency_key, request_fingerprint, "
        "status FROM reservations")}
    assert got == {rows[0]["id"]: (rows[0]["id"], "a", 2, None, None, None, "active"),
                   rows[1]["id"]: (rows[1]["id"], "b", 3, "ref", "k1", "fp1", "active")}
    assert await inventory(db, ev) == (5, 0)
    assert [p["reservation_id"] for _, p in await outbox(db, HELD)] == [str(rows[0]["id"]),
                                                                         str(rows[1]["id"])]


async def test_batch_retries_an_item_no_unlocked_bucket_can_serve(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=4, buckets=2)
    rows = await batch(db, ev, [(3, "a", None, None, None), (2, "b", None, None, None)])
    assert [r["outcome"] for r in rows] == ["retry", "held"]  # 3 needs two buckets: slow path
    assert (rows[0]["id"], rows[0]["amount"], rows[0]["expires_at"]) == (None, None, None)
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert await inventory(db, ev) == (2, 0)
    # a bucket another transaction holds is not waited for either
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM inventory_buckets WHERE event_id = $1 FOR UPDATE", ev)
        async with db.acquire() as conn:
            await no_wait(conn)
            rows = await batch(conn, ev, [(1, "c", None, None, None)])
    assert [r["outcome"] for r in rows] == ["retry"]
    assert await inventory(db, ev) == (2, 0)


async def test_batch_serves_items_from_one_bucket_while_it_has_enough(db: asyncpg.Pool) -> None:
    """Items share the bucket they were served from, counted with one UPDATE per bucket; an
    item the bucket cannot serve moves on to another, and the last tickets are never
    overtaken: each bucket ends at most full, and every hold is allocated where it was counted."""
    ev = await new_event(db, capacity=10, buckets=2)  # 5 and 5
    async with db.acquire() as conn, conn.transaction():
        rows = await batch(conn, ev, [(2, f"c{i}", None, None, None) for i in range(6)])
        updates = await conn.fetchval("SELECT n_tup_upd FROM pg_stat_xact_user_tables "
                                      "WHERE relname = 'inventory_buckets'")
    assert [r["outcome"] for r in rows] == ["held"] * 4 + ["retry"] * 2
    assert updates == 2  # one per bucket, not one per hold
    got = await db.fetch("SELECT b.bucket, b.capacity, b.held, (SELECT coalesce(sum(a.quantity), 0) "
                         "FROM reservation_allocations a WHERE a.event_id = b.event_id "
                         "AND a.bucket = b.bucket) AS allocated FROM inventory_buckets b "
                         "WHERE b.event_id = $1 ORDER BY b.bucket", ev)
    assert [(r["capacity"], r["held"], r["allocated"]) for r in got] == [(5, 4, 4), (5, 4, 4)]
    # the last ticket of each bucket: two one-ticket items, one from each bucket
    rows = await batch(db, ev, [(1, "d", None, None, None), (1, "e", None, None, None),
                                (1, "f", None, None, None)])
    assert [r["outcome"] for r in rows] == ["held", "held", "retry"]
    assert await inventory(db, ev) == (10, 0)


async def test_batch_for_an_unknown_event_retries_every_item(db: asyncpg.Pool) -> None:
    rows = await batch(db, uuid.uuid4(), [(1, "a", None, None, None),
                                          (2, "b", None, "k", "fp"), (3, "c", None, None, None)])
    assert [(r["idx"], r["outcome"], r["id"]) for r in rows] == [
        (0, "retry", None), (1, "retry", None), (2, "retry", None)]
    assert await batch(db, uuid.uuid4(), []) == []
    assert await batch(db, await new_event(db), []) == []
    assert await db.fetchval("SELECT count(*) FROM reservations") == 0


async def test_batch_key_in_use_by_another_transaction(db: asyncpg.Pool) -> None:
    ev = await new_event(db, buckets=2)  # the first batch locks one bucket, the other is free
    async with db.acquire() as first, first.transaction():
        assert [r["outcome"] for r in await batch(first, ev, [(1, "c", None, "k", "fp")])] == [
            "held"]
        rows = await batch(db, ev, [(1, "c", None, "k", "fp"), (1, "d", None, "k", "fp")])
        assert [r["outcome"] for r in rows] == ["in_use", "held"]  # a key is per client
    assert await inventory(db, ev) == (2, 0)


async def test_batch_key_in_use_by_the_full_hold_path(db: asyncpg.Pool) -> None:
    """The full path (the payment service's keyed hold) and the batch lock one key alike, so a
    keyed hold on one path excludes the same key on the other."""
    ev = await new_event(db)
    req = HoldRequest(client_id="c", event_id=str(ev), quantity=1, idempotency_key="k",
                      fingerprint="fp")
    async with db.acquire() as conn, conn.transaction():
        await reservations._hold_keyed(conn, req, 900)
        rows = await batch(db, ev, [(1, "c", None, "k", "fp")])
        assert [r["outcome"] for r in rows] == ["in_use"]


async def test_batch_replay_and_mismatch_of_a_used_key(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    [made] = await batch(db, ev, [(1, "c", None, "k", "fp")])
    await db.execute("UPDATE reservations SET response_body = '{\"stored\": 1}' WHERE id = $1",
                     made["id"])
    rows = await batch(db, ev, [(1, "c", None, "k", "fp"), (1, "c", None, "k", "other")])
    assert [(r["outcome"], r["response_body"], r["id"]) for r in rows] == [
        ("replay", '{"stored": 1}', None), ("mismatch", '{"stored": 1}', None)]
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert await inventory(db, ev) == (1, 0)


async def test_batch_with_one_key_twice_holds_once(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    rows = await batch(db, ev, [(1, "c", None, "k", "fp"), (1, "c", None, "k", "fp"),
                                (1, "c", None, "k", "fp2")])
    # the later items find the hold the first made: no body stored yet
    assert [(r["outcome"], r["response_body"]) for r in rows] == [
        ("held", None), ("replay", None), ("mismatch", None)]
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert await inventory(db, ev) == (1, 0)


async def test_batch_writes_its_holds_in_one_statement_quietly(db: asyncpg.Pool) -> None:
    """The batch's holds are inserted together at its end: the reaper's due NOTIFY (a statement
    trigger) fires once for the batch, with the soonest expiry; the 'held' rows notify no relay,
    and the caller's quiet setting is put back. The outcomes come in idx order unasked."""
    ev = await new_event(db, capacity=10, buckets=2)
    async with listening(db, "boxoffice_outbox") as relay, \
            listening(db, "boxoffice_reservations_due") as due, db.acquire() as conn:
        await conn.execute("SET track_functions = 'pl'")
        async with conn.transaction():
            await conn.execute("SELECT set_config('boxoffice.outbox_quiet', 'off', true)")
            items: list[Item] = [(1, "a", None, None, None), (0, "z", None, None, None),
                                 (2, "b", None, "k", "fp"), (1, "b", None, "k", "fp"),
                                 (1, "c", None, None, None)]
            cols = list(zip(*items))
            rows = await conn.fetch("SELECT * FROM hold_tickets_batch($1, 1, $2, $3, $4, $5, $6)",
                                    ev, *(list(c) for c in cols))
            assert await conn.fetchval(
                "SELECT current_setting('boxoffice.outbox_quiet')") == "off"
            assert await trigger_calls(conn) == {"outbox_notify": 1, "reservations_due_notify": 1}
        assert [(r["idx"], r["outcome"]) for r in rows] == [
            (0, "held"), (1, "retry"), (2, "held"), (3, "replay"), (4, "held")]
        soonest = min(r["expires_at"] for r in rows if r["outcome"] == "held")
        assert float(await due.next()) == pytest.approx(soonest.timestamp(), abs=1e-6)
        await due.nothing_more()  # one NOTIFY for three holds
        await relay.nothing_more()
        await conn.execute(INSERT_OUTBOX)  # the caller's own setting notifies again
        assert await relay.next() == ""
    assert len(await outbox(db, HELD)) == 3
    assert await inventory(db, ev) == (4, 0)


async def trigger_calls(conn: asyncpg.Connection) -> dict[str, int]:
    """The calls of the outbox's and the reaper's statement trigger functions in this
    transaction (with track_functions = 'pl')."""
    return {r["funcname"]: r["calls"] for r in await conn.fetch(
        "SELECT funcname, calls FROM pg_stat_xact_user_functions "
        "WHERE funcname IN ('outbox_notify', 'reservations_due_notify')")}


@pytest.mark.parametrize("setting", [None, "off", "on"])
async def test_batch_that_holds_nothing_writes_nothing(db: asyncpg.Pool, setting: str | None
                                                       ) -> None:
    """Items all answered without a hold (no bucket has enough, a key replayed, in use or
    mismatched): no insert runs, so no trigger and no NOTIFY, and the caller's setting stays."""
    ev = await new_event(db, capacity=4, buckets=2)
    [made] = await batch(db, ev, [(1, "c", None, "k", "fp")])
    async with db.acquire() as other, other.transaction():
        assert await other.fetchval("SELECT try_lock_hold_key('d', 'busy')")
        async with listening(db, "boxoffice_outbox") as relay, \
                listening(db, "boxoffice_reservations_due") as due, db.acquire() as conn:
            await conn.execute("SET track_functions = 'pl'")
            async with conn.transaction():
                if setting is not None:
                    await conn.execute("SELECT set_config('boxoffice.outbox_quiet', $1, true)",
                                       setting)
                before = await conn.fetchval(
                    "SELECT current_setting('boxoffice.outbox_quiet', true)")
                items: list[Item] = [(3, "a", None, None, None), (1, "c", None, "k", "fp"),
                                     (1, "d", None, "busy", "fp"), (1, "c", None, "k", "other"),
                                     (None, "e", None, None, None)]  # type: ignore[list-item]
                cols = list(zip(*items))
                rows = await conn.fetch(
                    "SELECT * FROM hold_tickets_batch($1, 1, $2, $3, $4, $5, $6)", ev,
                    *(list(c) for c in cols))
                assert await conn.fetchval(
                    "SELECT current_setting('boxoffice.outbox_quiet', true)") == before
                assert await trigger_calls(conn) == {}
            await relay.nothing_more()
            await due.nothing_more()
    assert [(r["idx"], r["outcome"], r["id"]) for r in rows] == [
        (0, "retry", None), (1, "replay", None), (2, "in_use", None), (3, "mismatch", None),
        (4, "retry", None)]
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert len(await outbox(db, HELD)) == 1
    assert made["outcome"] == "held" and await inventory(db, ev) == (1, 0)


async def test_batch_keys_are_per_client_within_a_batch(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    rows = await batch(db, ev, [(1, "c", None, "k", "fp"), (1, "d", None, "k", "fp"),
                                (1, "d", None, "k", "fp2"), (1, "c", None, "k", "fp")])
    assert [r["outcome"] for r in rows] == ["held", "held", "mismatch", "replay"]
    assert await db.fetchval("SELECT count(*) FROM reservations") == 2


async def test_random_batches_add_up(db: asyncpg.Pool) -> None:
    """Random batches (quantities that fit and do not, keys repeated within and across batches,
    two clients, changed requests) on an event with few tickets: every item is answered once,
    in idx order; each hold has its allocation, its 'held' row (in idx order) and its tickets
    counted in its bucket; a key makes at most one hold and later uses of it replay or mismatch
    by fingerprint."""
    seed = int(os.environ.get("BOXOFFICE_TEST_SEED") or random.randrange(1 << 30))
    print(f"random batches: seed={seed} (replay with BOXOFFICE_TEST_SEED={seed})")
    rng = random.Random(seed)
    ev = await new_event(db, capacity=60, buckets=rng.choice((1, 3, 8)))
    by_key: dict[tuple[str, str], str] = {}  # the fingerprint each key was first held with
    for _ in range(25):
        items: list[Item] = []
        for _ in range(rng.randrange(1, 12)):
            client = rng.choice(("a", "b"))
            key = rng.choice((None, None, "k1", "k2", "k3", f"u{rng.random()}"))
            items.append((rng.choice((1, 1, 2, 3, 7, 0)), client, None, key,
                          rng.choice(("fp1", "fp2")) if key else None))
        async with db.acquire() as conn:
            before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
            rows = await conn.fetch("SELECT * FROM hold_tickets_batch($1, 900, $2, $3, $4, $5, $6)",
                                    ev, *(list(c) for c in zip(*items)))
            held_rows = await conn.fetch("SELECT (o.payload->>'reservation_id')::uuid AS rid "
                                         "FROM outbox o WHERE o.id > $1 ORDER BY o.id", before)
        assert [r["idx"] for r in rows] == list(range(len(items))), seed
        assert [r["rid"] for r in held_rows] == [r["id"] for r in rows if r["outcome"] == "held"], seed
        for r, (q, client, _, key, fp) in zip(rows, items):
            if r["outcome"] == "held":
                assert q >= 1 and r["amount"] == 2500 * q, seed
                if key is not None:
                    assert (client, key) not in by_key, seed
                    by_key[(client, key)] = fp or ""
            elif r["outcome"] in ("replay", "mismatch"):
                assert key is not None, seed
                assert r["outcome"] == ("replay" if by_key[(client, key)] == fp else "mismatch"), seed
            else:
                assert r["outcome"] == "retry" and (key is None or (client, key) not in by_key), seed
    bad = await db.fetch(
        "SELECT b.bucket FROM inventory_buckets b LEFT JOIN (SELECT a.bucket, sum(a.quantity) AS q "
        "FROM reservation_allocations a WHERE a.event_id = $1 GROUP BY a.bucket) s USING (bucket) "
        "WHERE b.event_id = $1 AND b.held <> coalesce(s.q, 0)", ev)
    assert bad == [], seed
    assert await db.fetchval(
        "SELECT count(*) FROM reservations r WHERE r.event_id = $1 AND r.quantity <> "
        "(SELECT sum(a.quantity) FROM reservation_allocations a WHERE a.reservation_id = r.id)",
        ev) == 0, seed
    keyed = await db.fetch("SELECT client_id, idempotency_key, request_fingerprint FROM reservations "
                           "WHERE idempotency_key IS NOT NULL")
    assert {(r["client_id"], r["idempotency_key"]): r["request_fingerprint"] for r in keyed} == \
        by_key, seed


# --- release_reservation ----------------------------------------------------------------------

async def test_release_returns_the_tickets_once(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=6, buckets=3)
    r = await hold(db, ev, 5)  # gathered over three buckets
    assert await db.fetchval("SELECT release_reservation($1)", r["id"]) is True
    row = await db.fetchrow("SELECT status, released_at FROM reservations WHERE id = $1", r["id"])
    assert row["status"] == "cancelled" and row["released_at"] is not None
    assert await buckets(db, ev) == [(2, 0, 0), (2, 0, 0), (2, 0, 0)]
    [(subject, payload)] = await outbox(db, "reservations.events.cancelled")
    assert subject == "reservations.events.cancelled"
    assert (payload["reservation_id"], payload["event_id"], payload["quantity"]) == (
        str(r["id"]), str(ev), 5)
    assert ts(payload["expires_at"]) == r["expires_at"]
    assert ts(payload["occurred_at"]) >= row["released_at"]
    # once: a second call, and an unknown hold, change nothing
    assert await db.fetchval("SELECT release_reservation($1)", r["id"]) is False
    assert await db.fetchval("SELECT release_reservation($1)", uuid.uuid4()) is False
    assert len(await outbox(db)) == 2
    assert await buckets(db, ev) == [(2, 0, 0), (2, 0, 0), (2, 0, 0)]


async def test_release_of_a_sold_hold_is_refused(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev))["id"]
    assert await db.fetchval("SELECT complete_reservation($1, $2)", r, pi()) == "completed"
    assert await db.fetchval("SELECT release_reservation($1)", r) is False
    assert await status(db, r) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert await outbox(db, "reservations.events.cancelled") == []


async def test_release_as_expired_announces_an_expiry(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev))["id"]
    assert await db.fetchval("SELECT release_reservation($1, 'expired')", r) is True
    assert await status(db, r) == "expired"
    assert [s for s, _ in await outbox(db)] == [HELD, "reservations.events.expired"]
    assert await inventory(db, ev) == (0, 0)


async def test_release_with_a_status_that_is_no_end_writes_nothing(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev))["id"]
    for bad in ("bogus", "completed"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.fetchval("SELECT release_reservation($1, $2)", r, bad)
    assert await status(db, r) == "active"
    assert await inventory(db, ev) == (2, 0)
    assert [s for s, _ in await outbox(db)] == [HELD]


# --- complete_reservation ---------------------------------------------------------------------

COMPLETE = "SELECT complete_reservation($1, $2)"


async def test_complete_sells_an_active_hold(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=6, buckets=3)
    r = (await hold(db, ev, 5))["id"]
    p = pi()
    assert await db.fetchval(COMPLETE, r, p) == "completed"
    row = await db.fetchrow("SELECT status, completed_at, released_at, payment_intent_id "
                            "FROM reservations WHERE id = $1", r)
    assert (row["status"], row["released_at"], row["payment_intent_id"]) == ("completed", None, p)
    assert row["completed_at"] is not None
    assert await buckets(db, ev) == [(2, 0, 2), (2, 0, 2), (2, 0, 1)]
    [(_, payload)] = await outbox(db, "reservations.events.completed")
    assert (payload["reservation_id"], payload["event_id"], payload["quantity"],
            payload["payment_intent_id"]) == (str(r), str(ev), 5, p)
    assert ts(payload["occurred_at"]) >= row["completed_at"]


async def test_complete_sells_an_overdue_hold_the_reaper_has_not_taken(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev, ttl=0))["id"]
    assert await db.fetchval(COMPLETE, r, pi()) == "completed"
    assert await inventory(db, ev) == (0, 2)
    assert await db.fetchval("SELECT expire_due_reservations()") == 0


async def test_complete_twice_is_already_completed(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev))["id"]
    first, second = pi(), pi()
    assert await db.fetchval(COMPLETE, r, first) == "completed"
    assert await db.fetchval(COMPLETE, r, second) == "already_completed"
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1",
                             r) == first
    assert len(await outbox(db, "reservations.events.completed")) == 1
    assert await inventory(db, ev) == (0, 2)


async def test_complete_keeps_the_holds_payment_intent_when_given_none(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev))["id"]
    p = pi()
    await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2", p, r)
    assert await db.fetchval(COMPLETE, r, None) == "completed"
    assert await db.fetchval("SELECT payment_intent_id FROM reservations WHERE id = $1", r) == p


async def test_complete_of_an_unknown_hold(db: asyncpg.Pool) -> None:
    assert await db.fetchval(COMPLETE, uuid.uuid4(), pi()) == "unknown"
    assert await outbox(db) == []


@pytest.mark.parametrize("ending", ["expire", "cancel"])
async def test_complete_takes_the_tickets_of_an_ended_hold_again(db: asyncpg.Pool,
                                                                 ending: str) -> None:
    ev = await new_event(db, capacity=4, buckets=2)
    r = (await hold(db, ev, 2, ttl=0 if ending == "expire" else 900))["id"]
    if ending == "expire":
        assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    else:
        assert await db.fetchval("SELECT release_reservation($1)", r) is True
    assert await inventory(db, ev) == (0, 0)
    p = pi()
    assert await db.fetchval(COMPLETE, r, p) == "completed"
    row = await db.fetchrow("SELECT status, completed_at, released_at, payment_intent_id "
                            "FROM reservations WHERE id = $1", r)
    assert (row["status"], row["released_at"], row["payment_intent_id"]) == ("completed", None, p)
    assert await inventory(db, ev) == (0, 2)
    [(bucket, quantity)] = await allocations(db, r)
    assert quantity == 2 and [s for _, _, s in await buckets(db, ev)][bucket] == 2
    # the hold it took the tickets through is gone, and so is its announcement
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert await db.fetchval("SELECT count(*) FROM reservation_allocations") == 1
    ended = "reservations.events.expired" if ending == "expire" else \
        "reservations.events.cancelled"
    assert [(s, body["reservation_id"]) for s, body in await outbox(db)] == [
        (HELD, str(r)), (ended, str(r)), ("reservations.events.completed", str(r))]


async def test_complete_gathers_the_tickets_of_an_ended_hold_across_buckets(
        db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=6, buckets=3)
    r = (await hold(db, ev, 3, ttl=0))["id"]
    assert await allocations(db, r) == [(0, 2), (1, 1)]
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    await db.execute("UPDATE inventory_buckets SET sold = 1 WHERE event_id = $1", ev)
    assert await db.fetchval(COMPLETE, r, pi()) == "completed"  # 1 free in each bucket
    assert await allocations(db, r) == [(0, 1), (1, 1), (2, 1)]
    assert await buckets(db, ev) == [(2, 0, 2), (2, 0, 2), (2, 0, 2)]
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1


async def test_complete_of_an_ended_hold_whose_tickets_are_gone(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=2)
    r = (await hold(db, ev, 2, ttl=0))["id"]
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    taker = (await hold(db, ev, 1))["id"]
    assert await db.fetchval(COMPLETE, r, pi()) == "unavailable"
    row = await db.fetchrow("SELECT status, payment_intent_id, completed_at FROM reservations "
                            "WHERE id = $1", r)
    assert tuple(row) == ("expired", None, None)
    assert await status(db, taker) == "active"
    assert await inventory(db, ev) == (1, 0)
    assert await db.fetchval("SELECT count(*) FROM reservations") == 2
    assert await outbox(db, "reservations.events.completed") == []


# --- never_oversold ---------------------------------------------------------------------------

async def test_never_oversold_refuses_more_than_a_buckets_capacity(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=2)
    await hold(db, ev, 2)
    for change in ("sold = sold + 1", "held = held + 1"):
        with pytest.raises(asyncpg.CheckViolationError) as exc:
            await db.execute(f"UPDATE inventory_buckets SET {change} WHERE event_id = $1", ev)
        assert exc.value.constraint_name == "never_oversold"
    assert await inventory(db, ev) == (2, 0)
    # exactly full is allowed
    await db.execute("UPDATE inventory_buckets SET held = 0, sold = 2 WHERE event_id = $1", ev)
    assert await inventory(db, ev) == (0, 2)


async def test_a_hold_leaves_no_multixact_on_its_bucket(db: asyncpg.Pool) -> None:
    """The probe locks a bucket in a subtransaction; the bucket's UPDATE runs in that same
    subtransaction. Updated by the parent instead, the row would carry two of our transaction
    ids and PostgreSQL would write a MultiXact for its xmax: one for every hold, each with its
    members and WAL, and in time the anti-wraparound vacuums they force. Holds one after
    another on one connection (no concurrent lockers), so no MultiXact may appear at all."""
    ev = await new_event(db, capacity=100, buckets=4)
    async with db.acquire() as conn:
        async def next_multixact() -> int:
            await conn.execute("CHECKPOINT")  # next_multixact_id is read from the checkpoint
            return int(await conn.fetchval(
                "SELECT next_multixact_id FROM pg_control_checkpoint()"))

        before = await next_multixact()
        for _ in range(20):
            await conn.fetchrow("SELECT id FROM hold_tickets($1, 1, 'mx', 900)", ev)
        assert await next_multixact() == before
        assert await conn.fetchval("SELECT sum(held) FROM inventory_buckets "
                                   "WHERE event_id = $1", ev) == 20
