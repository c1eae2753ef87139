"""The log of operators' actions (``admin_actions``), kept from the ``AUDIT`` stream.

Each message is stored once (the action id is the primary key; a begun and a finished message
each fill their own columns, whatever order they are applied in), then acked: a crash before
the commit redelivers, which changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import msgspec
from nats.aio.msg import Msg

from boxoffice import bus as busmod
from boxoffice import wire
from boxoffice.consumer import pull_consumer, settle
from boxoffice.wire import admin_actions as w
from boxoffice.wire.subjects import ADMIN_ACTIONS_CONSUMER

log = logging.getLogger("boxoffice.reaper.admin_actions")

UPSERT_BEGUN = """
INSERT INTO admin_actions (id, at, actor, action, target, request_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at, actor = EXCLUDED.actor,
    action = EXCLUDED.action, target = EXCLUDED.target, request_id = EXCLUDED.request_id
"""
UPSERT_FINISHED = """
INSERT INTO admin_actions (id, status, finished_at) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at
"""


async def store(pool: asyncpg.Pool, msgs: list[Msg]) -> None:
    """Store a batch in one transaction, then ack it; a message that is not ours is dropped."""
    begun: list[tuple] = []
    finished: list[tuple] = []
    keep: list[Msg] = []
    for msg in msgs:
        try:
            if msg.subject == w.BEGUN:
                b = wire.decode(msg.data, w.Begun)
                begun.append((b.id, b.at, b.actor, b.action, b.target, b.request_id))
            elif msg.subject == w.FINISHED:
                f = wire.decode(msg.data, w.Finished)
                finished.append((f.id, f.status, f.at))
            keep.append(msg)
        except (msgspec.ValidationError, msgspec.DecodeError):
            log.error("message on %s is not an action record: dropped", msg.subject)
            await settle(msg, "term")
    # PostgreSQL away: raised, and the batch, unacked, is redelivered after ack_wait
    async with pool.acquire() as conn, conn.transaction():
        if begun:
            await conn.executemany(UPSERT_BEGUN, begun)
        if finished:
            await conn.executemany(UPSERT_FINISHED, finished)
    for msg in keep:
        await settle(msg, "ack")


@contextlib.asynccontextmanager
async def keeping(bus: busmod.Bus, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Consume the AUDIT stream into ``admin_actions`` while the service runs."""
    stream, durable = ADMIN_ACTIONS_CONSUMER
    await bus.declare_streams(stream)
    await bus.declare_consumer(stream, durable, ack_wait=30)

    async def handle(msgs: list[Msg]) -> None:
        await store(pool, msgs)

    async with pull_consumer(bus, stream, durable, handle, batch=100):
        yield


async def recent(pool: asyncpg.Pool, req: w.ListRequest) -> w.Actions:
    rows = await pool.fetch(
        "SELECT id::text AS id, at, actor, action, target, request_id, status, finished_at "
        "FROM admin_actions WHERE at IS NOT NULL AND ($1::text IS NULL OR actor = $1) "
        "ORDER BY at DESC, id LIMIT $2", req.actor, req.limit)
    return w.Actions(actions=[w.Action(**{**dict(r), "id": r["id"].replace("-", "")})
                              for r in rows])
