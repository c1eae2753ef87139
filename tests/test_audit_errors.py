"""The self-audit's errors check against a real error-sink process: every report the sink
acknowledged on ERRORS is in error_logs; a report deleted by hand is found by its id and stream
sequence and resolved once it is back; a sink that stopped is found behind."""

from __future__ import annotations

import json
import uuid

import asyncpg

from boxoffice import bus as busmod
from boxoffice.reaper import audit_streams as streams
from boxoffice.reaper.audit_errors import Errors
from boxoffice.wire.subjects import ERROR_SINK_CONSUMER
from tests.audit_support import auditor, named, run
from tests.harness import eventually


def report(i: int, **over: object) -> dict[str, object]:
    return {"id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
            "service": "shop-web", "level": "error", "message": f"cart {i} failed", **over}


async def publish(bus: busmod.Bus, body: dict[str, object], msg_id: str) -> None:
    assert await bus.publish("errors.shop-web.error", json.dumps(body).encode(), msg_id)


async def stored_all(db: asyncpg.Pool, bus: busmod.Bus, count: int) -> None:
    async def done() -> bool:
        got = await streams.progress(bus, *ERROR_SINK_CONSUMER)
        return (await db.fetchval("SELECT count(*) FROM error_logs") == count
                and got is not None and got.ack_floor == got.last_seq)
    await eventually(done, 30, "the sink to store and acknowledge every report")


async def test_a_deleted_report_is_found_and_resolved_once_back(
        db: asyncpg.Pool, nats_url: str, start_service) -> None:
    sink = start_service("error_sink")
    async with busmod.connect(nats_url, "audit-test") as bus:
        await bus.declare_streams("ERRORS")
        bodies = [report(i) for i in range(40)]
        for b in bodies:
            await publish(bus, b, str(b["id"]))
        # no id in the body, a Nats-Msg-Id that is not a uuid: the sink stores it under a
        # derived id, which the check computes the same way (no false alarm)
        await publish(bus, {k: v for k, v in report(99).items() if k != "id"}, "custom-report-1")
        await stored_all(db, bus, 41)

        a = auditor(db, Errors(db, bus, retention_days=90))
        first = await run(a)
        assert first.holds and first.checks[0].examined == 41, first

        gone = bodies[17]["id"]
        row = await db.fetchrow("DELETE FROM error_logs WHERE id = $1 RETURNING *", uuid.UUID(gone))
        await publish(bus, report(100), str(uuid.uuid4()))  # the sink goes on meanwhile
        await stored_all(db, bus, 41)
        full = await run(a, full=True)  # the deleted one is far behind the checkpoint
        assert named(full) == {("errors", "report_missing", f"report {gone}")}
        [f] = full.findings
        assert f.ids == {"report_id": gone, "seq": 18} and f.found == "missing (ERRORS seq 18)"

        again = await run(a)  # incremental: the open finding is looked up again by its id
        assert named(again) == named(full) and again.checks[0].examined == 0

        columns = ", ".join(f'"{c}"' for c in row.keys())  # noqa: SIM118 - an asyncpg Record iterates its values
        values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
        await db.execute(f"INSERT INTO error_logs ({columns}) VALUES ({values})", *row.values())
        fixed = await run(a)
        assert fixed.holds and fixed.checks[0].resolved == 1

        # the sink stops: what it has not acknowledged ages on the bus
        sink.kill()
        await publish(bus, report(101), str(uuid.uuid4()))
        await publish(bus, report(102), str(uuid.uuid4()))
        behind = auditor(db, Errors(db, bus, retention_days=90, backlog=0.5))
        await eventually(lambda: _aged(bus), 10, "a report older than the bound")
        late = await run(behind)
        assert named(late) == {("errors", "sink_behind", "ERRORS consumer error-sink")}
        assert late.findings[0].found.startswith("2 not acknowledged, the oldest (seq 43)")
        start_service("error_sink")
        await stored_all(db, bus, 44)
        assert (await run(behind)).holds


async def _aged(bus: busmod.Bus) -> bool:
    got = await streams.progress(bus, *ERROR_SINK_CONSUMER)
    assert got is not None
    first = await streams.message(bus, "ERRORS", got.ack_floor + 1, at_or_after=True)
    return first is not None and streams.age(first) > 0.5
