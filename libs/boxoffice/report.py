"""Error reporting from every process to the bus.

- ``report(level, message, ...)`` files one report; ``logging`` records at ERROR and above reach
  the bus the same way (``BusHandler`` on the root logger), with their ``extra={...}`` as context.
- Hooks catch what nothing else caught: the event loop's exception handler (background tasks
  whose exception nobody retrieved), ``sys.excepthook`` (a crash, reported as ``fatal``) and
  ``threading.excepthook``; ``watch(task)`` reports a background task's failure at once.
  HTTP and bus handlers log their unhandled exceptions, which the handler picks up.
- Every report is first appended to a local spool file (``boxoffice.spool``), then published
  from there to ``errors.<service>.<level>`` with its ``id`` as ``Nats-Msg-Id``; it leaves the
  spool only once the PubAck is in. So a report survives the process being killed right after
  the log call, and waits out a bus that is away; what a process leaves behind is sent by
  whichever process on the same bus adopts its files (its successor or another replica; ingress,
  which may publish every service's reports, adopts any service's). A report may thus be
  published twice; its id makes the second a no-op (JetStream's duplicate window, then the
  error-sink's primary key).
- A burst of the same error is folded: the first is sent at once, the repeats within
  ``fold_window`` seconds become one report whose ``count`` says how many.
- Reporting never blocks and never raises into its caller.
- With ``SENTRY_DSN`` set and ``BOXOFFICE_ENV=production``, sentry-sdk is initialised too
  (traces sampled at 10%), and its events are scrubbed by ``boxoffice.scrub`` before leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import prometheus_client

from boxoffice import bus_access, errors, logs, scrub
from boxoffice.spool import Spool
from boxoffice.wire.errors import LEVELS, ErrorReport
from boxoffice.wire.subjects import error_report

log = logging.getLogger("boxoffice.report")

SENT = prometheus_client.Counter("boxoffice_error_reports_sent_total",
                                 "Error reports acknowledged by the bus")
SPOOLED = prometheus_client.Counter("boxoffice_error_reports_spooled_total",
                                    "Error reports written to the local spool (all, before sending)")
FOLDED = prometheus_client.Counter("boxoffice_error_reports_folded_total",
                                   "Repeats folded into a later report's count")
DROPPED = prometheus_client.Counter("boxoffice_error_reports_dropped_total",
                                    "Error reports lost because the spool was full")

_LEVEL_OF = {logging.CRITICAL: "critical", logging.ERROR: "error", logging.WARNING: "warning",
             logging.INFO: "info", logging.DEBUG: "debug"}
_enc = msgspec.json.Encoder()
_local = threading.local()


class _Head(msgspec.Struct):
    id: str
    service: str
    level: str


_head = msgspec.json.Decoder(_Head)


MAX_REPORT_BYTES = 256 << 10  # well under NATS's default max_payload (1 MiB)
ADOPT_SECONDS = 2.0  # how often a connected reporter looks for files of processes that are gone


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub.truncate(value, 8192)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > 6:
        return repr(value)[:200]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in list(value)[:100]]
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)[:1000]


def _may_report_for(service: str, other: str) -> bool:
    """Whether ``service``'s NATS user may publish ``other``'s reports (ingress may: it relays
    clients' reports), so that it may send what a gone instance of ``other`` left behind."""
    return service in bus_access.ACCESS and bus_access.may_publish(service,
                                                                   error_report(other, "fatal"))


def type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class _Fold:
    until: float
    count: int = 0
    last: ErrorReport | None = None


class Reporter:
    """The process's reporter: queue, spool, folding and the task that publishes."""

    def __init__(self, service: str, *, bus_url: str, environment: str | None = None,
                 release: str | None = None, spool_dir: str | None = None,
                 fold_window: float = 2.0, max_folds: int = 5000, spool_max_bytes: int = 64 << 20):
        self.service = service
        self.environment = environment
        self.release = release
        self.fold_window = fold_window
        self.max_folds = max_folds
        self.spool = Spool(spool_dir, service, bus_url, max_bytes=spool_max_bytes,
                           also_adopts=functools.partial(_may_report_for, service))
        self._folds: dict[tuple[Any, ...], _Fold] = {}
        self._lock = threading.RLock()
        self._bus: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dropped_told = 0
        self._failing = False
        self._last_failure = ""

    # -- filing --------------------------------------------------------------------------
    def report(self, level: str, message: str, *, error_type: str | None = None,
               context: dict[str, Any] | None = None, fingerprint: list[str] | None = None,
               exc: BaseException | None = None, request_id: str | None = None,
               fold: bool = True) -> str | None:
        """File one report; returns its id, or None when folded into a later one (or failed)."""
        if getattr(_local, "busy", False):  # an error while reporting is not reported again
            return None
        _local.busy = True
        try:
            r = self._build(level, message, error_type, context, fingerprint, exc,
                            request_id or logs.REQUEST_ID.get())
            if len(_enc.encode(r)) > MAX_REPORT_BYTES:  # too big for the bus: keep the gist
                r = msgspec.structs.replace(
                    r, context={"_truncated": "context too large for an error report"},
                    stacktrace=scrub.truncate(r.stacktrace, 65536) if r.stacktrace else None)
            if fold and not self._fold(r):
                return None
            self._enqueue(r)
            return r.id
        except Exception:  # noqa: BLE001 - reporting never raises into its caller
            return None
        finally:
            _local.busy = False

    def _build(self, level: str, message: str, error_type: str | None,
               context: dict[str, Any] | None, fingerprint: list[str] | None,
               exc: BaseException | None, request_id: str | None) -> ErrorReport:
        stacktrace = None
        if exc is not None:
            error_type = error_type or type_name(exc)
            stacktrace = "".join(traceback.format_exception(exc))
        return ErrorReport(
            id=str(uuid.uuid4()), occurred_at=datetime.now(UTC), service=self.service,
            level=level if level in LEVELS else "error",  # type: ignore[arg-type]
            # scrubbed here, not only in the sink: reports wait on the bus and in the spool
            message=scrub.truncate(scrub.text(str(message)), 8192),
            error_type=scrub.truncate(error_type, 512) if error_type else None,
            stacktrace=scrub.truncate(scrub.text(stacktrace), 131072) if stacktrace else None,
            context=scrub.value(_jsonable(context)) if context else None,
            fingerprint=[scrub.truncate(str(f), 512) for f in fingerprint[:32]] if fingerprint else None,
            environment=self.environment, release=self.release,
            request_id=str(request_id)[:128] if request_id else None)

    def _fold(self, r: ErrorReport) -> bool:
        """True when ``r`` goes out now; False when it was counted into a pending fold."""
        ctx = r.context or {}
        key = (r.level, r.error_type, r.message, tuple(r.fingerprint or ()),
               ctx.get("logger"), ctx.get("function"))
        now = time.monotonic()
        with self._lock:
            f = self._folds.get(key)
            if f is not None and now < f.until:
                f.count += r.count
                f.last = r
                FOLDED.inc()
                return False
            if f is not None or len(self._folds) < self.max_folds:
                self._folds[key] = _Fold(until=now + self.fold_window)
        return True

    def _release_folds(self, everything: bool = False) -> None:
        now = time.monotonic()
        out = []
        with self._lock:
            for key, f in list(self._folds.items()):
                if not everything and now < f.until:
                    continue
                if f.count and f.last is not None:
                    out.append(msgspec.structs.replace(f.last, id=str(uuid.uuid4()), count=f.count))
                    self._folds[key] = _Fold(until=now + self.fold_window)
                else:
                    del self._folds[key]
        for r in out:
            self._enqueue(r)

    def _enqueue(self, r: ErrorReport) -> None:
        line = _enc.encode(r)
        with self._lock:
            kept = self.spool.write(line)  # before anything else can lose it
        (SPOOLED if kept else DROPPED).inc()
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- the bus -----------------------------------------------------------------------------
    def attach(self, bus: Any) -> None:
        """Send through ``bus`` (a ``boxoffice.bus.Bus``) from now on; None detaches."""
        with self._lock:
            self._bus = bus
        self._poke()

    async def start(self) -> None:
        """Start publishing from the running loop, and report what the loop could not."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = False
        self._loop.set_exception_handler(self._loop_exception)
        self._task = asyncio.create_task(self._run(), name="error-reporter")

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        delay = 0.25
        adopt_at = 0.0
        while not self._closing:
            try:
                async with asyncio.timeout(delay):  # (wait_for may swallow a cancellation)
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self._release_folds()
            bus = self._bus
            if bus is None or not bus.connected:
                continue
            if self._loop.time() >= adopt_at:  # only while we can send what we take
                adopt_at = self._loop.time() + ADOPT_SECONDS
                with self._lock:
                    self.spool.adopt()
            ok = await self._send(bus)
            if ok == self._failing:  # said once per outage, on stderr only (never reported)
                self._failing = not ok
                if ok:
                    log.info("error reports: the bus acknowledges again")
                else:
                    log.warning("error reports wait in the spool: %s", self._last_failure)
            delay = 0.25 if ok else min(delay * 2, 5.0)
            if ok and self.spool.dropped > self._dropped_told:
                lost = self.spool.dropped - self._dropped_told
                self._dropped_told = self.spool.dropped
                self.report("warning", f"{lost} error reports were dropped: the local spool was full",
                            fold=False)

    async def _publish(self, bus: Any, line: bytes) -> bool:
        try:
            head = _head.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return True  # a torn line (its writer died mid-write): nothing to send
        try:
            await bus.publish(error_report(head.service, head.level), line, head.id)
        except errors.BoxofficeError as exc:
            self._last_failure = exc.detail
            return False
        SENT.inc()
        return True

    async def _send(self, bus: Any) -> bool:
        """Publish what the spool holds, oldest first; False when the bus failed us."""
        while True:
            with self._lock:
                chunk = self.spool.unsent()
            if chunk is None:
                return True
            f, offset, lines = chunk
            # stopped or failed mid-way: the lines stay in the spool (ids make a resend harmless)
            results = await asyncio.gather(*(self._publish(bus, line) for line in lines))
            if not all(results):
                return False
            with self._lock:
                self.spool.acked(f, offset)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Send what is pending (folds included) within ``timeout``; True when nothing is left."""
        self._release_folds(everything=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            with self._lock:
                idle = not self.spool.pending()
            if idle:
                return True
            if self._bus is None or not self._bus.connected:
                break
            self._poke()
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        """Stop publishing; what was not sent stays in the spool for whoever adopts it."""
        self._release_folds(everything=True)
        self._closing = True
        if self._task is not None:
            self._poke()
            done, _ = await asyncio.wait({self._task}, timeout=2)
            if not done:  # stuck in a publish: stop it
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=2)
            self._task = None
        with self._lock:
            self._bus = None
            self.spool.close()
        self._loop = self._wake = None

    # -- hooks ---------------------------------------------------------------------------
    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        what = context.get("task") or context.get("future") or context.get("handle")
        message = context.get("message") or "unhandled error in the event loop"
        extra = {"asyncio": str(message)[:500], "logger": "asyncio"}
        if what is not None and hasattr(what, "get_name"):
            extra["task"] = what.get_name()
        self.report("error", f"{message}: {exc!r}" if exc else message, exc=exc, context=extra)
        # still on stderr, marked so that the handler does not report it twice
        logging.getLogger("asyncio").error("%s", message, exc_info=exc,
                                           extra={"_boxoffice_reported": True})

    def watch(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Report ``task``'s exception as soon as it ends with one (cancellation is not one)."""
        def done(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                self.report("error", f"background task {t.get_name()} failed: {exc!r}", exc=exc,
                            context={"task": t.get_name(), "logger": "boxoffice.tasks"})
        task.add_done_callback(done)
        return task


class BusHandler(logging.Handler):
    """Sends ERROR and above to the reporter, with the record's ``extra`` as context."""

    def __init__(self, reporter: Reporter, level: int = logging.ERROR):
        super().__init__(level)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("boxoffice.report") or getattr(record, "_boxoffice_reported", False):
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string still gets reported
            message = str(record.msg)
        context: dict[str, Any] = logs.extra_fields(record)
        context.update(logger=record.name, function=f"{record.module}.{record.funcName}",
                       line=record.lineno)
        exc = record.exc_info[1] if record.exc_info else None
        self.reporter.report(_LEVEL_OF.get(record.levelno, "error"), message, exc=exc,
                             context=context, request_id=context.pop("request_id", None))


# -- the process's reporter ----------------------------------------------------------------
_current: Reporter | None = None


def current() -> Reporter | None:
    return _current


def report(level: str, message: str, *, error_type: str | None = None,
           context: dict[str, Any] | None = None, fingerprint: list[str] | None = None,
           exc: BaseException | None = None) -> str | None:
    """File an error report from anywhere in the process; never blocks, never raises.

    Before ``install()`` (scripts, tests) the report is only logged.
    """
    if _current is None:
        log.log(logging.ERROR if level in LEVELS[LEVELS.index("error"):] else logging.WARNING,
                "%s", message, exc_info=exc)
        return None
    return _current.report(level, message, error_type=error_type, context=context,
                           fingerprint=fingerprint, exc=exc)


def install(cfg: Any) -> Reporter:
    """Create the process's reporter from a ``Config``: root logging handler, crash hooks,
    sentry-sdk when configured. Call once, after logging is set up."""
    global _current
    reporter = Reporter(cfg.service, bus_url=cfg.nats_url, environment=cfg.env,
                        release=cfg.release, spool_dir=getattr(cfg, "error_spool_dir", None))
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, BusHandler)]:
        root.removeHandler(h)
    root.addHandler(BusHandler(reporter))
    previous: Callable[..., Any] = sys.excepthook

    def excepthook(tp: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not issubclass(tp, KeyboardInterrupt):
            # in the spool at once: the next start (or another process) sends it
            reporter.report("fatal", f"{cfg.service} crashed: {exc!r}", exc=exc, fold=False)
        previous(tp, exc, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and not issubclass(args.exc_type, SystemExit):
            name = args.thread.name if args.thread else "?"
            reporter.report("error", f"thread {name} failed: {args.exc_value!r}",
                            exc=args.exc_value, context={"thread": name})
        threading.__excepthook__(args)

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    _current = reporter
    from boxoffice import sentry
    sentry.init(cfg)
    return reporter
