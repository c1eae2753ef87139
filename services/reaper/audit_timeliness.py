"""The timeliness check: what must happen soon did.

- No active hold past its ``expires_at`` by more than ``OVERDUE`` (the reaper releases one
  within about a second).
- The outbox holds no event older than ``BACKLOG`` (the relay publishes within milliseconds).
- The webhook service has been handed every Stripe event older than ``BACKLOG`` (messages of
  ``STRIPE_EVENTS`` not yet delivered to its durable consumer; an event being retried after a
  failure has been delivered and is counted by its attempts instead).
- No Stripe event is ``failed`` in ``webhook_events_log``: each is named until it is replayed.
- No refund or cancel decided more than ``AUDIT_GRACE_SECONDS`` ago is still waiting to be
  made at Stripe (``stripe_actions``).

All of it reads backlogs, which stay short while the promises hold, never history: there is no
checkpoint, and every run is the same cheap pass.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from boxoffice.audit import Checkpoint, Examination, Violation
from boxoffice.bus import Bus
from boxoffice.reaper import audit_streams as streams
from boxoffice.wire.subjects import WEBHOOK_CONSUMER

OVERDUE = timedelta(seconds=5)
BACKLOG = 120.0  # seconds
LIMIT = 10_000   # rows per kind looked at in one run (more are summed up by the auditor anyway)

# The clock is read once ((SELECT clock_timestamp())) so that it bounds the scan of the index of
# active holds: clock_timestamp() itself is volatile, a filter on every active hold.
HOLDS = """
SELECT id, event_id, expires_at, extract(epoch FROM clock_timestamp() - expires_at) AS late
FROM reservations
WHERE status = 'active' AND expires_at < (SELECT clock_timestamp()) - $1::interval
ORDER BY expires_at LIMIT $2
"""
OUTBOX = """
SELECT id, subject, extract(epoch FROM clock_timestamp() - created_at) AS age,
       (SELECT count(*) FROM outbox) AS rows
FROM outbox ORDER BY id LIMIT 1
"""
FAILED_EVENTS = """
SELECT event_id, event_type, attempts, last_error FROM webhook_events_log
WHERE processing_status = 'failed' ORDER BY received_at LIMIT $1
"""
ACTIONS = """
SELECT id, kind, payment_intent_id, reservation_id, attempts, last_error,
       extract(epoch FROM clock_timestamp() - created_at) AS age
FROM stripe_actions
WHERE status = 'pending' AND created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY created_at LIMIT $2
"""


class Timeliness:
    name = "timeliness"

    def __init__(self, pool: asyncpg.Pool, bus: Bus, *, grace: float, backlog: float = BACKLOG,
                 timeout: float = 120.0):
        self.pool = pool
        self.bus = bus
        self.grace = grace
        self.backlog = backlog
        self.timeout = timeout

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        out = Examination(checkpoint={})
        add = out.violations.append
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            holds = await conn.fetch(HOLDS, OVERDUE, LIMIT, timeout=self.timeout)
            outbox = await conn.fetchrow(OUTBOX, timeout=self.timeout)
            failed = await conn.fetch(FAILED_EVENTS, LIMIT, timeout=self.timeout)
            actions = await conn.fetch(ACTIONS, float(self.grace), LIMIT, timeout=self.timeout)
        for r in holds:
            add(Violation("hold_overdue", f"hold {r['id']}",
                          {"reservation_id": str(r["id"]), "event_id": str(r["event_id"])},
                          f"released by {OVERDUE.total_seconds():g} s after "
                          f"{r['expires_at']:%Y-%m-%dT%H:%M:%S}Z",
                          f"still active {r['late']:.0f} s after it expired"))
        if outbox is not None and outbox["age"] > self.backlog:
            add(Violation("outbox_backlog", "outbox", {"table": "outbox"},
                          f"no event waiting to be published longer than {self.backlog:g} s",
                          f"{outbox['rows']} waiting, the oldest ({outbox['subject']}) "
                          f"{outbox['age']:.0f} s"))
        for r in failed:
            add(Violation("webhook_event_failed", f"stripe event {r['event_id']}",
                          {"event_id": r["event_id"]}, "applied (or replayed once fixed)",
                          f"{r['event_type']} failed after {r['attempts']} attempts: "
                          f"{(r['last_error'] or '')[:200]}"))
        for r in actions:
            add(Violation("stripe_action_overdue", f"{r['kind']} of {r['payment_intent_id']}",
                          {"action_id": r["id"], "payment_intent_id": r["payment_intent_id"]},
                          f"made at Stripe within {self.grace:g} s of being decided",
                          f"pending for {r['age']:.0f} s after {r['attempts']} attempts"
                          + (f": {r['last_error'][:200]}" if r["last_error"] else "")))
        stream, durable = WEBHOOK_CONSUMER
        got = await streams.progress(self.bus, stream, durable)
        if got is not None and got.pending:
            first = await streams.message(self.bus, stream, got.delivered + 1, at_or_after=True)
            if first is not None and streams.age(first) > self.backlog:
                add(Violation("stripe_events_backlog", f"{stream} consumer {durable}",
                              {"stream": stream, "consumer": durable},
                              f"every Stripe event handed to the webhook service within "
                              f"{self.backlog:g} s",
                              f"{got.pending} waiting, the oldest (seq {first.seq}) "
                              f"{streams.age(first):.0f} s"))
        out.examined = len(holds) + len(failed) + len(actions) + 2
        return out
