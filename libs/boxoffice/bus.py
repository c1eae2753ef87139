"""The NATS bus: one connection per process, JetStream declarations, publish, request/reply.

- ``connect()`` reconnects forever once connected; the first connection is retried with back-off,
  except when the server refuses the credentials in the URL or is not trusted (TLS): then at once
  ``ServiceUnavailable``. Replies come to the URL's user's own inbox prefix.
- Streams and durable consumers are declared idempotently at start (``declare``).
- ``publish()`` sets ``Nats-Msg-Id`` and returns only after the PubAck: only a PubAck means kept.
- ``request()`` raises typed errors: ``ServiceUnavailable`` (no responders, bus down),
  ``ServiceTimeout``, or the remote ``BoxofficeError`` rebuilt from its code.
- ``serve()`` answers a subject in a queue group; every exception becomes an error reply in
  one place (``_reply_error``); ``stop_serving()`` stops taking work and waits for in-flight work.
- Durables are consumed with ``boxoffice.consumer`` (``PullConsumer``, ``pull_consumer()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from boxoffice import background, bus_access, errors, logs, wire
from boxoffice.wire.subjects import STREAMS

log = logging.getLogger("boxoffice.bus")
T = TypeVar("T")
R = TypeVar("R")

DAY = 86400.0
STREAM_MAX_AGE = {"STRIPE_EVENTS": 30 * DAY, "ERRORS": 7 * DAY, "RESERVATIONS": 7 * DAY,
                  "PAYMENTS": 7 * DAY, "ALERTS": 7 * DAY, "AUDIT": 30 * DAY,
                  "SENTRY_ITEMS": 7 * DAY}
# Outbox-fed streams keep ids longer, so a relay that crashed between publish and commit and
# comes back within the window is still deduplicated.
DUPLICATE_WINDOW = {"STRIPE_EVENTS": 600.0, "ERRORS": 120.0, "RESERVATIONS": 3600.0,
                    "PAYMENTS": 3600.0, "ALERTS": 600.0, "AUDIT": 600.0,
                    "SENTRY_ITEMS": 120.0}
# Streams that take atomic batches (the outbox relays' events, boxoffice.bus_batch.publish_all):
# with sync_interval: always, nats-server syncs a batch to disk once, not each of its messages
ATOMIC_STREAMS = frozenset({"RESERVATIONS", "PAYMENTS"})
REQUEST_ID_HEADER = "Boxoffice-Request-Id"
NO_RESPONDER_RETRIES = (0.05, 0.1, 0.2, None)
NO_RESPONDERS_STATUS = "503"  # the server's status message: no subscription on the subject


def stream_config(name: str, replicas: int = 1) -> StreamConfig:
    """``replicas``: copies kept on as many nodes of a cluster (an acknowledged message is on a
    majority of them); streams declared again with more are scaled up by nats-server."""
    return StreamConfig(
        name=name, subjects=STREAMS[name], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, discard=DiscardPolicy.OLD, max_age=STREAM_MAX_AGE[name],
        duplicate_window=DUPLICATE_WINDOW[name], max_msg_size=8 << 20, num_replicas=replicas,
        allow_atomic=True if name in ATOMIC_STREAMS else None,
    )


async def flushed(nc: Client, timeout: int = 5) -> None:
    """Return once nats-server has processed everything ``nc`` was asked to send so far.

    nats-py's ``flush()`` is not that barrier on its own: it writes its PING straight to the
    socket, while commands such as a SUB wait in a queue for the client's flusher task, so the
    PONG can come back before the server has seen the subscription (4 tries in 200 here;
    tests/test_bus_flush.py). The queue is written out first, then the PING follows it.
    """
    await asyncio.wait_for(nc._flush_pending(force_flush=True), timeout)  # nats-py: no public call
    await nc.flush(timeout=timeout)


class Bus:
    """A connected NATS client with JetStream, shared by everything in one process."""

    def __init__(self, nc: Client, js: JetStreamContext, stream_replicas: int = 1):
        self.nc = nc
        self.js = js
        self.stream_replicas = stream_replicas
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._limit = asyncio.Semaphore(512)
        # request/reply: one reply subscription, a future per request in flight by its token
        self._reply_prefix: str | None = None
        self._replies_lock = asyncio.Lock()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # -- JetStream declarations ---------------------------------------------------------
    async def declare_streams(self, *names: str) -> None:
        for name in names or tuple(STREAMS):
            cfg = stream_config(name, self.stream_replicas)
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                # exists with another configuration: bring it to ours
                await self.js.update_stream(cfg)

    async def declare_consumer(self, stream: str, durable: str, *, filter_subject: str | None = None,
                               ack_wait: float = 30.0, max_deliver: int = -1,
                               backoff: list[float] | None = None,
                               max_ack_pending: int = 20000) -> None:
        cfg = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait,
                             max_deliver=max_deliver, backoff=backoff, filter_subject=filter_subject,
                             max_ack_pending=max_ack_pending, max_waiting=512)
        await self.js.add_consumer(stream, cfg)

    async def pull(self, stream: str, durable: str) -> JetStreamContext.PullSubscription:
        """nats-py's pull subscription on ``durable`` (for inspection; services use
        ``boxoffice.consumer.PullConsumer``)."""
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    # -- publish --------------------------------------------------------------------------
    async def publish(self, subject: str, payload: bytes, msg_id: str, *,
                      timeout: float = 5.0, headers: dict[str, str] | None = None) -> bool:
        """Publish to JetStream and wait for the PubAck; returns False if it was a duplicate.

        Raises ``ServiceUnavailable`` when the bus did not acknowledge.
        """
        hdrs = {"Nats-Msg-Id": msg_id}
        if rid := logs.REQUEST_ID.get():  # the HTTP request this message comes from
            hdrs[REQUEST_ID_HEADER] = rid
        if headers:
            hdrs.update(headers)
        try:
            ack = await self.js.publish(subject, payload, timeout=timeout, headers=hdrs)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise errors.ServiceUnavailable(f"bus did not acknowledge: {type(exc).__name__}") from exc
        return not ack.duplicate

    # -- request / reply --------------------------------------------------------------------
    async def request(self, subject: str, body: Any, reply_type: type[R], *, timeout: float = 5.0,
                      request_id: str | None = None) -> R:
        request_id = request_id or logs.REQUEST_ID.get()
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        payload = wire.encode(body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # "no responders" is retried briefly: a replica restarting or a subscription not yet
            # propagated is a gap of milliseconds, not an outage worth a 503
            pauses = iter(NO_RESPONDER_RETRIES)
            while (msg := await self._ask(subject, payload, headers,
                                          max(0.05, deadline - loop.time()))) is None:
                pause = next(pauses)  # (the last is None)
                if pause is None or loop.time() + pause >= deadline:
                    raise errors.ServiceUnavailable(f"no service answers {subject}")
                await asyncio.sleep(pause)
        except TimeoutError:
            raise errors.ServiceTimeout(f"{subject} did not answer within {timeout:g}s") from None
        except (nats.errors.Error, OSError) as exc:
            raise errors.ServiceUnavailable(f"bus unavailable: {type(exc).__name__}") from None
        reply = wire.decode(msg.data, wire.Reply)
        if not reply.ok:
            assert reply.error is not None
            raise errors.from_code(reply.error.code, reply.error.detail, reply.error.status,
                                   **reply.error.extra)
        return msgspec.json.decode(reply.data, type=reply_type)

    async def _ask(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                   timeout: float) -> Msg | None:
        """Publish one request with a reply subject of this Bus's own and wait for its reply;
        None when the server said no one answers the subject (a 503 status message). Raises
        ``TimeoutError``; a cancelled or timed-out request leaves no entry behind, and a reply
        that comes after is dropped."""
        prefix = self._reply_prefix or await self._open_replies()
        token = str(next(self._tokens))
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        timer = waiter.get_loop().call_later(timeout, _expire, waiter)
        try:
            await self.nc.publish(subject, payload, reply=prefix + token,
                                  headers=headers)
            msg = await waiter
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
            if not waiter.done():  # the publish failed, or the caller was cancelled
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # (retrieved: a timeout during a failed publish is not logged)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            return None
        return msg

    async def _open_replies(self) -> str:
        """Subscribe once to ``<inbox>.*``, ``<inbox>`` a new inbox under the user's inbox prefix
        (nats-py subscribes again after a reconnect); request ``n`` is answered on
        ``<inbox>.<n>``."""
        async with self._replies_lock:
            if self._reply_prefix is None:
                inbox = self.nc.new_inbox()
                await self.nc.subscribe(f"{inbox}.*", cb=self._on_reply)
                self._reply_prefix = f"{inbox}."
            return self._reply_prefix

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.pop(msg.subject[len(self._reply_prefix or ""):], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def serve(self, subject: str, request_type: type[T],
                    handler: Callable[[T], Awaitable[Any]], *, queue: str) -> None:
        """Answer ``subject`` in queue group ``queue``; each request runs in its own task."""

        async def on_request(msg: Msg) -> None:
            await self._limit.acquire()
            task = asyncio.create_task(self._answer(msg, request_type, handler))
            self._inflight.add(task)
            task.add_done_callback(self._done)

        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_request))
        await flushed(self.nc)  # the server knows the subscription before we say ready

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        self._limit.release()

    async def _answer(self, msg: Msg, request_type: type[T],
                      handler: Callable[[T], Awaitable[Any]]) -> None:
        adopt_request_id(msg)  # this task's logs and error reports name the HTTP request
        try:
            try:
                request = wire.decode(msg.data, request_type)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise errors.BadRequest(f"malformed request: {exc}") from None
            result = await handler(request)
            out = wire.Reply(ok=True, data=msgspec.Raw(wire.encode(result)))
        except Exception as exc:  # noqa: BLE001 - the one place errors become replies
            out = _reply_error(exc, msg.subject)
        if msg.reply:
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.respond(wire.encode(out))

    async def stop_serving(self, timeout: float = 20.0) -> None:
        """Stop taking requests, then wait for the ones in flight (their replies still go out)."""
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)


def _expire(waiter: asyncio.Future[Msg]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def adopt_request_id(msg: Msg) -> None:
    """Take the ``Boxoffice-Request-Id`` of ``msg`` as the current task's request id (logs and
    error reports written while handling it name it); call it in the task handling ``msg``."""
    rid = (msg.headers or {}).get(REQUEST_ID_HEADER, "")
    ok = 0 < len(rid) <= 64 and rid.isascii() and rid.isprintable()
    logs.REQUEST_ID.set(rid if ok else None)


def _reply_error(exc: Exception, subject: str) -> wire.Reply:
    if isinstance(exc, errors.BoxofficeError):
        if exc.status >= 500:
            log.error("request on %s failed: %s", subject, exc.detail)
        return wire.Reply(ok=False, error=wire.ErrorBody(code=exc.code, status=exc.status,
                                                          detail=exc.detail, extra=exc.extra))
    log.exception("unhandled error answering %s", subject)
    return wire.Reply(ok=False, error=wire.ErrorBody(code="internal_error", status=500,
                                                      detail="internal error"))


class _Refused(Exception):
    """The first connection cannot succeed by retrying: credentials or certificate refused."""


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """What verifies the server's certificate: the CA in ``ca_file``, or (None) the system's."""
    if ca_file is None:
        return None
    return ssl.create_default_context(cafile=ca_file)


@contextlib.asynccontextmanager
async def connect(url: str, name: str, *, ca_file: str | None = None,
                  first_connect_timeout: float = 60.0, stream_replicas: int = 1
                  ) -> AsyncIterator[Bus]:
    """Connect (retrying the first connection with back-off), yield a ``Bus``, drain on exit.

    ``url`` carries the user and password (comma-separated servers; ``tls://`` for TLS, the
    server's certificate verified against ``ca_file`` when given, else the system's CAs).
    Streams are declared with ``stream_replicas`` copies (``NATS_STREAM_REPLICAS``).
    Replies come to the user's own inbox prefix (``bus_access.inbox_prefix``). Credentials that
    the server refuses stop the first connection at once; a subject the user may not use is
    logged as an error (and so reported), naming the subject.
    """
    connected = False

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text.lower():
            if not connected:
                raise _Refused("NATS refused the connection: NATS_URL has no user, or a wrong "
                               "user or password")
            log.error("nats: the server refuses this user's credentials")
        elif isinstance(exc, ssl.SSLCertVerificationError) and not connected:
            raise _Refused("NATS's certificate is not trusted (NATS_CA_FILE names the CA that "
                           f"signed it): {exc.verify_message}")
        elif "permissions violation" in text.lower():  # the subject only: nothing secret
            log.error("nats refused: %s", text.removeprefix("nats: "))
        else:
            log.warning("nats: %s", type(exc).__name__)

    async def on_disconnected() -> None:
        log.warning("nats: disconnected")

    async def on_reconnected() -> None:
        log.info("nats: reconnected")

    user = bus_access.user_of(url)
    options: dict[str, Any] = {}
    if user is not None:
        options["inbox_prefix"] = bus_access.inbox_prefix(user)
    if (tls := tls_context(ca_file)) is not None:
        options["tls"] = tls
    nc = Client()
    try:
        # with jitter: replicas waiting for the same NATS do not come back all at once
        async for attempt in background.backoff((nats.errors.Error, OSError, asyncio.TimeoutError),
                                                most=2.0, timeout=first_connect_timeout):
            with attempt:
                nc = Client()
                try:
                    await nc.connect(
                        servers=url.split(","), name=name, max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # (stub says int)
                        connect_timeout=2, allow_reconnect=True,
                        error_cb=on_error, disconnected_cb=on_disconnected,
                        reconnected_cb=on_reconnected, drain_timeout=30, ping_interval=5,
                        max_outstanding_pings=3, **options,
                    )
                except (TimeoutError, nats.errors.Error, OSError) as exc:
                    log.warning("nats: not reachable yet (%s)", type(exc).__name__)
                    raise
    except _Refused as refused:
        # (nats-py may wait forever for a socket whose TLS handshake failed to close)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)
        raise errors.ServiceUnavailable(str(refused)) from None
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise errors.ServiceUnavailable(f"cannot reach NATS: {type(exc).__name__}") from None
    connected = True
    bus = Bus(nc, nc.jetstream(timeout=5.0), stream_replicas)
    try:
        yield bus
    finally:
        await bus.stop_serving()
        if not nc.is_closed:
            try:
                await nc.drain()
            except (TimeoutError, nats.errors.Error, OSError):
                await nc.close()
