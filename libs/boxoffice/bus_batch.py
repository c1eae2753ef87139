"""Publishing many JetStream messages at once, each kept only once its PubAck is in.

``Bus.publish`` is a request per message (nats-py's ``js.publish``: an inbox token, a future
and a timer each, a task each when gathered). ``publish_each`` sends a whole batch with one reply
subscription of its own: message ``n`` asks for its PubAck on ``<inbox>.<n>``, the PubAcks are
counted as they come, and the call returns once every message has one; about a third of the
CPU per message (measured with 500-message batches of outbox events).

``publish_all``, which the outbox relays use, sends the messages of a stream that allows it
(``bus.ATOMIC_STREAMS``), when there are at least ``ATOMIC_MIN`` of them, as JetStream atomic
batches: kept all together or not at all, with one PubAck for the batch. With
``sync_interval: always`` nats-server then syncs its files a few times per batch instead of once
per message: 500-message batches went from 3,300 to 56,000 messages a second (nats-server's CPU
from 109 to 9.5 us a message), each batch synced before its PubAck.
JetStream refuses a whole batch that holds an id it already keeps (err_code 10201: the relay
publishing again after a crash between the PubAck and its commit); such a batch, or one refused
for any other reason, is sent again with ``publish_each``, which drops the duplicates one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

import msgspec
import nats.errors
from nats.aio.msg import Msg

from boxoffice import errors, logs
from boxoffice.bus import ATOMIC_STREAMS, REQUEST_ID_HEADER, Bus
from boxoffice.bus_access import matches
from boxoffice.wire.subjects import STREAMS

ATOMIC_MAX = 1000  # messages in one atomic batch at most (nats-server's limit)
# Fewer messages of a stream than this go one by one, so that atomic batches serve a relay that
# has fallen behind (a mass expiry, a burst of webhooks) and not one that keeps up. An atomic
# batch costs nats-server about 1.3 ms of CPU whatever its size, a message one by one about 0.1
# ms with sync_interval: always (nats-server's CPU a message: batches of 8, 165 us against 120;
# of 32, 55 against 95; of 500, 10 against 97). And a relay whose passes end sooner runs more of
# them, each with fewer rows, its claim, delete and commit each time: relaying holds with two
# payment replicas, atomic batches from 32 messages on cost more per hold than none (payment 64
# us against 49, PostgreSQL 195 against 159, nats-server 96 against 87; 3,193 holds a second
# against 3,532)
ATOMIC_MIN = 200
_ATOMIC_PATTERNS = [(name, pattern) for name in sorted(ATOMIC_STREAMS) for pattern in STREAMS[name]]


def _atomic_stream(subject: str) -> str | None:
    """The stream in ``ATOMIC_STREAMS`` that keeps ``subject``, if any."""
    return next((name for name, pattern in _ATOMIC_PATTERNS if matches(pattern, subject)), None)


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where the message is kept, or why not."""

    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None
    batch: str | None = None  # an atomic batch's id, and how many messages it kept
    count: int | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


async def publish_all(bus: Bus, messages: Sequence[tuple[str, bytes, str]], *,
                      timeout: float = 5.0) -> int:
    """``publish_each``'s promise, the messages of each stream in ``ATOMIC_STREAMS`` sent as
    atomic batches when there are at least ``ATOMIC_MIN`` of them (in their order; the other
    messages with ``publish_each``). Returns how many were duplicates (none when every batch was
    new)."""
    by_stream: dict[str | None, list[tuple[str, bytes, str]]] = {}
    for message in messages:
        by_stream.setdefault(_atomic_stream(message[0]), []).append(message)
    duplicates = 0
    for stream, group in by_stream.items():
        if stream is None or len(group) < ATOMIC_MIN:
            duplicates += await publish_each(bus, group, timeout=timeout)
            continue
        for start in range(0, len(group), ATOMIC_MAX):
            chunk = group[start:start + ATOMIC_MAX]
            if not await publish_atomic(bus, chunk, timeout=timeout):
                duplicates += await publish_each(bus, chunk, timeout=timeout)
    return duplicates


async def publish_atomic(bus: Bus, messages: Sequence[tuple[str, bytes, str]], *,
                         timeout: float = 5.0) -> bool:
    """Publish ``messages`` (of one stream) as one JetStream atomic batch; True once its PubAck
    says the whole batch is kept, False when JetStream refused it, which then kept none of it (an
    id it already keeps, atomic batches not allowed, too many in flight; and an answer that is
    not a batch's, from a server that ignored the batch headers: each message then stood alone,
    unacknowledged). Raises ``ServiceUnavailable`` without an answer: the batch may be kept."""
    if not messages:
        return True
    nc = bus.nc
    batch = uuid.uuid4().hex
    headers = {"Nats-Msg-Id": "", "Nats-Batch-Id": batch, "Nats-Batch-Sequence": ""}
    if rid := logs.REQUEST_ID.get():
        headers[REQUEST_ID_HEADER] = rid
    last = len(messages)
    try:
        for n, (subject, payload, msg_id) in enumerate(messages, 1):
            headers["Nats-Msg-Id"] = msg_id  # (encoded by publish before it returns)
            headers["Nats-Batch-Sequence"] = str(n)
            if n < last:
                await nc.publish(subject, payload, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                answer = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise errors.ServiceUnavailable(
            f"bus did not acknowledge a batch of {last} messages: {type(exc).__name__}") from exc
    if answer.headers and answer.headers.get("Status"):
        return False
    try:
        ack = _decode_ack(answer.data)
    except msgspec.DecodeError:
        return False
    return ack.error is None and ack.batch == batch and ack.count == last


async def publish_each(bus: Bus, messages: Sequence[tuple[str, bytes, str]], *,
                       timeout: float = 5.0) -> int:
    """Publish each ``(subject, payload, msg_id)`` of ``messages`` to JetStream (``msg_id`` as
    ``Nats-Msg-Id``, so a message published again within the stream's duplicate window is
    dropped) and wait until every one has its PubAck; returns how many were such duplicates.

    Raises ``ServiceUnavailable`` unless every message was acknowledged within ``timeout``
    seconds: the bus away, no stream for a subject, or JetStream answered an error. Some of them
    may be kept then: publish them all again (with the same ids) to be sure of each. A refusal is
    raised once every message of the batch has its answer (or the timeout passed), not at the
    first: else the batch's later messages were still in the server's hands when the caller
    moved on, and could be stored after its next attempt's (out of their order), or after the
    cause of the refusal was mended.
    """
    if not messages:
        return 0
    nc = bus.nc
    inbox = nc.new_inbox()
    prefix = len(inbox) + 1
    missing = len(messages)
    seen = bytearray(len(messages))
    duplicates = 0
    refused: list[str] = []  # why messages were not kept, in the order their answers came
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def acked(msg: Msg) -> None:
        nonlocal missing, duplicates
        if done.done():
            return
        try:
            n = int(msg.subject[prefix:])
            if seen[n]:
                return
        except (ValueError, IndexError):
            return  # not an answer to this batch
        seen[n] = 1
        missing -= 1
        try:
            if msg.headers and msg.headers.get("Status"):  # 503: no stream for the subject
                raise ValueError(f"status {msg.headers['Status']}")
            ack = _decode_ack(msg.data)
            if ack.error is not None or ack.seq is None:
                raise ValueError(str(ack.error))
            duplicates += ack.duplicate
        except (ValueError, msgspec.DecodeError) as exc:
            refused.append(str(exc))
        if missing == 0:
            if refused:
                done.set_exception(errors.ServiceUnavailable(
                    f"bus did not keep {len(refused)} of {len(messages)} messages: {refused[0]}"))
            else:
                done.set_result(None)

    headers = {"Nats-Msg-Id": ""}
    if rid := logs.REQUEST_ID.get():  # the HTTP request these messages come from
        headers[REQUEST_ID_HEADER] = rid
    try:
        sub = await nc.subscribe(f"{inbox}.*", cb=acked)
    except (nats.errors.Error, OSError) as exc:
        raise errors.ServiceUnavailable(f"bus unavailable: {type(exc).__name__}") from exc
    try:
        for n, (subject, payload, msg_id) in enumerate(messages):
            headers["Nats-Msg-Id"] = msg_id  # (encoded by publish before it returns)
            await nc.publish(subject, payload, reply=f"{inbox}.{n}", headers=headers)
        async with asyncio.timeout(timeout):
            await done
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise errors.ServiceUnavailable(
            f"bus did not acknowledge {missing} of {len(messages)} messages: "
            f"{type(exc).__name__}" + (f" (and refused {len(refused)}: {refused[0]})"
                                       if refused else "")) from exc
    finally:
        if not done.done():
            done.cancel()
        elif not done.cancelled():
            done.exception()  # (retrieved: a failure raised before it was awaited is not logged)
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
    return duplicates
