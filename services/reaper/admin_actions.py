"""The log of operators' actions (``admin_actions``), kept for ingress (see wire.admin_actions)."""

from __future__ import annotations

import asyncpg

from boxoffice.wire import admin_actions as wire


async def begin(pool: asyncpg.Pool, req: wire.Begin) -> wire.Begun:
    """Record an action about to be carried out; committed before the action runs."""
    action_id = await pool.fetchval(
        "INSERT INTO admin_actions (actor, action, target, request_id) VALUES ($1, $2, $3, $4) "
        "RETURNING id", req.actor, req.action, req.target, req.request_id)
    return wire.Begun(id=action_id)


async def finish(pool: asyncpg.Pool, req: wire.Finish) -> wire.Finished:
    """Record an action's outcome (once: the first outcome recorded stays)."""
    await pool.execute("UPDATE admin_actions SET status = $2, finished_at = clock_timestamp() "
                       "WHERE id = $1 AND status IS NULL", req.id, req.status)
    return wire.Finished(id=req.id)


async def recent(pool: asyncpg.Pool, req: wire.ListRequest) -> wire.Actions:
    rows = await pool.fetch(
        "SELECT id, at, actor, action, target, request_id, status, finished_at "
        "FROM admin_actions WHERE ($1::text IS NULL OR actor = $1) ORDER BY id DESC LIMIT $2",
        req.actor, req.limit)
    return wire.Actions(actions=[wire.Action(**dict(r)) for r in rows])
