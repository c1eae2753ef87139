"""Bus handlers of the payment service: decode, call the domain, encode (thin)."""

from __future__ import annotations

import asyncpg

from boxoffice import db
from boxoffice.bus import Bus
from boxoffice.payment import intents, reservations, ticketed_events
from boxoffice.payment.hold_batch import HoldBatcher
from boxoffice.wire import admin, subjects
from boxoffice.wire import payments as pw
from boxoffice.wire import reservations as rw


async def register(bus: Bus, pool: asyncpg.Pool, deps: intents.Deps, *,
                   reservation_ttl_seconds: int) -> None:
    queue = "payment"
    holds = HoldBatcher(pool, reservation_ttl_seconds, wake=deps.relay_wake)

    async def create_event(req: admin.CreateEvent) -> admin.TicketedEvent:
        return await ticketed_events.create(pool, req)

    async def get_event(req: admin.GetEvent) -> admin.TicketedEvent:
        return await ticketed_events.get(pool, req.event_id)

    async def list_events(req: admin.ListEvents) -> admin.TicketedEvents:
        return admin.TicketedEvents(events=await ticketed_events.newest(pool, req.limit))

    async def hold(req: rw.HoldRequest) -> pw.StoredResponse:
        return await holds.hold(req)

    async def get_reservation(req: rw.GetRequest) -> rw.Reservation:
        return await reservations.get(pool, req.client_id, req.reservation_id)

    async def cancel_reservation(req: rw.CancelRequest) -> rw.Reservation:
        return await reservations.cancel(pool, req.client_id, req.reservation_id,
                                         deps.relay_wake)

    async def create_intent(req: pw.CreateIntentRequest) -> pw.StoredResponse:
        return await intents.create_intent(deps, req)

    async def list_payments(req: pw.ListPayments) -> pw.PaymentLog:
        return await intents.list_payments(pool, req)

    await bus.serve(admin.EVENTS_CREATE, admin.CreateEvent, db.guard(create_event), queue=queue)
    await bus.serve(admin.EVENTS_GET, admin.GetEvent, db.guard(get_event), queue=queue)
    await bus.serve(admin.EVENTS_LIST, admin.ListEvents, db.guard(list_events), queue=queue)
    await bus.serve(subjects.RESERVATIONS_HOLD, rw.HoldRequest, db.guard(hold), queue=queue)
    await bus.serve(subjects.RESERVATIONS_GET, rw.GetRequest, db.guard(get_reservation),
                    queue=queue)
    await bus.serve(subjects.RESERVATIONS_CANCEL, rw.CancelRequest,
                    db.guard(cancel_reservation), queue=queue)
    await bus.serve(subjects.PAYMENTS_INTENTS_CREATE, pw.CreateIntentRequest,
                    db.guard(create_intent), queue=queue)
    await bus.serve(pw.ADMIN_PAYMENTS_LIST, pw.ListPayments, db.guard(list_payments),
                    queue=queue)
