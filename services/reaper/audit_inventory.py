"""The inventory check: each bucket's numbers are the sum of its holds.

Per ticketed event and bucket: ``held`` equals the tickets of its active holds, ``sold`` the
tickets of its completed holds, ``held + sold <= capacity``, and the buckets' capacities add up
to the event's. Read in one snapshot, so holds committing meanwhile never look like damage.

What each run costs:
- ``held`` and the capacities are checked everywhere on every run: active holds are few (they
  end within ``RESERVATION_TTL_SECONDS``; the ``reservations_due`` index lists them) and
  buckets are a few hundred rows per event.
- ``sold`` sums every completed hold of an event, which grows with history, so it is summed
  only for the events whose buckets moved since the last run: the checkpoint is each bucket's
  held and sold as last verified (``audit_bucket_marks``), so a bucket changed by any path, SQL
  by hand included, is verified again. A full pass sums every event.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from boxoffice.audit import Checkpoint, Examination, Violation

# Buckets whose numbers moved since they were last verified (or were never verified).
MOVED = """
SELECT DISTINCT b.event_id FROM inventory_buckets b
LEFT JOIN audit_bucket_marks m ON m.event_id = b.event_id AND m.bucket = b.bucket
WHERE m.event_id IS NULL OR m.held <> b.held OR m.sold <> b.sold
"""

HELD = """
WITH active AS (
    SELECT a.event_id, a.bucket, sum(a.quantity)::integer AS q
    FROM reservations r JOIN reservation_allocations a ON a.reservation_id = r.id
    WHERE r.status = 'active'
    GROUP BY a.event_id, a.bucket
)
SELECT b.event_id, b.bucket, b.held AS found, coalesce(active.q, 0) AS expected
FROM inventory_buckets b
LEFT JOIN active ON active.event_id = b.event_id AND active.bucket = b.bucket
WHERE b.held <> coalesce(active.q, 0)
"""

# The completed holds' tickets per bucket, against each bucket's sold: of every event, or of the
# events in $1 (two statements, not one with "$1 IS NULL OR": a prepared statement's generic
# plan would then scan every hold even for a handful of events).
_SOLD = """
WITH sold AS (
    SELECT a.event_id, a.bucket, sum(a.quantity)::integer AS q
    FROM reservations r JOIN reservation_allocations a ON a.reservation_id = r.id
    WHERE r.status = 'completed' {holds}
    GROUP BY a.event_id, a.bucket
)
SELECT b.event_id, b.bucket, b.sold AS found, coalesce(sold.q, 0) AS expected,
       count(*) OVER () AS buckets
FROM inventory_buckets b
LEFT JOIN sold ON sold.event_id = b.event_id AND sold.bucket = b.bucket
{buckets}
"""
SOLD_ALL = _SOLD.format(holds="", buckets="")
SOLD_OF = _SOLD.format(holds="AND r.event_id = ANY($1::uuid[])",
                       buckets="WHERE b.event_id = ANY($1::uuid[])")

CAPACITY = """
SELECT event_id, bucket, capacity, held, sold FROM inventory_buckets
WHERE held + sold > capacity
"""

SPLIT = """
SELECT e.id AS event_id, e.capacity, sum(b.capacity)::bigint AS buckets
FROM ticketed_events e JOIN inventory_buckets b ON b.event_id = e.id
GROUP BY e.id, e.capacity HAVING sum(b.capacity) <> e.capacity
"""

# The marks of the buckets just verified, as this snapshot saw them.
_MARK = """
INSERT INTO audit_bucket_marks AS m (event_id, bucket, held, sold)
SELECT event_id, bucket, held, sold FROM inventory_buckets {where}
ON CONFLICT (event_id, bucket) DO UPDATE SET held = EXCLUDED.held, sold = EXCLUDED.sold
"""
MARK_ALL = _MARK.format(where="")
MARK_OF = _MARK.format(where="WHERE event_id = ANY($1::uuid[])")


def bucket_subject(event_id: Any, bucket: int) -> tuple[str, dict[str, Any]]:
    return f"event {event_id} bucket {bucket}", {"event_id": str(event_id), "bucket": bucket}


class Inventory:
    name = "inventory"

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 600.0):
        self.pool = pool
        self.timeout = timeout

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        full = since is None
        out = Examination(checkpoint={"marks": "audit_bucket_marks"})
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            events: list[uuid.UUID] | None = None
            if not full:
                moved = {r["event_id"] for r in await conn.fetch(MOVED, timeout=self.timeout)}
                moved |= {uuid.UUID(i["event_id"]) for i in reopen if "event_id" in i}
                events = sorted(moved)
            for r in await conn.fetch(HELD, timeout=self.timeout):
                subject, ids = bucket_subject(r["event_id"], r["bucket"])
                out.violations.append(Violation(
                    "bucket_held", subject, ids,
                    f"held {r['expected']} (the tickets of its active holds)",
                    f"held {r['found']}"))
            if events is None or events:
                sold = (await conn.fetch(SOLD_ALL, timeout=self.timeout) if events is None else
                        await conn.fetch(SOLD_OF, events, timeout=self.timeout))
                for r in sold:
                    out.examined = r["buckets"]
                    if r["found"] != r["expected"]:
                        subject, ids = bucket_subject(r["event_id"], r["bucket"])
                        out.violations.append(Violation(
                            "bucket_sold", subject, ids,
                            f"sold {r['expected']} (the tickets of its completed holds)",
                            f"sold {r['found']}"))
            for r in await conn.fetch(CAPACITY, timeout=self.timeout):
                subject, ids = bucket_subject(r["event_id"], r["bucket"])
                out.violations.append(Violation(
                    "over_capacity", subject, ids, f"held + sold <= capacity {r['capacity']}",
                    f"held {r['held']} + sold {r['sold']}"))
            for r in await conn.fetch(SPLIT, timeout=self.timeout):
                out.violations.append(Violation(
                    "capacity_split", f"event {r['event_id']}", {"event_id": str(r["event_id"])},
                    f"buckets' capacities adding up to {r['capacity']}",
                    f"{r['buckets']}"))
            if events is None:
                await conn.execute("DELETE FROM audit_bucket_marks", timeout=self.timeout)
                await conn.execute(MARK_ALL, timeout=self.timeout)
            elif events:
                await conn.execute(MARK_OF, events, timeout=self.timeout)
        return out
