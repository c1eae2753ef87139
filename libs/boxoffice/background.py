"""Background work: the one way a service runs a loop beside its handlers, and stops it.

- ``running(name, *works, grace=...)`` starts each ``work(stopping)`` as a task; on exit it
  sets ``stopping`` (and ``wake``, so that a loop waiting for work notices at once), waits up to
  ``grace`` seconds for the work in hand to finish, then cancels. A work that crashes is logged
  with its stack (so reported) and started again after a pause; one that returns is done.
- ``repeat(name, step, stopping, every=...)`` runs ``step`` on a timer until stopped: the
  database (or the bus) away is a warning, anything else a logged crash; neither ends the loop.
- ``pause(stopping, seconds)`` waits for a timer, a stop, or a wake-up.
- ``drain(step, stopping, wake, every=..., batch=...)`` runs a worker that takes what is due (a
  relay, a queue of actions): again at once while a pass took a full batch, else on ``wake`` or
  every ``every`` seconds.
- ``backoff(on)`` retries a step with exponential back-off and jitter (stamina) until it
  succeeds, so that replicas waiting out the same outage do not all come back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import stamina

from boxoffice import db, errors

log = logging.getLogger("boxoffice.background")

Work = Callable[[asyncio.Event], Awaitable[object]]
RESTART_AFTER = 1.0  # seconds between a crash of a work and its next start
CANCEL_WAIT = 5.0  # seconds to wait for a cancelled work to unwind
# An outage to wait out, not a bug: the database away or refusing, or the bus away
OUTAGES: tuple[type[BaseException], ...] = (*db.FAILURES, errors.ServiceUnavailable)


async def pause(stopping: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Wait ``seconds``, less if ``stopping`` (or ``wake``) is set first; True once stopping."""
    if stopping.is_set() or seconds <= 0:
        return stopping.is_set()
    waits = {asyncio.ensure_future(stopping.wait())}
    if wake is not None:
        waits.add(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return stopping.is_set()


def backoff(on: type[Exception] | tuple[type[Exception], ...], *,
            initial: float = 0.1, most: float = 5.0,
            timeout: float | None = None) -> AsyncIterator[stamina.Attempt]:
    """Attempts of one step, retried on ``on`` without end (or until ``timeout`` seconds), waiting
    ``initial`` seconds doubled each time up to ``most``, with jitter; use as
    ``async for attempt in backoff(...): with attempt: ...``. Log a failure in the block."""
    return stamina.retry_context(on=on, attempts=None, timeout=timeout, wait_initial=initial,
                                 wait_max=most, wait_jitter=min(1.0, most / 2))


async def repeat(name: str, step: Callable[[], Awaitable[float | None]], stopping: asyncio.Event,
                 *, every: float, first_wait: bool = True,
                 logger: logging.Logger = log) -> None:
    """Run ``step`` every ``every`` seconds until ``stopping`` (the first after a wait when
    ``first_wait``); a step may return how long to wait before the next instead."""
    wait = every if first_wait else 0.0
    while not await pause(stopping, wait):
        try:
            then = await step()
        except OUTAGES as exc:
            logger.warning("%s: not run, %s unavailable; next try in %gs (%s)", name,
                           "the bus" if isinstance(exc, errors.ServiceUnavailable) else "PostgreSQL",
                           every, type(exc).__name__)
            then = None
        except Exception:  # a background loop outlives any one run
            logger.exception("%s: run crashed", name)
            then = None
        wait = every if then is None else then


async def drain(step: Callable[[], Awaitable[int]], stopping: asyncio.Event,
                wake: asyncio.Event, *, every: float, batch: int) -> None:
    """Run ``step`` until ``stopping``: again at once while it took a full ``batch`` (more may be
    waiting), else when ``wake`` is set or after ``every`` seconds.

    ``step`` returns how many it took, at most ``batch`` (its own limit). Fewer than ``batch``
    means it took everything that was due when it read, so no pass follows at once (an empty
    pass is three database round trips for nothing). ``wake`` is cleared before each pass
    reads, never after: a writer that commits just after a pass read, and wakes it while that
    pass still runs, has its wake-up kept, so the next pass runs at once instead of at the next
    ``every`` (cleared after the pass, that wake-up would be lost)."""
    while not stopping.is_set():
        wake.clear()
        if await step() >= batch:
            continue
        await pause(stopping, every, wake)


async def _keep(name: str, work: Work, stopping: asyncio.Event) -> None:
    while True:  # started once even if stopped at once: its own stop path runs
        try:
            await work(stopping)
            return
        except Exception:  # reported, then the work starts again
            log.exception("%s crashed; starting it again", name)
        if await pause(stopping, RESTART_AFTER):
            return


@contextlib.asynccontextmanager
async def running(name: str, *works: Work, grace: float, wake: asyncio.Event | None = None,
                  stopping: asyncio.Event | None = None) -> AsyncIterator[asyncio.Event]:
    """Run each of ``works`` with the stop event (yielded; ``stopping`` if given) until exit; then
    stop them, allowing ``grace`` seconds to finish what they hold before they are cancelled."""
    stopping = asyncio.Event() if stopping is None else stopping
    tasks = [asyncio.create_task(_keep(name, work, stopping), name=f"{name}-{i}")
             for i, work in enumerate(works)]
    try:
        yield stopping
    finally:
        stopping.set()
        if wake is not None:
            wake.set()
        _, late = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        if late:
            log.warning("%s did not stop within %gs: cancelled", name, grace)
            for task in late:
                task.cancel()
            await asyncio.wait(late, timeout=CANCEL_WAIT)
