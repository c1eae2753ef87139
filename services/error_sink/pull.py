"""Batches from a durable JetStream pull consumer, fetched without a timer per message.

nats-py's ``fetch`` waits for each message with its own ``wait_for`` task, which caps a consumer
at a few tens of thousands of messages a second before any work is done. Here one inbox
subscription per lane receives the batch; we wait for the first message and take the rest
from the subscription's queue as it fills. Messages of a pull request that arrive after we
stopped waiting stay in the queue for the next fetch; at stop they are nak'ed, so they are
redelivered at once instead of after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from boxoffice.bus import Bus

log = logging.getLogger("boxoffice.error_sink.pull")

IDLE_GAP = 0.02  # a partly filled batch is handed over after this long without a new message


class Puller:
    def __init__(self, bus: Bus, stream: str, durable: str):
        self.bus = bus
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.durable = durable
        self._sub: Subscription | None = None
        self._inbox = ""

    async def _subscription(self) -> Subscription:
        if self._sub is None:
            self._inbox = self.bus.nc.new_inbox()
            self._sub = await self.bus.nc.subscribe(self._inbox, pending_msgs_limit=200_000,
                                                    pending_bytes_limit=512 << 20)
        return self._sub

    async def fetch(self, batch: int, wait: float = 1.0) -> list[Msg]:
        """Up to ``batch`` messages; an empty list when none came within ``wait`` seconds.

        Raises ``nats.errors.Error`` / ``OSError`` when the bus is unreachable.
        """
        sub = await self._subscription()
        queue: asyncio.Queue[Msg] = sub._pending_queue
        out: list[Msg] = []
        self._take(queue, out, batch)
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
                    msg = await queue.get()
            except TimeoutError:
                break
            status = msg.headers.get("Status") if msg.headers else None
            if status is None:
                out.append(msg)
                self._take(queue, out, batch)
                continue
            if status in ("404", "408"):  # no messages / request expired
                if out:
                    break
                return out
            if status in ("409", "503"):  # e.g. max waiting exceeded, consumer gone, no JetStream
                log.warning("consumer %s: pull answered %s %s", self.durable, status,
                            msg.headers.get("Description", ""))
                await asyncio.sleep(0.5)
                break
            # 100 heartbeats and anything else: keep waiting
        return out

    @staticmethod
    def _take(queue: asyncio.Queue[Msg], out: list[Msg], batch: int) -> None:
        while len(out) < batch and not queue.empty():
            msg = queue.get_nowait()
            if not (msg.headers and "Status" in msg.headers):
                out.append(msg)

    async def close(self) -> None:
        """Nak what was delivered but not handed over, then unsubscribe."""
        if self._sub is None:
            return
        left: list[Msg] = []
        self._take(self._sub._pending_queue, left, 1 << 30)
        with contextlib.suppress(nats.errors.Error, OSError):
            for msg in left:
                await self.bus.nc.publish(msg.reply, b"-NAK")
            await self._sub.unsubscribe()
        self._sub = None
