"""The SQL functions of expiry, called directly, outcome by outcome: seed the rows, call the
function, check the rows (reap_due_reservations, expire_due_reservations,
cleanup_expired_reservations, get_reservation_stats, and the reservations_due NOTIFY triggers)."""

from __future__ import annotations

import uuid

import asyncpg

from tests.sql_support import (
    buckets,
    hold,
    inventory,
    listening,
    new_event,
    no_wait,
    outbox,
    pi,
    rows_read,
    status,
    ts,
)

EXPIRED = "reservations.events.expired"
REAP = "SELECT * FROM reap_due_reservations($1, $2)"


async def overdue_by(db: asyncpg.Pool, res: uuid.UUID, seconds: float) -> None:
    await db.execute("UPDATE reservations SET expires_at = clock_timestamp() - make_interval("
                     "secs => $2) WHERE id = $1", res, seconds)


async def reap(db: asyncpg.Pool | asyncpg.Connection, limit: int = 1000,
               ev: uuid.UUID | None = None) -> dict[uuid.UUID, float]:
    """reap_due_reservations: {reservation: lag in seconds}."""
    return {r["reservation_id"]: r["lag_seconds"] for r in await db.fetch(REAP, limit, ev)}


# --- reap_due_reservations --------------------------------------------------------------------

async def test_reap_expires_due_holds_and_reports_their_lag(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=10, buckets=2)
    late = (await hold(db, ev, 1))["id"]
    await overdue_by(db, late, 10)
    due = (await hold(db, ev, 2, ttl=0))["id"]
    future = (await hold(db, ev, 3))["id"]
    sold = (await hold(db, ev, 1, ttl=0))["id"]
    assert await db.fetchval("SELECT complete_reservation($1, $2)", sold, pi()) == "completed"
    cancelled = (await hold(db, ev, 1))["id"]
    await overdue_by(db, cancelled, 5)
    assert await db.fetchval("SELECT release_reservation($1)", cancelled) is True

    got = await reap(db)
    assert set(got) == {late, due}
    assert 10 <= got[late] < 15
    assert 0 <= got[due] < 5
    assert [await status(db, r) for r in (late, due, future, sold, cancelled)] == [
        "expired", "expired", "active", "completed", "cancelled"]
    assert await inventory(db, ev) == (3, 1)
    rows = {r["id"]: r for r in await db.fetch("SELECT id, expires_at, released_at "
                                                "FROM reservations WHERE status = 'expired'")}
    announced = await outbox(db, EXPIRED)
    # one per hold, earliest expiry first, each with the hold's own release time
    assert [p["reservation_id"] for _, p in announced] == [str(late), str(due)]
    for _, p in announced:
        row = rows[uuid.UUID(p["reservation_id"])]
        assert (p["event_id"], ts(p["expires_at"]), ts(p["occurred_at"])) == (
            str(ev), row["expires_at"], row["released_at"])
    assert [p["quantity"] for _, p in announced] == [1, 2]
    assert await reap(db) == {}  # nothing left due
    assert len(await outbox(db, EXPIRED)) == 2


async def test_reap_takes_at_most_its_limit_earliest_first(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    a, b, c = [(await hold(db, ev, 1))["id"] for _ in range(3)]
    for res, seconds in ((a, 30), (b, 20), (c, 10)):
        await overdue_by(db, res, seconds)
    assert set(await reap(db, 2)) == {a, b}
    assert await status(db, c) == "active"
    assert await inventory(db, ev) == (1, 0)
    assert set(await reap(db, 2)) == {c}
    assert await inventory(db, ev) == (0, 0)


async def test_reap_of_one_event_leaves_the_others(db: asyncpg.Pool) -> None:
    ev, other = await new_event(db), await new_event(db)
    mine = (await hold(db, ev, 2, ttl=0))["id"]
    theirs = (await hold(db, other, 2, ttl=0))["id"]
    assert set(await reap(db, 1000, ev)) == {mine}
    assert await status(db, theirs) == "active"
    assert await inventory(db, other) == (2, 0)
    assert [p["reservation_id"] for _, p in await outbox(db, EXPIRED)] == [str(mine)]


async def test_reap_skips_a_hold_another_transaction_has_locked(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    locked = (await hold(db, ev, 1, ttl=0))["id"]
    free = (await hold(db, ev, 1, ttl=0))["id"]
    async with db.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM reservations WHERE id = $1 FOR UPDATE", locked)
        async with db.acquire() as conn:
            await no_wait(conn)
            assert set(await reap(conn)) == {free}  # without waiting for the locked one
        assert await status(db, locked) == "active"
        assert await inventory(db, ev) == (1, 0)
    assert set(await reap(db)) == {locked}
    assert await inventory(db, ev) == (0, 0)


async def test_reap_reads_the_holds_due_not_every_active_one(db: asyncpg.Pool) -> None:
    # the claim's bound on expires_at is a bound of its index scan: a sweep that finds one hold
    # due among 2,000 active ones fetches that one (with clock_timestamp() itself in the WHERE,
    # a volatile call, it was a filter, and every sweep fetched all 2,000)
    ev = await new_event(db, capacity=3000)
    await db.execute("SELECT hold_tickets($1, 1, 'client', 3600) FROM generate_series(1, 2000)", ev)
    due = (await hold(db, ev, 1, ttl=0))["id"]
    async with db.acquire() as conn, conn.transaction():
        before = await rows_read(conn, "reservations")
        assert set(await reap(conn)) == {due}
        assert await rows_read(conn, "reservations") - before <= 10
    assert await db.fetchval("SELECT count(*) FROM reservations WHERE event_id = $1 "
                             "AND status = 'active'", ev) == 2000


async def test_reap_returns_tickets_to_every_bucket(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=6, buckets=3)
    gathered = (await hold(db, ev, 5, ttl=0))["id"]  # buckets 0, 1 and 1 ticket of 2
    last = (await hold(db, ev, 1, ttl=0))["id"]  # the last ticket, of bucket 2 too
    assert await buckets(db, ev) == [(2, 2, 0), (2, 2, 0), (2, 2, 0)]
    assert set(await reap(db)) == {gathered, last}
    assert await buckets(db, ev) == [(2, 0, 0), (2, 0, 0), (2, 0, 0)]


# --- expire_due_reservations ------------------------------------------------------------------

async def test_expire_due_reservations_counts_what_it_expired(db: asyncpg.Pool) -> None:
    ev, other = await new_event(db), await new_event(db)
    for _ in range(3):
        await hold(db, ev, 1, ttl=0)
    await hold(db, other, 1, ttl=0)
    future = (await hold(db, ev, 1))["id"]
    fn = "SELECT expire_due_reservations($1, $2)"
    assert await db.fetchval(fn, 2, None) == 2
    assert await db.fetchval(fn, 1000, other) == 1
    assert await inventory(db, other) == (0, 0)
    assert await db.fetchval("SELECT expire_due_reservations()") == 1
    assert await db.fetchval("SELECT expire_due_reservations()") == 0
    assert await status(db, future) == "active"
    assert await inventory(db, ev) == (1, 0)
    assert len(await outbox(db, EXPIRED)) == 4


# --- cleanup_expired_reservations -------------------------------------------------------------

async def test_cleanup_expires_everything_overdue_and_records_a_manual_run(
        db: asyncpg.Pool) -> None:
    ev, other = await new_event(db), await new_event(db)
    due = [(await hold(db, e, 1, ttl=0))["id"] for e in (ev, ev, other)]
    future = (await hold(db, ev, 1))["id"]
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 3
    assert [await status(db, r) for r in due] == ["expired"] * 3
    assert await status(db, future) == "active"
    assert (await inventory(db, ev), await inventory(db, other)) == ((1, 0), (0, 0))
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 0
    runs = await db.fetch("SELECT kind, replica, expired, error, finished_at >= started_at AS ok "
                          "FROM reaper_runs ORDER BY id")
    user = await db.fetchval("SELECT current_user")
    assert [tuple(r) for r in runs] == [("manual", f"sql:{user}", 3, None, True),
                                        ("manual", f"sql:{user}", 0, None, True)]


# --- get_reservation_stats --------------------------------------------------------------------

STATS = "SELECT * FROM get_reservation_stats()"


async def test_stats_of_no_holds(db: asyncpg.Pool) -> None:
    assert tuple(await db.fetchrow(STATS)) == (0, 0, 0, 0, None, None)


async def test_stats_count_each_status_and_read_only_active_holds(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=100)
    # the oldest hold, and the soonest expiry, belong to holds that are no longer active
    expired = (await hold(db, ev, 1, ttl=0))["id"]
    assert await db.fetchval("SELECT cleanup_expired_reservations()") == 1
    oldest_active = await hold(db, ev, 1, ttl=900)
    soonest = await hold(db, ev, 1, ttl=300)
    sold = [(await hold(db, ev, 1, ttl=0))["id"] for _ in range(3)]
    for r in sold:
        assert await db.fetchval("SELECT complete_reservation($1, $2)", r, pi()) == "completed"
    for _ in range(4):
        assert await db.fetchval("SELECT release_reservation($1)",
                                 (await hold(db, ev, 1, ttl=10))["id"]) is True
    assert await status(db, expired) == "expired"
    row = await db.fetchrow(STATS)
    assert (row["active_count"], row["expired_count"], row["completed_count"],
            row["cancelled_count"]) == (2, 1, 3, 4)
    assert row["oldest_active_hold"] == oldest_active["created_at"]
    assert row["next_expiry"] == soonest["expires_at"]
    # an active hold past its expiry still counts (until the reaper takes it)
    await db.execute("UPDATE reservations SET expires_at = clock_timestamp() - interval '1 s' "
                     "WHERE id = $1", oldest_active["id"])
    row = await db.fetchrow(STATS)
    assert row["active_count"] == 2
    assert row["next_expiry"] < soonest["expires_at"]


# --- the reservations_due NOTIFY triggers -----------------------------------------------------

DUE = "boxoffice_reservations_due"


async def test_a_new_hold_due_soon_announces_its_expiry(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    async with listening(db, DUE) as heard:
        r = await hold(db, ev, 1, ttl=1)
        assert abs(float(await heard.next()) - r["expires_at"].timestamp()) < 1e-5
        await heard.nothing_more()


async def test_a_hold_due_later_than_the_reapers_rearm_period_is_silent(
        db: asyncpg.Pool) -> None:
    """Holds due more than 2 s ahead fire no NOTIFY (notifying transactions cannot group-commit):
    the reaper re-reads its next due time every second and arms itself for them; nor does a
    hold's 'held' outbox row notify (payment wakes its own relay)."""
    ev = await new_event(db)
    async with listening(db, DUE) as due, listening(db, "boxoffice_outbox") as relay:
        for ttl in (3, 60, 900):
            await hold(db, ev, 1, ttl=ttl)
        await db.fetch("SELECT * FROM hold_tickets_batch($1, 900, '{1,1}', '{a,b}', "
                       "'{NULL,NULL}', '{NULL,k}', '{NULL,f}')", ev)
        await due.nothing_more()
        await relay.nothing_more()
    assert await db.fetchval("SELECT count(*) FROM outbox "
                             "WHERE subject = 'reservations.events.held'") == 5


async def test_one_insert_of_many_holds_announces_the_soonest_active_once(
        db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    insert = ("INSERT INTO reservations (event_id, client_id, quantity, amount, currency, "
              "status, expires_at, released_at) SELECT $1, 'c', 1, 0, 'eur', s, "
              "clock_timestamp() + make_interval(secs => t), "
              "CASE WHEN s = 'active' THEN NULL ELSE clock_timestamp() END "
              "FROM unnest($2::text[], $3::int[]) AS u(s, t)")
    async with listening(db, DUE) as heard:
        await db.execute(insert, ev, ["active", "cancelled", "active", "active"], [300, 0, 1, 900])
        soonest = await db.fetchval("SELECT min(expires_at) FROM reservations "
                                    "WHERE status = 'active'")
        assert abs(float(await heard.next()) - soonest.timestamp()) < 1e-5
        await heard.nothing_more()
        # a statement that adds no active hold is silent, and so is one of holds due later
        await db.execute(insert, ev, ["cancelled", "expired"], [0, 0])
        await db.execute(insert, ev, ["active", "active"], [5, 60])
        await heard.nothing_more()


async def test_a_rolled_back_hold_announces_nothing(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    async with listening(db, DUE) as heard:
        async with db.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await hold(conn, ev, 1, ttl=60)
            await tx.rollback()
        await heard.nothing_more()


async def test_shortening_an_active_hold_announces_its_new_expiry(db: asyncpg.Pool) -> None:
    ev = await new_event(db)
    r = (await hold(db, ev, 1, ttl=900))["id"]
    ended = (await hold(db, ev, 1, ttl=900))["id"]
    assert await db.fetchval("SELECT release_reservation($1)", ended) is True
    change = ("UPDATE reservations SET expires_at = expires_at + make_interval(secs => $2) "
              "WHERE id = $1 RETURNING expires_at")
    async with listening(db, DUE) as heard:
        await db.fetchval(change, r, 60)  # lengthened: the reaper need not wake
        await heard.nothing_more()
        await db.fetchval(change, ended, -600)  # shortened, but not active
        await heard.nothing_more()
        shortened = await db.fetchval(change, r, -600)
        assert abs(float(await heard.next()) - shortened.timestamp()) < 1e-5
        await heard.nothing_more()
