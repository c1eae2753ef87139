"""What reconciliation keeps in PostgreSQL: the lease, how far it got, its runs and its orphans.

- ``stripe_reconciliation`` (one row) holds the lease and the two points. A replica runs only
  when no lease is live and the last run started an interval ago, so replicas take turns and a
  run happens about once per interval whatever their number. The lease is renewed while the run
  lasts; a replica that dies leaves it to lapse, and its run is closed as interrupted by the next.
- A point moves only forward (``greatest``), only by the replica holding the lease, and only
  past what was fed: a run that fails leaves it where the last fed event put it.
- ``stripe_reconcile_runs``: one row per run, counts written at every checkpoint, so a run in
  progress (or one whose replica died) shows what it had done.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from boxoffice.wire import stripe as w

RUNS_KEPT = timedelta(days=30)
NOT_FINAL = ["created", "processing", "failed"]

_ACQUIRE = """
UPDATE stripe_reconciliation s
SET lease_token = $1, lease_until = clock_timestamp() + make_interval(secs => $2),
    last_started_at = clock_timestamp()
WHERE (s.lease_until IS NULL OR s.lease_until < clock_timestamp())
  AND (s.last_started_at IS NULL
       OR s.last_started_at <= clock_timestamp() - make_interval(secs => $3))
RETURNING s.events_until, s.intents_until
"""

_CHECKPOINT = """
WITH lease AS (
    UPDATE stripe_reconciliation s
    SET events_until = greatest(s.events_until, $3), intents_until = greatest(s.intents_until, $4),
        lease_until = clock_timestamp() + make_interval(secs => $5)
    WHERE s.lease_token = $1
    RETURNING 1
)
UPDATE stripe_reconcile_runs r
SET events_seen = $6, events_recovered = $7, intents_checked = $8, intents_corrected = $9,
    orphans_found = $10
FROM lease WHERE r.id = $2
RETURNING r.id
"""


class LeaseLost(Exception):
    """Another replica holds the lease now (ours lapsed): this run stops without writing."""


@dataclass
class Tally:
    """What a run saw and did so far (the columns of its ``stripe_reconcile_runs`` row)."""

    events_seen: int = 0
    events_recovered: int = 0
    intents_checked: int = 0
    intents_corrected: int = 0
    orphans_found: int = 0

    def values(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class Lease:
    token: uuid.UUID
    run_id: int
    events_until: datetime | None
    intents_until: datetime | None


async def acquire(pool: asyncpg.Pool, replica: str, *, interval: float,
                  lease_seconds: float) -> Lease | None:
    """Take the lease and open a run, if no replica holds it and a run is due; else None."""
    token = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        # a run is due a little before a full interval, so a replica ticking every interval
        # does not miss its turn by the time its own last run took
        row = await conn.fetchrow(_ACQUIRE, token, lease_seconds, interval * 0.9)
        if row is None:
            return None
        await conn.execute("UPDATE stripe_reconcile_runs SET finished_at = clock_timestamp(), "
                           "error = 'interrupted: its replica stopped or lost the database' "
                           "WHERE finished_at IS NULL")
        run_id = await conn.fetchval("INSERT INTO stripe_reconcile_runs (replica) VALUES ($1) "
                                     "RETURNING id", replica)
    return Lease(token, run_id, row["events_until"], row["intents_until"])


async def checkpoint(pool: asyncpg.Pool, lease: Lease, tally: Tally, *, lease_seconds: float,
                     events_until: datetime | None = None,
                     intents_until: datetime | None = None) -> None:
    """Renew the lease, move the points forward, write the run's counts; raises ``LeaseLost``."""
    done = await pool.fetchval(_CHECKPOINT, lease.token, lease.run_id, events_until,
                               intents_until, lease_seconds, *tally.values())
    if done is None:
        raise LeaseLost("the reconciliation lease was taken over")


async def finish(pool: asyncpg.Pool, lease: Lease, tally: Tally, error: str | None) -> None:
    """Close the run, release the lease, forget runs older than ``RUNS_KEPT``."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE stripe_reconcile_runs SET finished_at = clock_timestamp(), error = $2, "
            "events_seen = $3, events_recovered = $4, intents_checked = $5, "
            "intents_corrected = $6, orphans_found = $7 WHERE id = $1",
            lease.run_id, error, *tally.values())
        await conn.execute("UPDATE stripe_reconciliation SET lease_token = NULL, "
                           "lease_until = NULL WHERE lease_token = $1", lease.token)
        await conn.execute("DELETE FROM stripe_reconcile_runs "
                           "WHERE started_at < now() - $1::interval", RUNS_KEPT)


# -- what boxoffice knows --------------------------------------------------------------------
async def unknown_events(pool: asyncpg.Pool, event_ids: list[str]) -> set[str]:
    """Those of ``event_ids`` that ``webhook_events_log`` has no row for."""
    rows = await pool.fetch("SELECT e FROM unnest($1::text[]) AS e WHERE NOT EXISTS "
                            "(SELECT 1 FROM webhook_events_log w WHERE w.event_id = e)", event_ids)
    return {r["e"] for r in rows}


async def orphans(pool: asyncpg.Pool, intents: list[tuple[str, uuid.UUID]]) -> set[str]:
    """Those of (PaymentIntent, reservation) pairs that name one of our holds and that we never
    recorded: no payment row and no ``payment_intents_log`` answer carries them."""
    rows = await pool.fetch(
        "SELECT i.pi FROM unnest($1::text[], $2::uuid[]) AS i (pi, res) "
        "WHERE EXISTS (SELECT 1 FROM reservations r WHERE r.id = i.res) "
        "AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.payment_intent_id = i.pi) "
        "AND NOT EXISTS (SELECT 1 FROM payment_intents_log l "
        "                WHERE l.stripe_payment_intent_id = i.pi)",
        [pi for pi, _ in intents], [res for _, res in intents])
    return {r["pi"] for r in rows}


async def record_orphan(pool: asyncpg.Pool, run_id: int, intent: dict[str, Any],
                        reservation_id: uuid.UUID, action: w.OrphanAction) -> bool:
    """Record an orphan and, for ``cancel_requested``, decide its cancel in the same transaction
    (the action worker makes it at Stripe). False if it was recorded before."""
    async with pool.acquire() as conn, conn.transaction():
        if action == "cancel_requested":
            await conn.execute("SELECT request_stripe_action('cancel', $1, $2, 'orphan', $3)",
                               intent["id"], reservation_id, intent.get("amount"))
        new = await conn.fetchval(
            "INSERT INTO stripe_orphans (payment_intent_id, reservation_id, amount, currency, "
            "stripe_status, action, run_id) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (payment_intent_id) DO NOTHING RETURNING true",
            intent["id"], reservation_id, intent.get("amount"), intent.get("currency"),
            intent.get("status") or "", action, run_id)
    return bool(new)


async def unsettled_payments(pool: asyncpg.Pool, older_than: float, limit: int,
                             skip: list[str]) -> list[asyncpg.Record]:
    """Payments in a non-final state for longer than ``older_than`` seconds, those compared with
    Stripe longest ago (or never) first; rows of payments that became final are forgotten."""
    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM stripe_reconcile_checks c WHERE NOT EXISTS (SELECT 1 FROM payments p "
            "WHERE p.payment_intent_id = c.payment_intent_id AND p.status = ANY($1::text[]))",
            NOT_FINAL)
        return await conn.fetch(
            "SELECT p.payment_intent_id, p.status FROM payments p "
            "LEFT JOIN stripe_reconcile_checks c USING (payment_intent_id) "
            "WHERE p.status = ANY($1::text[]) "
            "AND p.updated_at < clock_timestamp() - make_interval(secs => $2) "
            "AND p.payment_intent_id <> ALL($4::text[]) "
            "ORDER BY c.checked_at NULLS FIRST, p.updated_at LIMIT $3",
            NOT_FINAL, older_than, limit, skip)


async def mark_checked(pool: asyncpg.Pool, payment_intent_ids: list[str]) -> None:
    await pool.execute(
        "INSERT INTO stripe_reconcile_checks (payment_intent_id, checked_at) "
        "SELECT unnest($1::text[]), clock_timestamp() "
        "ON CONFLICT (payment_intent_id) DO UPDATE SET checked_at = EXCLUDED.checked_at",
        payment_intent_ids)


# -- the operators' view ---------------------------------------------------------------------
async def report(pool: asyncpg.Pool, limit: int) -> w.Reconciliation:
    async with pool.acquire() as conn:
        state = await conn.fetchrow("SELECT events_until, intents_until FROM stripe_reconciliation")
        runs = await conn.fetch("SELECT * FROM stripe_reconcile_runs ORDER BY id DESC LIMIT $1",
                                limit)
        found = await conn.fetch(
            "SELECT o.*, a.status AS cancel_status FROM stripe_orphans o "
            "LEFT JOIN stripe_actions a ON a.kind = 'cancel' "
            "AND a.payment_intent_id = o.payment_intent_id AND o.action = 'cancel_requested' "
            "WHERE o.run_id = ANY($1::bigint[]) ORDER BY o.found_at, o.payment_intent_id",
            [r["id"] for r in runs])
    by_run: dict[int, list[w.ReconciledOrphan]] = {}
    for o in found:
        by_run.setdefault(o["run_id"], []).append(w.ReconciledOrphan(
            payment_intent_id=o["payment_intent_id"], reservation_id=str(o["reservation_id"]),
            amount=o["amount"], currency=o["currency"], stripe_status=o["stripe_status"],
            action=o["action"], found_at=o["found_at"], cancel_status=o["cancel_status"]))
    out = [w.ReconcileRun(
        id=r["id"], replica=r["replica"], started_at=r["started_at"], finished_at=r["finished_at"],
        error=r["error"], events_seen=r["events_seen"], events_recovered=r["events_recovered"],
        intents_checked=r["intents_checked"], intents_corrected=r["intents_corrected"],
        orphans_found=r["orphans_found"], orphans=by_run.get(r["id"], [])) for r in runs]
    return w.Reconciliation(events_until=state["events_until"] if state else None,
                            intents_until=state["intents_until"] if state else None,
                            last_run=out[0] if out else None, runs=out)
