"""Operator requests on ``admin.webhooks.*``: list logged events, replay one, reconciliation
(thin handlers)."""

from __future__ import annotations

import msgspec

from boxoffice import db, errors, scrub
from boxoffice.bus import Bus
from boxoffice.webhook import reconcile_runs, stripe_event_log
from boxoffice.webhook.stripe_events import Processor
from boxoffice.wire import stripe as w

WebhookEventNotFound = errors.WebhookEventNotFound
AlreadyProcessed = errors.define("WebhookEventAlreadyProcessed", "webhook_event_already_processed",
                                 409, "The event's effects are already applied")
QUEUE = "webhook"


async def replay(processor: Processor, event_id: str) -> w.ReplayResult:
    """Apply a logged event now, from its stored payload (for events that failed or wait)."""
    found = await stripe_event_log.get(processor.pool, event_id)
    if found is None:
        raise WebhookEventNotFound(f"no webhook event {event_id!r}")
    row, payload = found
    if row.processing_status in stripe_event_log.DONE:
        raise AlreadyProcessed(f"event {event_id} is {row.processing_status}: nothing to replay")
    try:
        event = msgspec.json.decode(payload, type=w.StripeEvent)
        outcome = (await processor.process(event, payload)).name
    except db.UNAVAILABLE:
        raise
    except Exception as exc:  # noqa: BLE001 - the failure is recorded on the event and returned
        if not isinstance(exc, msgspec.ValidationError | msgspec.DecodeError):
            await processor.fail(event, payload, exc)
        outcome = "failed"
    found = await stripe_event_log.get(processor.pool, event_id)
    assert found is not None
    return w.ReplayResult(outcome=outcome, event=found[0])


async def detail(processor: Processor, event_id: str) -> w.LoggedEventDetail:
    """A logged event with its payload as operators may see it: secrets filtered, long strings
    and lists cut."""
    found = await stripe_event_log.get(processor.pool, event_id)
    if found is None:
        raise WebhookEventNotFound(f"no webhook event {event_id!r}")
    row, payload = found
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        body = payload
    return w.LoggedEventDetail(event=row, payload=scrub.clean(body, 4096, 200))


async def register(bus: Bus, processor: Processor) -> None:
    async def list_events(req: w.ListEventsRequest) -> w.LoggedEvents:
        events = await db.guarded(stripe_event_log.list_events(processor.pool, req.status,
                                                               req.type, req.limit))
        return w.LoggedEvents(events=events)

    async def replay_event(req: w.ReplayRequest) -> w.ReplayResult:
        return await db.guarded(replay(processor, req.event_id))

    async def get_event(req: w.GetEventRequest) -> w.LoggedEventDetail:
        return await db.guarded(detail(processor, req.event_id))

    async def reconciliation(req: w.ReconciliationRequest) -> w.Reconciliation:
        return await db.guarded(reconcile_runs.report(processor.pool, req.limit))

    await bus.serve(w.EVENTS_LIST, w.ListEventsRequest, list_events, queue=QUEUE)
    await bus.serve(w.EVENTS_REPLAY, w.ReplayRequest, replay_event, queue=QUEUE)
    await bus.serve(w.EVENTS_GET, w.GetEventRequest, get_event, queue=QUEUE)
    await bus.serve(w.RECONCILIATION, w.ReconciliationRequest, reconciliation, queue=QUEUE)
