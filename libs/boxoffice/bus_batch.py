"""Publishing many JetStream messages at once, each kept only once its PubAck is in.

``Bus.publish`` is a request per message (nats-py's ``js.publish``: an inbox token, a future
and a timer each, a task each when gathered). ``publish_all`` sends a whole batch with one reply
subscription of its own: message ``n`` asks for its PubAck on ``<inbox>.<n>``, the PubAcks are
counted as they come, and the call returns once every message has one; about a third of the
CPU per message (measured with 500-message batches of outbox events). The outbox relay uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import msgspec
import nats.errors
from nats.aio.msg import Msg

from boxoffice import errors, logs
from boxoffice.bus import REQUEST_ID_HEADER, Bus


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where the message is kept, or why not."""

    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


async def publish_all(bus: Bus, messages: Sequence[tuple[str, bytes, str]], *,
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
