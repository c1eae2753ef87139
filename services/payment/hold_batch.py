"""Group commit for holds: concurrent holds on one event share one transaction.

On a hot event every hold is a short transaction whose cost is mostly per transaction (the
commit's WAL flush), not per ticket. So holds that arrive while a batch
of the same event is in flight wait for the next batch, and each batch is one round trip to
``hold_tickets_batch`` (one transaction, one commit). There is no timer: a lone hold goes at
once, and batches grow only as far as the load makes them.

A hold's transaction fires no NOTIFY (PostgreSQL serialises the commits of notifying
transactions through the WAL flush, so they could not group-commit): its 'held' outbox row is
written quietly and the batcher wakes this process's relay itself after the commit (``wake``),
and the reaper re-reads its next due time every second instead of being told of each hold.

Each item of a batch takes the fast path only (a bucket with enough tickets that no one else
holds; the following items are served from the same bucket while it has enough, with one UPDATE
of it for them all), so a batch never waits for a lock and batches cannot deadlock. Items that miss (near
sell-out, or every bucket busy) are run one by one through the full ``hold_tickets``, which
waits, expires overdue holds, gathers across buckets, or says sold out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum

import asyncpg
import prometheus_client

from boxoffice import idempotency, wire
from boxoffice.payment import reservations
from boxoffice.wire.payments import StoredResponse
from boxoffice.wire.reservations import HoldRequest

log = logging.getLogger("boxoffice.payment.holds")

BATCH_SIZE = prometheus_client.Histogram(
    "boxoffice_hold_batch_size", "Holds per hold_tickets_batch transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64))
SLOW_PATH = prometheus_client.Counter(
    "boxoffice_hold_slow_path_total", "Holds that missed the batch's fast path and ran alone")


class BatchHoldOutcome(StrEnum):
    """What ``hold_tickets_batch`` did with one item."""

    HELD = "held"
    RETRY = "retry"  # the fast path could not serve it: the full hold runs for it
    IN_USE = "in_use"  # its key is locked by another transaction
    REPLAY = "replay"  # its key already made a hold with this request
    MISMATCH = "mismatch"  # its key already made a hold with another request


MAX_BATCH = 64
FLUSHERS_PER_EVENT = 3  # batches of one event in flight at once (one PostgreSQL backend each)


@dataclass
class _Pending:
    req: HoldRequest
    future: asyncio.Future[StoredResponse] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class HoldBatcher:
    def __init__(self, pool: asyncpg.Pool, ttl_seconds: int, *, max_batch: int = MAX_BATCH,
                 flushers: int = FLUSHERS_PER_EVENT, wake: asyncio.Event | None = None):
        self.pool = pool
        self.ttl = ttl_seconds
        self.wake = wake  # this process's outbox relay, set after each hold's commit
        self.max_batch = max_batch
        self.flushers = flushers
        self._queues: dict[str, list[_Pending]] = defaultdict(list)
        self._active: dict[str, int] = defaultdict(int)
        self._tasks: set[asyncio.Task[None]] = set()

    async def hold(self, req: HoldRequest) -> StoredResponse:
        item = _Pending(req)
        self._queues[req.event_id].append(item)
        if self._active[req.event_id] < self.flushers:
            self._active[req.event_id] += 1
            task = asyncio.create_task(self._flush(req.event_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await item.future

    async def _flush(self, event_id: str) -> None:
        queue = self._queues[event_id]
        try:
            while queue:
                batch = queue[:self.max_batch]
                del queue[:self.max_batch]
                try:
                    await self._run(event_id, batch)
                except Exception as exc:  # noqa: BLE001 - each waiter gets the failure
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
        finally:
            self._active[event_id] -= 1
            if not self._active[event_id]:
                del self._active[event_id]
                if not queue:
                    self._queues.pop(event_id, None)

    async def _run(self, event_id: str, batch: list[_Pending]) -> None:
        reqs = [p.req for p in batch]
        BATCH_SIZE.observe(len(reqs))
        args = (uuid.UUID(event_id), self.ttl, [r.quantity for r in reqs],
                [r.client_id for r in reqs], [r.customer_ref for r in reqs],
                [r.idempotency_key for r in reqs], [r.fingerprint for r in reqs])
        sql = "SELECT * FROM hold_tickets_batch($1, $2, $3, $4, $5, $6, $7)"
        answers: dict[int, StoredResponse | Exception] = {}
        retry: list[int] = []
        async with self.pool.acquire() as conn:
            if any(r.idempotency_key for r in reqs):
                async with conn.transaction():
                    rows = await conn.fetch(sql, *args)
                    bodies = self._answer(reqs, rows, answers, retry)
                    if bodies:
                        await conn.execute(
                            "UPDATE reservations r SET response_body = b.body "
                            "FROM unnest($1::uuid[], $2::text[]) AS b(id, body) WHERE r.id = b.id",
                            [b[0] for b in bodies], [b[1] for b in bodies])
            else:  # one statement, one implicit transaction: one round trip
                rows = await conn.fetch(sql, *args)
                self._answer(reqs, rows, answers, retry)
        if self.wake is not None and len(answers) > 0:
            self.wake.set()  # the new holds' 'held' rows are committed, written quietly
        for i, answer in answers.items():
            if isinstance(answer, Exception):
                batch[i].future.set_exception(answer)
            else:
                batch[i].future.set_result(answer)
        if retry:
            SLOW_PATH.inc(len(retry))
            results = await asyncio.gather(
                *(reservations.hold(self.pool, reqs[i], self.ttl, self.wake) for i in retry),
                return_exceptions=True)
            for i, result in zip(retry, results):
                if isinstance(result, BaseException):
                    batch[i].future.set_exception(result)
                else:
                    batch[i].future.set_result(result)

    def _answer(self, reqs: list[HoldRequest], rows: list[asyncpg.Record],
                answers: dict[int, StoredResponse | Exception], retry: list[int]
                ) -> list[tuple[uuid.UUID, str]]:
        """Turn the batch's rows into answers; returns the bodies of new keyed holds to store."""
        to_store: list[tuple[uuid.UUID, str]] = []
        made: dict[tuple[str, str], str] = {}  # keyed holds made in this batch: their bodies
        for row in rows:
            i, outcome, req = row["idx"], BatchHoldOutcome(row["outcome"]), reqs[row["idx"]]
            if outcome is BatchHoldOutcome.HELD:
                body = wire.encode(reservations.view({
                    "id": row["id"], "event_id": req.event_id, "quantity": req.quantity,
                    "expires_at": row["expires_at"], "amount": row["amount"],
                    "currency": row["currency"], "customer_ref": req.customer_ref,
                    "created_at": row["created_at"], "payment_intent_id": None,
                }, "active")).decode()
                answers[i] = StoredResponse(status=201, body=body)
                if req.idempotency_key is not None:
                    to_store.append((row["id"], body))
                    made[(req.client_id, req.idempotency_key)] = body
            elif outcome is BatchHoldOutcome.REPLAY:
                body = row["response_body"] or made[(req.client_id, req.idempotency_key or "")]
                answers[i] = StoredResponse(status=201, body=body, replayed=True)
            elif outcome is BatchHoldOutcome.MISMATCH:
                answers[i] = idempotency.IdempotencyKeyMismatch(
                    "this Idempotency-Key was used for another hold; use a new key")
            elif outcome is BatchHoldOutcome.IN_USE:
                answers[i] = idempotency.IdempotencyKeyInUse(
                    "a hold with this Idempotency-Key is in progress", retry_after=1)
            else:  # BatchHoldOutcome.RETRY
                retry.append(i)
        return to_store
