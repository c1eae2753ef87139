"""Bus handlers of the payment service: decode, call the domain, encode (thin)."""

from __future__ import annotations

import asyncpg

from boxoffice.bus import Bus
from boxoffice.payment import events
from boxoffice.wire import admin


async def register(bus: Bus, pool: asyncpg.Pool) -> None:
    queue = "payment"

    async def create_event(req: admin.CreateEvent) -> admin.TicketedEvent:
        return await events.create_event(pool, req)

    async def get_event(req: admin.GetEvent) -> admin.TicketedEvent:
        return await events.get_event(pool, req.event_id)

    await bus.serve(admin.EVENTS_CREATE, admin.CreateEvent, create_event, queue=queue)
    await bus.serve(admin.EVENTS_GET, admin.GetEvent, get_event, queue=queue)
