"""The one way to consume a JetStream durable: ``PullConsumer`` fetches batches (or single
messages) and hands them over, the handler settles them (``settle``), outages are waited out with
back-off; ``pull_consumer()`` runs lanes of it in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from boxoffice import background
from boxoffice.bus import Bus

log = logging.getLogger(__name__)

IDLE_GAP = 0.02  # a partly filled batch is handed over after this long without a new message
PULL_WAIT = 1.0  # seconds a pull request waits on the server for a first message


async def settle(msg: Msg, how: Literal["ack", "nak", "term"], delay: float | None = None) -> None:
    """``ack``, ``nak`` (after ``delay`` seconds) or ``term`` ``msg``; the bus may be gone, and
    then JetStream redelivers it, which is harmless."""
    with contextlib.suppress(nats.errors.Error, OSError):
        if how == "ack":
            await msg.ack()
        elif how == "nak":
            await msg.nak(delay=delay)
        else:
            await msg.term()


async def ack_all(bus: Bus, msgs: list[Msg]) -> None:
    """Ack ``msgs`` (each on its own: JetStream's ack-all policy would also ack what other lanes
    hold unsettled) in one write to the bus. Acking each with ``msg.ack()`` is one publish
    apiece, each validating its subject, formatting its command and queueing it for the flusher:
    about 6% of the error-sink's CPU. The ack subjects come from the server. The bus may be
    gone, and then JetStream redelivers the messages, which is harmless."""
    cmds = b"".join(b"PUB %s 4\r\n+ACK\r\n" % m.reply.encode() for m in msgs if m.reply)
    if not cmds:
        return
    nc = bus.nc
    with contextlib.suppress(nats.errors.Error, OSError):
        if nc.is_closed:
            return
        if not nc.is_connected:  # publish's rules: buffered while reconnecting, if there is room
            for msg in msgs:
                if msg.reply:
                    await nc.publish(msg.reply, b"+ACK")
            return
        # nats-py (pinned) has no public call for several commands in one write; these two are
        # what its publish does after formatting one (tests/test_bus_consumer.py checks the acks
        # reach the server).
        await nc._send_command(cmds)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


class PullConsumer:
    """One lane of a durable JetStream pull consumer, run until stopped: fetch a batch, hand it
    to ``handle``, back off while the bus or the database is away.

    A batch comes through one inbox subscription of the lane's own (nats-py's ``fetch`` waits
    for each message with a timer of its own, which caps a consumer at a few tens of thousands
    of messages a second): the lane sends a pull request, waits for the first message and takes
    the rest as they come, handing over a partly filled batch after ``IDLE_GAP`` without a new
    one. Messages of a request that arrive after that wait for the next fetch; at stop they are
    nak'ed, so they are redelivered at once instead of after ``ack_wait``.

    ``handle`` gets each batch (``batched``) or each message in turn, and settles (``settle``)
    what it processed. When it raises, the lane backs off (the database or the bus away is a
    warning, anything else is logged with its stack) and what it was given is put back: nak'ed
    after ``nak_delay`` seconds, or, when None, left for JetStream to redeliver after
    ``ack_wait``.
    """

    def __init__(self, bus: Bus, stream: str, durable: str,
                 handle: Callable[[list[Msg]], Awaitable[None]] | Callable[[Msg], Awaitable[None]],
                 *, batch: int = 256, batched: bool = True, nak_delay: float | None = None,
                 wait: float = PULL_WAIT):
        self.bus = bus
        self.durable = durable
        self.handle = handle
        self.batch = batch
        self.batched = batched
        self.nak_delay = nak_delay
        self.wait = wait
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._sub: Subscription | None = None
        self._inbox = ""
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def _subscription(self) -> Subscription:
        if self._sub is None:
            self._inbox = self.bus.nc.new_inbox()
            # No callback: the lane takes messages straight from the subscription's own queue,
            # where nats-py puts them. With a callback, each message went through a task of
            # nats-py's (a queue get, a coroutine for the callback) into a queue of ours, a
            # few percent of the error-sink's CPU. nats-py (pinned) has no public way to take
            # them without a task per message; ``_got`` keeps its count of pending bytes and
            # marks them done, as its own readers do.
            self._sub = await self.bus.nc.subscribe(self._inbox, pending_msgs_limit=200_000,
                                                    pending_bytes_limit=512 << 20)
            self._queue = self._sub._pending_queue
        return self._sub

    def _got(self, msg: Msg) -> Msg:
        if self._sub is not None:
            self._sub._pending_size -= len(msg.data)
            self._queue.task_done()  # (a drain of the connection waits for every message)
        return msg

    async def fetch(self, batch: int | None = None, wait: float | None = None) -> list[Msg]:
        """Up to ``batch`` messages; an empty list when none came within ``wait`` seconds.

        Raises ``nats.errors.Error`` / ``OSError`` when the bus is unreachable.
        """
        batch = self.batch if batch is None else batch
        wait = self.wait if wait is None else wait
        await self._subscription()
        out: list[Msg] = []
        self._take(out, batch)
        if len(out) >= batch:
            return out
        request = {"batch": batch - len(out), "expires": int(wait * 1e9)}
        await self.bus.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self._inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + 0.5
        while len(out) < batch:
            timeout = IDLE_GAP if out else deadline - loop.time()
            if timeout <= 0:
                break
            try:
                async with asyncio.timeout(timeout):  # (wait_for may swallow a cancellation)
                    msg = self._got(await self._queue.get())
            except TimeoutError:
                break
            status = msg.headers.get("Status") if msg.headers else None
            if status is None:
                out.append(msg)
                self._take(out, batch)
                continue
            if status in ("404", "408"):  # no messages / request expired
                break
            if status in ("409", "503"):  # e.g. max waiting exceeded, consumer gone, no JetStream
                log.warning("consumer %s: pull answered %s %s", self.durable, status,
                            (msg.headers or {}).get("Description", ""))
                await asyncio.sleep(0.5)
                break
            # 100 heartbeats and anything else: keep waiting
        return out

    def _take(self, out: list[Msg], batch: int) -> None:
        queue = self._queue
        while len(out) < batch and not queue.empty():
            msg = self._got(queue.get_nowait())
            if not (msg.headers and "Status" in msg.headers):
                out.append(msg)

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and handle until ``stopping``; the batch in hand is finished first."""
        try:
            while not stopping.is_set():
                async for attempt in background.backoff(Exception, initial=0.2, most=5.0):
                    with attempt:
                        if stopping.is_set():
                            break
                        await self._round()
        finally:
            await self.close()

    async def _round(self) -> None:
        try:
            msgs = await self.fetch()
        except (nats.errors.Error, OSError) as exc:
            log.warning("consumer %s: bus unavailable (%s)", self.durable, type(exc).__name__)
            raise
        except Exception:  # never let one batch kill the consumer
            log.exception("consumer %s: fetch failed", self.durable)
            raise
        if not msgs:
            return
        try:
            if self.batched:
                await self.handle(msgs)  # type: ignore[arg-type]
            else:
                for msg in msgs:
                    await self.handle(msg)  # type: ignore[arg-type]
        except Exception as exc:  # keep listening whatever happens
            if isinstance(exc, background.OUTAGES):
                log.warning("consumer %s: %d messages not handled (%s), put back", self.durable,
                            len(msgs), type(exc).__name__)
            else:
                log.exception("consumer %s: %d messages not handled, put back", self.durable,
                              len(msgs))
            if self.nak_delay is not None:
                for msg in msgs:
                    await settle(msg, "nak", self.nak_delay)
            raise

    async def close(self) -> None:
        """Nak what was delivered but not handed over, then unsubscribe."""
        if self._sub is None:
            return
        left: list[Msg] = []
        self._take(left, 1 << 30)
        for msg in left:
            await settle(msg, "nak")
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._sub.unsubscribe()
        self._sub = None


@contextlib.asynccontextmanager
async def pull_consumer(bus: Bus, stream: str, durable: str,
                        handle: Callable[[list[Msg]], Awaitable[None]] | Callable[[Msg], Awaitable[None]],
                        *, lanes: int = 1, grace: float = 30.0, **kw: Any
                        ) -> AsyncIterator[list[PullConsumer]]:
    """Run ``lanes`` lanes of ``PullConsumer(bus, stream, durable, handle, **kw)`` in the
    background; on exit each finishes the batch in hand, then naks what it fetched beyond."""
    consumers = [PullConsumer(bus, stream, durable, handle, **kw) for _ in range(lanes)]
    async with background.running(f"consumer {durable}", *(c.run for c in consumers),
                                  grace=grace):
        yield consumers
