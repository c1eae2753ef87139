"""Self-audit benchmark: an incremental run against a full pass, on a large history.

1. History, seeded in bulk SQL as the functions leave it: 1,000,000 one-ticket holds over 1,000
   ticketed events of 16 buckets (40% sold, each with its succeeded payment; 50% expired; 10%
   cancelled after a refund), buckets consistent with them; 50,000 error reports on ERRORS,
   stored and acknowledged by a real error-sink process.
2. A full pass of the reaper's four checks (inventory, money, timeliness, errors): the cost of
   looking at everything, in this run.
3. 10,000 changes through the real functions, on 20 events on sale: 5,000 new holds
   (``hold_tickets``), 2,500 of them paid (a PaymentIntent recorded, then Stripe's
   ``payment_intent.succeeded`` applied), 1,500 expired (``expire_due_reservations``), 1,000
   cancelled (``release_reservation``); and 10,000 new error reports.
4. An incremental run (what the timer does), one with nothing changed since, and a full pass
   again over the grown history. Each run must find nothing.

The Stripe check is not here: its cost is Stripe's lists since the checkpoint, which no local
emulator times faithfully. Runs its own PostgreSQL, nats-server and error-sink; prints one JSON
object. Usage: .venv/bin/python -m bench.audit [--holds 1000000] [--changes 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from bench.polls import wait_until
from boxoffice import audit, db, migrate
from boxoffice import bus as busmod
from boxoffice.embedded import NatsServer, Postgres
from boxoffice.reaper.audit_errors import Errors
from boxoffice.reaper.audit_inventory import Inventory
from boxoffice.reaper.audit_money import Money
from boxoffice.reaper.audit_timeliness import Timeliness
from tests.errors_support import publish
from tests.harness import ServiceProcess, base_env

EVENTS = 1000
BUCKETS = 16
ON_SALE = 20
REPORTS = 50_000

SEED = """
WITH h AS (
    SELECT e.id AS event_id, g AS n,
           CASE WHEN g % 10 < 4 THEN 'completed' WHEN g % 10 < 9 THEN 'expired'
                ELSE 'cancelled' END AS status
    FROM ticketed_events e, generate_series(1, $1) g
    WHERE e.name = 'history'
), r AS (
    INSERT INTO reservations (event_id, client_id, customer_ref, quantity, amount, currency,
                              status, expires_at, created_at, updated_at, completed_at,
                              released_at, payment_intent_id)
    SELECT event_id, 'bench', n::text, 1, 1000, 'eur', status, now() - interval '30 days',
           now() - interval '31 days', now() - interval '30 days',
           CASE WHEN status = 'completed' THEN now() - interval '30 days' END,
           CASE WHEN status <> 'completed' THEN now() - interval '30 days' END,
           CASE WHEN status <> 'expired' THEN 'pi_bench_' || md5(random()::text) END
    FROM h
    RETURNING id, event_id, customer_ref, status, payment_intent_id
), a AS (
    INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
    SELECT id, event_id, customer_ref::integer % $2, 1 FROM r
    RETURNING reservation_id
)
INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, status, refund_id,
                      refund_reason, created_at, updated_at)
SELECT payment_intent_id, id, 1000, 'eur',
       CASE WHEN status = 'completed' THEN 'succeeded' ELSE 'refunded' END,
       CASE WHEN status = 'cancelled' THEN 're_bench' END,
       CASE WHEN status = 'cancelled' THEN 'refunded_in_stripe' END,
       now() - interval '31 days', now() - interval '30 days'
FROM r WHERE payment_intent_id IS NOT NULL
"""
SOLD = """
UPDATE inventory_buckets b SET sold = s.q
FROM (SELECT a.event_id, a.bucket, count(*)::integer AS q
      FROM reservations r JOIN reservation_allocations a ON a.reservation_id = r.id
      WHERE r.status = 'completed' GROUP BY 1, 2) s
WHERE b.event_id = s.event_id AND b.bucket = s.bucket
"""
APPLY = ("SELECT outcome FROM apply_stripe_event($1, 'payment_intent.succeeded', now(), "
         "'{}', $2, $3, $4, 'eur')")


def report(i: int) -> dict[str, object]:
    return {"id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
            "service": "shop-web", "level": "error", "message": f"cart {i} failed"}


async def stored(pool: asyncpg.Pool, count: int, timeout: float = 300) -> None:
    await wait_until(pool, "SELECT count(*) >= $1 FROM error_logs", count, timeout=timeout,
                     every=0.2)
    await asyncio.sleep(1.5)  # its last acknowledgements reach JetStream


async def seed(pool: asyncpg.Pool, holds: int) -> float:
    t = time.monotonic()
    await pool.execute("SELECT create_ticketed_event(gen_random_uuid(), 'history', $1, 1000, "
                       "'eur', $2) FROM generate_series(1, $3)",
                       holds // EVENTS * 2, BUCKETS, EVENTS)
    await pool.execute("SELECT create_ticketed_event(gen_random_uuid(), 'on sale', 100000, 1000, "
                       "'eur', $1) FROM generate_series(1, $2)", BUCKETS, ON_SALE)
    await pool.execute(SEED, holds // EVENTS, BUCKETS, timeout=3600)
    await pool.execute(SOLD, timeout=3600)
    for table in ("reservations", "reservation_allocations", "payments", "inventory_buckets"):
        await pool.execute(f"VACUUM ANALYZE {table}", timeout=3600)
    return time.monotonic() - t


async def change(pool: asyncpg.Pool, changes: int) -> float:
    """``changes`` changes through the functions: half new holds, the other half ends of them."""
    events = [r["id"] for r in await pool.fetch(
        "SELECT id FROM ticketed_events WHERE name = 'on sale'")]
    new, paid, expired = changes // 2, changes // 4, changes * 3 // 20
    t = time.monotonic()
    sem = asyncio.Semaphore(8)

    async def one_hold(i: int) -> uuid.UUID:
        async with sem:
            return await pool.fetchval("SELECT id FROM hold_tickets($1, 1, 'buyer', 900)",
                                       events[i % len(events)])

    holds = await asyncio.gather(*(one_hold(i) for i in range(new)))

    async def pay(res: uuid.UUID) -> None:
        pi = f"pi_{uuid.uuid4().hex[:24]}"
        async with sem, pool.acquire() as conn:
            await conn.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, "
                               "currency, status) VALUES ($1, $2, 1000, 'eur', 'created')", pi, res)
            await conn.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2",
                               pi, res)
            assert await conn.fetchval(APPLY, f"evt_{uuid.uuid4().hex}", pi, res, 1000) \
                == "completed"

    await asyncio.gather(*(pay(r) for r in holds[:paid]))
    await pool.execute("UPDATE reservations SET expires_at = now() - interval '1 s' "
                       "WHERE id = ANY($1)", holds[paid:paid + expired])
    assert await pool.fetchval("SELECT expire_due_reservations($1)", expired) == expired
    for res in holds[paid + expired:]:
        await pool.execute("SELECT release_reservation($1)", res)
    return time.monotonic() - t


async def timed(a: audit.Auditor, full: bool) -> dict[str, object]:
    t = time.monotonic()
    result = await a.run(full, timeout=3600)
    took = time.monotonic() - t
    findings: list[tuple[object, ...]] = [(f.check, f.kind, f.subject)
                                          for f in result.findings[:10]]
    assert result.holds, findings or [(c.check, c.error) for c in result.checks]
    return {"seconds": round(took, 3),
            "checks": {c.check: {"seconds": round(c.seconds or 0, 3), "examined": c.examined}
                       for c in result.checks}}


async def run(db_url: str, nats_url: str, root: Path, holds: int, changes: int) -> dict:
    figures: dict[str, object] = {"holds": holds, "events": EVENTS + ON_SALE, "changes": changes}
    env = base_env(nats_url, db_url)
    env["LOG_LEVEL"] = "WARNING"
    sink = ServiceProcess("error_sink", env, root / "error_sink.log").start()
    try:
        async with db.pool(db_url, min_size=2, max_size=12) as pool, \
                busmod.connect(nats_url, "bench") as bus:
            figures["seed_seconds"] = round(await seed(pool, holds), 1)
            await publish(nats_url, [report(i) for i in range(REPORTS)])
            await stored(pool, REPORTS)
            checks = [Inventory(pool), Money(pool), Timeliness(pool, bus, grace=900),
                      Errors(pool, bus, retention_days=90)]
            a = audit.Auditor(pool, checks, interval=300)
            figures["full_before"] = await timed(a, full=True)
            figures["change_seconds"] = round(await change(pool, changes), 1)
            await publish(nats_url, [report(i) for i in range(changes)])
            await stored(pool, REPORTS + changes)
            figures["incremental"] = await timed(a, full=False)
            figures["incremental_nothing_changed"] = await timed(a, full=False)
            figures["full_after"] = await timed(a, full=True)
            full = figures["full_after"]["seconds"]  # type: ignore[index]
            inc = figures["incremental"]["seconds"]  # type: ignore[index]
            figures["full_vs_incremental"] = round(full / inc, 1)
    finally:
        sink.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.audit")
    parser.add_argument("--holds", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        root = Path(tmp)
        pg = Postgres(root / "pg" / "data").start(create_db="boxoffice")
        nats = NatsServer(root / "nats", sync_always=False).start()
        try:
            db_url = pg.url("boxoffice")
            migrate.run(db_url, "up")
            t = time.monotonic()
            figures = asyncio.run(run(db_url, nats.url, root, args.holds, args.changes))
            figures["bench_seconds"] = round(time.monotonic() - t, 1)
            print(json.dumps({"bench": "audit", **figures}))
        finally:
            nats.stop()
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
