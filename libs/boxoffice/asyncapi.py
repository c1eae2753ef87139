"""AsyncAPI 3.0 document of the bus: the JetStream streams and the request/reply subjects, their
messages' schemas generated from the wire types (``boxoffice.wire``).

ingress serves it at ``/asyncapi.json``; ``libs/boxoffice/wire/asyncapi.json`` keeps it in the
repository (a test checks that the file is what this module generates). To refresh the file:
``python -m boxoffice.asyncapi > libs/boxoffice/wire/asyncapi.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from boxoffice import __version__ as version
from boxoffice.bus import REQUEST_ID_HEADER
from boxoffice.wire import ErrorBody, admin, audit, payments, reaper, reservations, stripe, subjects
from boxoffice.wire import admin_actions as actions
from boxoffice.wire import errors as errw
from boxoffice.wire import sentry_items as si
from boxoffice.wire.schema import components

REF = "#/components/schemas/{name}"

# stream: (address with parameters, message, who publishes, who consumes durably)
STREAM_CHANNELS: dict[str, list[tuple[str, type, str, str | None]]] = {
    "STRIPE_EVENTS": [("stripe.events.{type}", stripe.StripeEvent, "ingress (verified webhooks,"
                       " exactly as Stripe sent them)", "webhook (durable `webhook`)")],
    "ERRORS": [("errors.{service}.{level}", errw.ErrorReport,
                "every service (its own reports), ingress (spools it adopts), any other process"
                " (the `reporter` user)",
                "error-sink (durable `error-sink`)"),
               ("errors.{service}.{level}.{seal}", errw.ErrorReport,
                "ingress only: clients' reports, scrubbed there (the seal names the scrubber's"
                " rules; the error-sink does not scrub them again)",
                "error-sink (durable `error-sink`)")],
    "RESERVATIONS": [("reservations.events.{kind}", reservations.ReservationEvent,
                      "payment, webhook, reaper (outbox)", None)],
    "PAYMENTS": [("payments.events.{kind}", payments.PaymentEvent, "payment, webhook (outbox)",
                  None)],
    "ALERTS": [("alerts.{level}", errw.Alert, "error-sink", None)],
    si.STREAM: [(si.subject(si.FEEDBACK), si.Feedback, "ingress (Sentry envelopes)",
                 "error-sink (durable `error-sink`)"),
                (si.subject(si.ATTACHMENT), si.Attachment, "ingress (Sentry envelopes)",
                 "error-sink (durable `error-sink`)"),
                (si.subject(si.DISCARDS), si.Discards, "ingress (Sentry envelopes)",
                 "error-sink (durable `error-sink`)"),
                (si.subject(si.CHECK_IN), si.CheckIn, "ingress (Sentry envelopes)",
                 "error-sink (durable `error-sink`)"),
                (si.subject(si.SESSIONS), si.Sessions, "ingress (Sentry envelopes)",
                 "error-sink (durable `error-sink`)")],
    "AUDIT": [(actions.BEGUN, actions.Begun, "ingress, before an operator's action", "reaper"),
              (actions.FINISHED, actions.Finished, "ingress, after an operator's action",
               "reaper")],
}
PARAMETERS = {
    "type": "the Stripe event type (payment_intent.succeeded, ...)",
    "service": "the reporting service", "level": "debug|info|warning|error|critical|fatal",
    "seal": "scrubbed-<digest of the scrubber's rules>: only ingress may publish it",
    "kind": "held|expired|completed|cancelled (reservations); "
            "created|succeeded|failed|refunded (payments)",
}

# subject: (request, answer's data, owner)
REQUESTS: dict[str, tuple[type, type, str]] = {
    subjects.RESERVATIONS_HOLD: (reservations.HoldRequest, payments.StoredResponse, "payment"),
    subjects.RESERVATIONS_GET: (reservations.GetRequest, reservations.Reservation, "payment"),
    subjects.RESERVATIONS_CANCEL: (reservations.CancelRequest, reservations.Reservation,
                                   "payment"),
    subjects.PAYMENTS_INTENTS_CREATE: (payments.CreateIntentRequest, payments.StoredResponse,
                                       "payment"),
    admin.EVENTS_CREATE: (admin.CreateEvent, admin.TicketedEvent, "payment"),
    admin.EVENTS_GET: (admin.GetEvent, admin.TicketedEvent, "payment"),
    admin.EVENTS_LIST: (admin.ListEvents, admin.TicketedEvents, "payment"),
    payments.ADMIN_PAYMENTS_LIST: (payments.ListPayments, payments.PaymentLog, "payment"),
    reaper.STATS: (reaper.StatsRequest, reaper.ReservationStats, "reaper"),
    reaper.CLEANUP: (reaper.CleanupRequest, reaper.CleanupResult, "reaper"),
    reaper.RUNS: (reaper.RunsRequest, reaper.ReaperRuns, "reaper"),
    reaper.EXPIRY_LAG: (reaper.ExpiryLagRequest, reaper.ExpiryLag, "reaper"),
    actions.LIST: (actions.ListRequest, actions.Actions, "reaper"),
    audit.INVARIANTS: (audit.InvariantsRequest, audit.Invariants, "reaper"),
    audit.RUN_REAPER: (audit.RunRequest, audit.Invariants, "reaper"),
    audit.RUN_WEBHOOK: (audit.RunRequest, audit.Invariants, "webhook"),
    errw.GROUPS_LIST: (errw.ListGroups, errw.GroupList, "error-sink"),
    errw.GROUPS_GET: (errw.GetGroup, errw.GroupDetail, "error-sink"),
    errw.GROUPS_RESOLVE: (errw.SetGroupStatus, errw.ErrorGroup, "error-sink"),
    errw.GROUPS_IGNORE: (errw.SetGroupStatus, errw.ErrorGroup, "error-sink"),
    si.FEEDBACK_LIST: (si.ListFeedback, si.FeedbackList, "error-sink"),
    si.ATTACHMENT_GET: (si.GetAttachment, si.AttachmentData, "error-sink"),
    si.DROPPED: (si.ListDropped, si.DroppedList, "error-sink"),
    si.SOURCE_MAP_UPLOAD: (si.SourceMapUpload, si.SourceMapInfo, "error-sink"),
    si.MONITORS: (si.ListMonitors, si.MonitorList, "error-sink"),
    si.MONITOR_SET: (si.SetMonitor, si.Monitor, "error-sink"),
    si.RELEASES: (si.ListReleases, si.ReleaseList, "error-sink"),
    stripe.EVENTS_LIST: (stripe.ListEventsRequest, stripe.LoggedEvents, "webhook"),
    stripe.EVENTS_REPLAY: (stripe.ReplayRequest, stripe.ReplayResult, "webhook"),
    stripe.EVENTS_GET: (stripe.GetEventRequest, stripe.LoggedEventDetail, "webhook"),
    stripe.RECONCILIATION: (stripe.ReconciliationRequest, stripe.Reconciliation, "webhook"),
}


def _id(address: str) -> str:
    return address.replace(".{", "_").replace("}", "").replace(".", "_")


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every stream and request subject."""
    types: list[type] = [ErrorBody]
    for chans in STREAM_CHANNELS.values():
        types += [t for _, t, _, _ in chans if t not in types]
    for req, ans, _ in REQUESTS.values():
        types += [t for t in (req, ans) if t not in types]
    refs, named = components(types, REF)
    ref = dict(zip(types, refs))
    headers = {"type": "object", "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "JetStream's deduplication id"},
        REQUEST_ID_HEADER: {"type": "string",
                            "description": "the HTTP request id that caused the message"}}}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}

    def message(name: str, payload: dict[str, Any], title: str) -> dict[str, Any]:
        messages[name] = {"name": name, "title": title, "contentType": "application/json",
                          "headers": headers, "payload": payload}
        return {"$ref": f"#/components/messages/{name}"}

    for stream, chans in STREAM_CHANNELS.items():
        for address, type_, publisher, consumer in chans:
            cid = _id(address)
            params = {p: {"description": PARAMETERS[p]} for p in PARAMETERS
                      if "{" + p + "}" in address}
            channels[cid] = {
                "address": address, "title": f"{stream}: {address}",
                "description": f"On the JetStream stream `{stream}` (subjects "
                               f"{', '.join(subjects.STREAMS[stream])}); `Nats-Msg-Id` is set "
                               "on every publish.",
                "messages": {type_.__name__: message(type_.__name__, ref[type_],
                                                     type_.__name__)},
                **({"parameters": params} if params else {})}
            msg = [{"$ref": f"#/channels/{cid}/messages/{type_.__name__}"}]
            operations[f"publish_{cid}"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"published by {publisher}", "messages": msg}
            if consumer:
                operations[f"consume_{cid}"] = {
                    "action": "receive", "channel": {"$ref": f"#/channels/{cid}"},
                    "summary": f"consumed by {consumer}", "messages": msg}

    channels["reply"] = {"address": None, "title": "the requester's reply inbox",
                         "description": "Every answer is a Reply: `ok` with `data`, or an "
                                        "`error` (code, status, detail).", "messages": {}}
    for subject, (req, ans, owner) in REQUESTS.items():
        cid = _id(subject)
        reply_name = f"Reply_{ans.__name__}"
        channels[cid] = {"address": subject,
                         "description": f"core NATS request/reply, queue group `{owner}`",
                         "messages": {req.__name__: message(req.__name__, ref[req],
                                                            req.__name__)}}
        if reply_name not in channels["reply"]["messages"]:
            channels["reply"]["messages"][reply_name] = message(reply_name, {
                "type": "object", "required": ["ok"],
                "properties": {"ok": {"type": "boolean"}, "data": ref[ans],
                               "error": ref[ErrorBody]}}, f"answer: {ans.__name__}")
        operations[f"answer_{cid}"] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"answered by {owner}",
            "messages": [{"$ref": f"#/channels/{cid}/messages/{req.__name__}"}],
            "reply": {"address": {"location": "$message.header#/reply_to",
                                  "description": "the NATS reply subject"},
                      "channel": {"$ref": "#/channels/reply"},
                      "messages": [{"$ref": f"#/channels/reply/messages/{reply_name}"}]}}
    return {"asyncapi": "3.0.0",
            "info": {"title": "boxoffice bus", "version": version,
                     "description": "NATS JetStream streams and request/reply subjects between "
                                    "boxoffice's services; every body is JSON."},
            "defaultContentType": "application/json",
            "channels": channels, "operations": operations,
            "components": {"schemas": named, "messages": messages}}


def dumps() -> str:
    """The document as kept in the repository."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dumps())
