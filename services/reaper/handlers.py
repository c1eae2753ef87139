"""Bus handlers of the reaper (``admin.reaper.*``, ``admin.actions.*``): decode, call the domain,
encode (thin)."""

from __future__ import annotations

import asyncpg

from boxoffice import db
from boxoffice.bus import Bus
from boxoffice.reaper import admin_actions, expiry, runs
from boxoffice.wire import admin_actions as actions_wire
from boxoffice.wire import reaper as wire

QUEUE = "reaper"


async def register(bus: Bus, pool: asyncpg.Pool, batch: int) -> None:
    async def stats(_: wire.StatsRequest) -> wire.ReservationStats:
        return await db.guarded(expiry.stats(pool))

    async def cleanup(req: wire.CleanupRequest) -> wire.CleanupResult:
        expired, run_id = await db.guarded(expiry.expire_now(pool, batch, req.event_id))
        return wire.CleanupResult(expired=expired, run_id=run_id)

    async def recent(req: wire.RunsRequest) -> wire.ReaperRuns:
        return wire.ReaperRuns(runs=await db.guarded(runs.recent(pool, req)))

    async def expiry_lag(req: wire.ExpiryLagRequest) -> wire.ExpiryLag:
        return await db.guarded(runs.expiry_lag(pool, req.minutes))

    await bus.serve(wire.STATS, wire.StatsRequest, stats, queue=QUEUE)
    await bus.serve(wire.EXPIRY_LAG, wire.ExpiryLagRequest, expiry_lag, queue=QUEUE)
    await bus.serve(wire.CLEANUP, wire.CleanupRequest, cleanup, queue=QUEUE)
    await bus.serve(wire.RUNS, wire.RunsRequest, recent, queue=QUEUE)

    # the operators' action log, kept from the AUDIT stream (admin_actions.py)
    async def list_actions(req: actions_wire.ListRequest) -> actions_wire.Actions:
        return await db.guarded(admin_actions.recent(pool, req))

    await bus.serve(actions_wire.LIST, actions_wire.ListRequest, list_actions, queue=QUEUE)


