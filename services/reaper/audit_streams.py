"""What the audit reads of JetStream: how far a durable consumer got, how old the first message
it has not dealt with is, and the message ids of a range of a stream.

A consumer's ``ack_floor`` is the sequence up to which every message was acknowledged; its
``delivered`` the last one handed out. Both come from the server's own bookkeeping, so the audit
compares what a consumer claims to have done with what its database holds without asking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg

from boxoffice.bus import Bus

PULL = 5000  # messages asked for at once
AUDIT = "AUDIT"  # the name of the audit's own (non-durable) consumer


class StreamUnavailable(Exception):
    """JetStream did not answer: the check cannot run now (not a violation)."""


@dataclass(frozen=True)
class Progress:
    first_seq: int      # the oldest message the stream still has
    last_seq: int
    ack_floor: int      # every message up to here was acknowledged by the consumer
    delivered: int      # the last message handed to the consumer
    pending: int        # not yet delivered
    ack_pending: int    # delivered, not yet acknowledged
    consumer: bool      # False: the consumer does not exist (yet)


async def progress(bus: Bus, stream: str, durable: str) -> Progress | None:
    """The stream's range and the consumer's progress; None when the stream does not exist."""
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise StreamUnavailable(f"{stream}: {type(exc).__name__} {exc}") from None
    state = info.state
    try:
        ci = await bus.js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        floor = state.first_seq - 1 if state.messages else state.last_seq
        return Progress(state.first_seq, state.last_seq, floor, floor, state.messages, 0, False)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise StreamUnavailable(f"{stream}/{durable}: {type(exc).__name__}") from None
    return Progress(state.first_seq, state.last_seq, ci.ack_floor.stream_seq if ci.ack_floor else 0,
                    ci.delivered.stream_seq if ci.delivered else 0, ci.num_pending or 0,
                    ci.num_ack_pending or 0, True)


async def message(bus: Bus, stream: str, seq: int, *, at_or_after: bool = False
                  ) -> RawStreamMsg | None:
    """The message at ``seq`` (or the first one after it); None if there is none."""
    try:
        if at_or_after:
            return await bus.js.get_msg(stream, seq=max(seq, 1), subject=">", next=True)
        return await bus.js.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise StreamUnavailable(f"{stream} message {seq}: {type(exc).__name__}") from None


def age(msg: RawStreamMsg) -> float:
    when = msg.time or datetime.now(UTC)
    return (datetime.now(UTC) - when).total_seconds()


@dataclass(frozen=True)
class Header:
    seq: int
    msg_id: str | None
    stored_at: datetime


async def headers(bus: Bus, stream: str, after: int, upto: int) -> list[Header]:
    """``Nats-Msg-Id`` and time of every message with ``after < seq <= upto``, headers only
    (the bodies never cross the wire), through a consumer of the audit's own: named ``AUDIT``
    (so that the bus permissions can name it), acknowledging nothing, deleted after the read
    (and by the server after ``inactive_threshold`` if the reader died). One run of a check at a
    time (its lock), so one such consumer per stream at a time. The messages are pulled in
    batches onto an inbox of our own and taken as they come (nats-py's ``fetch`` waits for each
    message with a timer of its own, several times slower over a whole stream)."""
    after = max(after, 0)
    if upto <= after:
        return []
    out: list[Header] = []
    arrived: asyncio.Queue[Msg] = asyncio.Queue()

    async def take(msg: Msg) -> None:
        arrived.put_nowait(msg)

    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bus.js.delete_consumer(stream, AUDIT)  # a reader that died left it
        await bus.js.add_consumer(stream, ConsumerConfig(
            name=AUDIT, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1,
            ack_policy=AckPolicy.NONE, headers_only=True, inactive_threshold=30.0,
            max_waiting=1))
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox, cb=take, pending_msgs_limit=4 * PULL)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise StreamUnavailable(f"{stream}: {type(exc).__name__} {exc}") from None
    try:
        while True:
            await bus.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{AUDIT}",
                                 json.dumps({"batch": PULL, "expires": 2_000_000_000}).encode(),
                                 reply=inbox)
            for _ in range(PULL):
                try:
                    async with asyncio.timeout(5.0):
                        m = await arrived.get()
                except TimeoutError:
                    return out  # the server stopped answering: what came is what there is
                if m.headers and "Status" in m.headers:  # 404 none left, 408 expired, 409 ...
                    if m.headers["Status"] == "100":
                        continue
                    return out
                meta = m.metadata
                if meta.sequence.stream > upto:
                    return out
                out.append(Header(meta.sequence.stream, m.headers.get("Nats-Msg-Id")
                                  if m.headers else None, meta.timestamp))
                if meta.sequence.stream == upto:
                    return out
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise StreamUnavailable(f"{stream}: {type(exc).__name__} {exc}") from None
    finally:
        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
            await sub.unsubscribe()
            await bus.js.delete_consumer(stream, AUDIT)
