"""The errors check: every report acknowledged on ``ERRORS`` is in ``error_logs``.

The error-sink acknowledges a report only once its transaction committed, so its durable
consumer's ack floor is a claim: every message of ``ERRORS`` up to that sequence is stored.
The check holds the sink to it, from JetStream's bookkeeping rather than the sink's word:

- the ids of the messages between the checkpoint (the ack floor verified last time) and the
  ack floor now are read from the stream (headers only) and looked up in ``error_logs``; a
  message whose ``Nats-Msg-Id`` is not found is read whole and its stored id computed exactly as
  the sink does (``stored_id``) before it is called missing. A full pass reads the whole stream.
- the oldest report the sink has not acknowledged is younger than ``BACKLOG``.

Reports that retention may have deleted (on the bus longer ago than ``ERROR_RETENTION_DAYS``)
are not expected. The stream keeps 7 days, so a report deleted from ``error_logs`` is found
while the stream still has it; its finding stays open, looked up by id, until it is back.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from boxoffice.audit import Checkpoint, Examination, Violation
from boxoffice.bus import Bus
from boxoffice.reaper import audit_streams as streams
from boxoffice.wire.errors import stored_id
from boxoffice.wire.subjects import ERROR_SINK_CONSUMER

BACKLOG = 120.0  # seconds
CHUNK = 5000     # ids looked up per query
_json = msgspec.json.Encoder()


def body_id(data: bytes | None) -> str | None:
    """The ``id`` the sink reads from a report's body: a string as is, any other JSON value as
    its JSON text, nothing when the body is not a JSON object."""
    try:
        obj = msgspec.json.decode(data or b"")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("id") is None:
        return None
    value = obj["id"]
    return value if isinstance(value, str) else _json.encode(value).decode()


def _uuid(text: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(text) if text else None
    except ValueError:
        return None


def missing_violation(report_id: str, seq: int | None) -> Violation:
    where = f"ERRORS seq {seq}" if seq else "no longer on ERRORS"
    return Violation("report_missing", f"report {report_id}", {"report_id": report_id, "seq": seq},
                     "in error_logs (the error-sink acknowledged it)", f"missing ({where})")


class Errors:
    name = "errors"

    def __init__(self, pool: asyncpg.Pool, bus: Bus, *, retention_days: int,
                 backlog: float = BACKLOG, timeout: float = 300.0):
        self.pool = pool
        self.bus = bus
        self.retention = timedelta(days=retention_days)
        self.backlog = backlog
        self.timeout = timeout

    async def _present(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        found: set[uuid.UUID] = set()
        async with self.pool.acquire() as conn:
            for i in range(0, len(ids), CHUNK):
                rows = await conn.fetch("SELECT id FROM error_logs WHERE id = ANY($1::uuid[])",
                                        ids[i:i + CHUNK], timeout=self.timeout)
                found.update(r["id"] for r in rows)
        return found

    async def examine(self, since: Checkpoint | None, reopen: list[dict[str, Any]]) -> Examination:
        stream, durable = ERROR_SINK_CONSUMER
        out = Examination()
        got = await streams.progress(self.bus, stream, durable)
        if got is None:  # nothing was ever reported on this bus
            out.checkpoint = {"seq": 0}
            gone = await self._still_missing(reopen, {})
            out.violations += [missing_violation(r, s) for r, s in gone.items()]
            return out
        start = max(got.first_seq - 1, 0)
        if since is not None and since.get("seq", 0) <= got.last_seq:  # else: a new stream
            start = max(start, int(since["seq"]))
        floor = max(got.ack_floor, start)
        heads = await streams.headers(self.bus, stream, start, floor)
        out.examined = len(heads)
        out.checkpoint = {"seq": floor}
        keyed = {h.seq: _uuid(h.msg_id) for h in heads}
        present = await self._present([k for k in keyed.values() if k is not None])
        expired_before = datetime.now(UTC) - self.retention
        suspects = [h for h in heads
                    if keyed[h.seq] not in present and h.stored_at > expired_before]
        exact: dict[int, uuid.UUID | None] = {}
        for h in suspects:  # read whole, so the id is the one the sink stored it under
            msg = await streams.message(self.bus, stream, h.seq)
            if msg is not None:
                exact[h.seq] = _uuid(stored_id(body_id(msg.data), h.msg_id, msg.subject or "",
                                               msg.data or b""))
        present |= await self._present([k for k in exact.values() if k is not None])
        seen: dict[str, int | None] = {}
        for h in suspects:
            rid = exact.get(h.seq) or keyed[h.seq]
            if rid is not None and rid not in present:
                seen[str(rid)] = h.seq
        seen.update(await self._still_missing(reopen, seen))
        out.violations += [missing_violation(r, s) for r, s in seen.items()]
        if got.ack_pending or got.pending:
            first = await streams.message(self.bus, stream, got.ack_floor + 1, at_or_after=True)
            if first is not None and streams.age(first) > self.backlog:
                out.violations.append(Violation(
                    "sink_behind", f"{stream} consumer {durable}",
                    {"stream": stream, "consumer": durable},
                    f"every report stored within {self.backlog:g} s of reaching the bus",
                    f"{got.pending + got.ack_pending} not acknowledged, "
                    f"the oldest (seq {first.seq}) {streams.age(first):.0f} s"))
        return out

    async def _still_missing(self, reopen: list[dict[str, Any]], seen: dict[str, int | None]
                             ) -> dict[str, int | None]:
        """Reports found missing before: missing until their id is in error_logs."""
        earlier = {i["report_id"]: i.get("seq") for i in reopen
                   if i.get("report_id") and i["report_id"] not in seen}
        ids = {rid: u for rid in earlier if (u := _uuid(rid)) is not None}
        present = await self._present(list(ids.values()))
        return {rid: earlier[rid] for rid, u in ids.items() if u not in present}
