"""What Sentry SDKs send besides errors: kept from ``SENTRY_ITEMS`` and answered to operators.

- ``error_feedback``: users' feedback, linked to its error by the event id (and through it to
  the error's group);
- ``error_attachments``: files sent with an error (bytea; ingress bounds their size);
- ``monitors``, ``monitor_checkins``: cron check-ins (``monitors``);
- ``release_sessions``, ``release_session_buckets``: sessions, for release health (``releases``);
- ``error_discards``: the SDKs' client reports and what ingress itself dropped, also counted in
  ``boxoffice_sentry_discarded_total{origin,reason,category}``.

A batch is stored in one transaction (each row by its id, so a redelivery is stored once) and
acked after the commit. Queries: ``admin.errors.feedback``, ``admin.errors.attachment``,
``admin.errors.dropped``, and the feedback and attachments of a group (``group_extras``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import prometheus_client
from nats.aio.msg import Msg

from boxoffice import bus as busmod
from boxoffice import db, errors, wire
from boxoffice.consumer import pull_consumer, settle
from boxoffice.error_sink import monitors, releases, source_maps
from boxoffice.wire import sentry_items as si

log = logging.getLogger("boxoffice.error_sink.items")

DISCARDED = prometheus_client.Counter(
    "boxoffice_sentry_discarded_total",
    "Items Sentry SDKs (origin client) or ingress (origin server) dropped, by reason and category",
    ["origin", "reason", "category"])
ITEMS = prometheus_client.Counter("boxoffice_sentry_items_stored_total",
                                  "Feedback and attachments stored", ["kind"])

INSERT_FEEDBACK = """
INSERT INTO error_feedback (id, occurred_at, service, project_id, event_id, source, name, email,
                            message, url, environment, release)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING
"""
INSERT_ATTACHMENT = """
INSERT INTO error_attachments (id, event_id, service, project_id, filename, content_type,
                               attachment_type, size, data)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING
"""
INSERT_DISCARDS = """
INSERT INTO error_discards (report_id, service, project_id, origin, reason, category, quantity)
SELECT $1, $2, $3, $4, t.reason, t.category, sum(t.quantity)
FROM unnest($5::text[], $6::text[], $7::bigint[]) AS t(reason, category, quantity)
GROUP BY t.reason, t.category
ON CONFLICT DO NOTHING RETURNING reason, category, quantity
"""
FEEDBACK_COLUMNS = """f.id::text, f.received_at, f.service, f.source, f.message,
    f.event_id::text, e.group_id::text, f.name, f.email, f.url, f.environment, f.release"""
ATTACHMENT_COLUMNS = "a.id::text, a.event_id::text, a.filename, a.content_type, a.size, a.received_at"

AttachmentNotFound = errors.define("AttachmentNotFound", "attachment_not_found", 404,
                                   "No such attachment")


async def _store_one(conn: asyncpg.Connection, msg: Msg) -> list[tuple[str, str, str, int]]:
    kind = msg.subject.rsplit(".", 1)[-1]
    if kind == si.FEEDBACK:
        f = wire.decode(msg.data, si.Feedback)
        await conn.execute(INSERT_FEEDBACK, uuid.UUID(f.id), f.occurred_at, f.service,
                           f.project_id, uuid.UUID(f.event_id) if f.event_id else None, f.source,
                           f.name, f.email, f.message, f.url, f.environment, f.release)
        ITEMS.labels("feedback").inc()
    elif kind == si.ATTACHMENT:
        a = wire.decode(msg.data, si.Attachment)
        await conn.execute(INSERT_ATTACHMENT, uuid.UUID(a.id),
                           uuid.UUID(a.event_id) if a.event_id else None, a.service,
                           a.project_id, a.filename, a.content_type, a.attachment_type,
                           len(a.data), a.data)
        ITEMS.labels("attachment").inc()
    elif kind == si.DISCARDS:
        d = wire.decode(msg.data, si.Discards)
        rows = await conn.fetch(INSERT_DISCARDS, uuid.UUID(d.id), d.service, d.project_id, d.origin,
                                [x.reason for x in d.discarded], [x.category for x in d.discarded],
                                [x.quantity for x in d.discarded])
        return [(d.origin, r["reason"], r["category"], r["quantity"]) for r in rows]
    elif kind == si.CHECK_IN:
        await monitors.store(conn, wire.decode(msg.data, si.CheckIn))
    elif kind == si.SESSIONS:
        ss = wire.decode(msg.data, si.Sessions)
        await releases.store(conn, ss.id, ss)
    else:
        raise msgspec.ValidationError(f"unknown item kind {kind}")
    return []


async def store(pool: asyncpg.Pool, msgs: list[Msg]) -> None:
    """Store a batch in one transaction, then ack it; a message that does not decode is kept
    out (terminated) with an error log, never retried forever."""
    counted: list[tuple[str, str, str, int]] = []
    done: list[Msg] = []
    # PostgreSQL away: raised, and the batch, unacked, is redelivered after ack_wait
    async with pool.acquire() as conn, conn.transaction():
        for msg in msgs:
            try:
                async with conn.transaction():  # a savepoint: one bad item spoils nothing
                    counted += await _store_one(conn, msg)
                done.append(msg)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError,
                    asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                log.error("message on %s is not a valid Sentry item: dropped", msg.subject)
                await settle(msg, "term")
    for origin, reason, category, n in counted:
        DISCARDED.labels(origin, reason, category).inc(n)
    for msg in done:
        await settle(msg, "ack")


@contextlib.asynccontextmanager
async def keeping(bus: busmod.Bus, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Consume SENTRY_ITEMS into the tables above while the service runs."""
    stream, durable = si.CONSUMER
    await bus.declare_streams(stream)
    await bus.declare_consumer(stream, durable, ack_wait=30)

    async def handle(msgs: list[Msg]) -> None:
        await store(pool, msgs)

    async with pull_consumer(bus, stream, durable, handle, batch=50):
        yield


def _feedback(r: asyncpg.Record) -> si.FeedbackItem:
    return si.FeedbackItem(**dict(r))


def _attachment(r: asyncpg.Record) -> si.AttachmentInfo:
    return si.AttachmentInfo(**dict(r))


async def group_extras(conn: asyncpg.Connection, group_id: uuid.UUID
                       ) -> tuple[list[si.FeedbackItem], list[si.AttachmentInfo]]:
    """The feedback about a group's errors and the files sent with them (newest first)."""
    fb = await conn.fetch(
        f"SELECT {FEEDBACK_COLUMNS} FROM error_feedback f JOIN error_logs e ON e.id = f.event_id "
        "WHERE e.group_id = $1 ORDER BY f.received_at DESC LIMIT 200", group_id)
    att = await conn.fetch(
        f"SELECT {ATTACHMENT_COLUMNS} FROM error_attachments a JOIN error_logs e ON e.id = a.event_id "
        "WHERE e.group_id = $1 ORDER BY a.received_at DESC LIMIT 200", group_id)
    return [_feedback(r) for r in fb], [_attachment(r) for r in att]


async def list_feedback(pool: asyncpg.Pool, q: si.ListFeedback) -> si.FeedbackList:
    rows = await pool.fetch(
        f"SELECT {FEEDBACK_COLUMNS} FROM error_feedback f LEFT JOIN error_logs e ON e.id = f.event_id "
        "WHERE ($1::text IS NULL OR f.service = $1) AND ($2::timestamptz IS NULL OR f.received_at >= $2) "
        "ORDER BY f.received_at DESC LIMIT $3", q.service, q.since, q.limit)
    return si.FeedbackList(feedback=[_feedback(r) for r in rows])


async def get_attachment(pool: asyncpg.Pool, q: si.GetAttachment) -> si.AttachmentData:
    row = await pool.fetchrow(f"SELECT {ATTACHMENT_COLUMNS}, a.data FROM error_attachments a "
                              "WHERE a.id = $1", uuid.UUID(q.id))
    if row is None:
        raise AttachmentNotFound(f"no attachment {q.id}")
    info = dict(row)
    data = info.pop("data")
    return si.AttachmentData(info=si.AttachmentInfo(**info), data=bytes(data))


async def dropped(pool: asyncpg.Pool, q: si.ListDropped) -> si.DroppedList:
    since = q.since or datetime.now(UTC) - timedelta(days=1)
    rows = await pool.fetch(
        "SELECT service, origin, reason, category, sum(quantity)::bigint AS quantity "
        "FROM error_discards WHERE received_at >= $1 AND ($2::text IS NULL OR service = $2) "
        "GROUP BY service, origin, reason, category ORDER BY quantity DESC, service, reason, category "
        "LIMIT 1000", since, q.service)
    return si.DroppedList(since=since, dropped=[si.DroppedCount(**dict(r)) for r in rows])


async def register(bus: busmod.Bus, pool: asyncpg.Pool) -> None:
    queue = "error-sink"

    def guarded(fn):
        async def call(q):
            return await db.guarded(fn(pool, q))
        return call

    await bus.serve(si.FEEDBACK_LIST, si.ListFeedback, guarded(list_feedback), queue=queue)
    await bus.serve(si.ATTACHMENT_GET, si.GetAttachment, guarded(get_attachment), queue=queue)
    await bus.serve(si.DROPPED, si.ListDropped, guarded(dropped), queue=queue)
    await bus.serve(si.SOURCE_MAP_UPLOAD, si.SourceMapUpload, guarded(source_maps.upload),
                    queue=queue)
    await bus.serve(si.MONITORS, si.ListMonitors, guarded(monitors.listing), queue=queue)
    await bus.serve(si.MONITOR_SET, si.SetMonitor, guarded(monitors.set_monitor), queue=queue)
    await bus.serve(si.RELEASES, si.ListReleases, guarded(releases.listing), queue=queue)
