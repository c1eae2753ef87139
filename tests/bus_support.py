"""Helpers of the NATS permission tests (no tests here): a connection as one user that keeps
what nats-server refused it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from boxoffice import bus_access
from boxoffice.embedded import NatsServer


@dataclass
class Conn:
    """A raw NATS connection as ``user``, with nats-server's refusals in ``refused``."""

    user: str
    nc: Client
    js: JetStreamContext
    refused: list[str] = field(default_factory=list)

    def _refused(self, subject: str) -> str | None:
        # nats-server answers a refused publish or subscription with a permissions violation
        # naming the subject, asynchronously (nats-py lowercases the message)
        for text in self.refused:
            if "permissions violation" in text.lower() and f'"{subject.lower()}"' in text.lower():
                return text
        return None

    async def refusal(self, subject: str, timeout: float = 3.0) -> str:
        """nats-server's refusal naming ``subject``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (text := self._refused(subject)) is not None:
                return text
            await asyncio.sleep(0.01)
        raise AssertionError(f"nats-server did not refuse {subject!r} to {self.user}; "
                             f"it refused: {self.refused}")

    async def may_publish(self, subject: str) -> bool:
        """Publish to JetStream: True once acknowledged, False once nats-server refused the
        subject (so never stored it); neither within 3 s fails."""
        ack = asyncio.ensure_future(self.js.publish(subject, b"{}", timeout=3))
        while not ack.done():
            if self._refused(subject) is not None:
                ack.cancel()
                with contextlib.suppress(asyncio.CancelledError, nats.errors.TimeoutError):
                    await ack
                return False
            await asyncio.sleep(0.01)
        ack.result()
        return True


@contextlib.asynccontextmanager
async def connected(server: NatsServer, user: str) -> AsyncIterator[Conn]:
    """Connected as ``user`` with its password, replies on its own inbox prefix."""
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    nc = await nats.connect(server.url_for(user), inbox_prefix=bus_access.inbox_prefix(user),
                            error_cb=on_error, allow_reconnect=False, connect_timeout=2)
    try:
        yield Conn(user, nc, nc.jetstream(timeout=2), refused)
    finally:
        await nc.close()


async def connection_refused(url: str) -> str:
    """How nats-server answers a connection with ``url``'s credentials (it must refuse)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = Client()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=on_error)
    except nats.errors.Error as exc:
        return str(exc)
    finally:
        await nc.close()  # (nats-py leaves a refused connection's socket open otherwise)
    raise AssertionError(f"connected without the right credentials ({errors})")
