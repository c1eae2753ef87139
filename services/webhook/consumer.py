"""Keeps every Stripe event from STRIPE_EVENTS in ``webhook_events_log``, once per event id.

A row is written and the message acked only after the transaction commits, so a crash before
the commit redelivers the event and a duplicate delivery finds the row and changes nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import asyncpg
import msgspec
from nats.aio.msg import Msg

from boxoffice import wire
from boxoffice.wire.stripe import StripeEvent

log = logging.getLogger("boxoffice.webhook")

MAX_DELIVER = 10


class Handler:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def __call__(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                event = wire.decode(msg.data, StripeEvent)
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.error("undecodable message on %s dropped", msg.subject)
                await msg.term()
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    """
                    INSERT INTO webhook_events_log (event_id, event_type, event_created, payload)
                    VALUES ($1, $2, $3, $4::jsonb)
                    ON CONFLICT (event_id) DO NOTHING
                    """, event.id, event.type,
                    datetime.fromtimestamp(event.created, timezone.utc), msg.data.decode())
            await msg.ack()
