"""The error-sink as a real process: every report the bus accepted is stored once, grouped,
scrubbed, and alerted on, whatever is stopped or killed meanwhile."""

from __future__ import annotations

import asyncio

from tests.test_errors_support import count, eventually, publish, report


async def test_reports_published_while_sink_stopped_are_all_stored_once(
        db, nats_url, start_service) -> None:
    bodies = [report(i) for i in range(10_000)]
    await publish(nats_url, bodies)
    sink = start_service("error_sink")
    await eventually(lambda: _at_least(db, 10_000), timeout=60)
    await asyncio.sleep(0.5)  # nothing more may arrive
    assert await count(db) == 10_000
    assert await count(db, "SELECT count(DISTINCT id) FROM error_logs") == 10_000
    ids = {r["id"] for r in await db.fetch("SELECT id::text FROM error_logs")}
    assert ids == {b["id"] for b in bodies}
    groups = await db.fetch("SELECT count, status, title FROM error_groups")
    assert len(groups) == 1 and groups[0]["count"] == 10_000, groups
    assert groups[0]["title"] == "ChargeFailed: order <n> could not be charged" or \
        groups[0]["title"].startswith("ChargeFailed: order")
    assert sink.running


async def _at_least(db, n: int) -> bool:
    return await count(db) >= n
