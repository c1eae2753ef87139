"""Persists error reports from ERRORS into ``error_logs``, a report id stored once."""

from __future__ import annotations

import logging

import asyncpg
import msgspec
from nats.aio.msg import Msg

from boxoffice import wire
from boxoffice.wire.errors import ErrorReport

log = logging.getLogger("boxoffice.error_sink")


class Writer:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def __call__(self, msgs: list[Msg]) -> None:
        rows = []
        for msg in msgs:
            try:
                r = wire.decode(msg.data, ErrorReport)
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.warning("malformed error report on %s dropped", msg.subject)
                await msg.term()
                continue
            rows.append((r.id, r.occurred_at, r.service, r.level, r.message, r.error_type,
                         r.stacktrace, r.context, r.fingerprint, r.environment, r.release,
                         r.request_id, r.count))
        if rows:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    """
                    INSERT INTO error_logs (id, "timestamp", service, severity, error_message,
                        error_type, stacktrace, context, fingerprint, environment, release,
                        request_id, occurrences, function_name)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $3)
                    ON CONFLICT (id) DO NOTHING
                    """, rows)
        for msg in msgs:
            if not msg._ackd:
                await msg.ack()
