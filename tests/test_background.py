"""The one way to run background work (``boxoffice.background``) and the one definition of the
database being away (``boxoffice.db``): stop with a grace period then cancel, a crash reported
and the work started again, a timer that outlives failures, back-off that ends on success."""

from __future__ import annotations

import asyncio
import itertools
import logging

import asyncpg
import pytest

from boxoffice import background, db, errors
from boxoffice.embedded import free_port


async def test_running_stops_work_within_its_grace() -> None:
    finished = asyncio.Event()

    async def work(stopping: asyncio.Event) -> None:
        await stopping.wait()
        await asyncio.sleep(0.05)  # the work in hand is finished after the stop
        finished.set()

    async with background.running("polite", work, grace=5) as stopping:
        assert not stopping.is_set()
    assert stopping.is_set() and finished.is_set()


async def test_running_cancels_work_that_outlives_its_grace(caplog: pytest.LogCaptureFixture) -> None:
    cancelled = asyncio.Event()

    async def stubborn(_stopping: asyncio.Event) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="boxoffice.background"):
        async with background.running("stubborn", stubborn, grace=0.2):
            await asyncio.sleep(0.01)
    assert cancelled.is_set()
    assert loop.time() - started < 5
    assert any("stubborn did not stop within 0.2s" in r.getMessage() for r in caplog.records)


async def test_running_reports_a_crash_and_starts_the_work_again(
        caplog: pytest.LogCaptureFixture) -> None:
    starts = 0
    again = asyncio.Event()

    async def fragile(stopping: asyncio.Event) -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise RuntimeError("a bug")
        again.set()
        await stopping.wait()

    with caplog.at_level(logging.ERROR, logger="boxoffice.background"):
        async with background.running("fragile", fragile, grace=5):
            await asyncio.wait_for(again.wait(), 5)
    assert starts == 2
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crashes) == 1 and crashes[0].exc_info is not None
    assert "fragile crashed" in crashes[0].getMessage()


async def test_running_sets_wake_on_exit() -> None:
    wake = asyncio.Event()

    async def waiting(stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            wake.clear()
            await background.pause(stopping, 60, wake)

    loop = asyncio.get_running_loop()
    async with background.running("sleeper", waiting, grace=5, wake=wake):
        await asyncio.sleep(0.01)
        started = loop.time()
    assert loop.time() - started < 10  # not the 60 s timer (with room for a busy machine)


async def test_pause_returns_at_once_when_stopping_or_woken() -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()
    assert await background.pause(stopping, 0.01) is False
    wake.set()
    assert await asyncio.wait_for(background.pause(stopping, 60, wake), 1) is False
    stopping.set()
    assert await asyncio.wait_for(background.pause(stopping, 60), 1) is True


async def test_repeat_outlives_outages_and_crashes(caplog: pytest.LogCaptureFixture) -> None:
    stopping = asyncio.Event()
    outcomes = [asyncpg.CannotConnectNowError("starting"), errors.ServiceUnavailable("bus away"),
                RuntimeError("a bug"), None]
    calls = 0

    async def step() -> float | None:
        nonlocal calls
        calls += 1
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        stopping.set()
        return None

    with caplog.at_level(logging.WARNING, logger="boxoffice.background"):
        await asyncio.wait_for(background.repeat("probe", step, stopping, every=0.01,
                                                 first_wait=False), 5)
    assert calls == 4
    levels = [(r.levelno, r.exc_info is not None) for r in caplog.records]
    assert levels == [(logging.WARNING, False), (logging.WARNING, False), (logging.ERROR, True)]
    assert "PostgreSQL unavailable" in caplog.records[0].getMessage()
    assert "the bus unavailable" in caplog.records[1].getMessage()


async def test_repeat_waits_what_the_step_asks() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def step() -> float:
        times.append(loop.time())
        if len(times) == 3:
            stopping.set()
        return 0.2

    await asyncio.wait_for(background.repeat("probe", step, stopping, every=60,
                                             first_wait=False), 5)
    assert len(times) == 3
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(times))


async def test_backoff_retries_until_success() -> None:
    tries = 0
    async for attempt in background.backoff(OSError, initial=0.01, most=0.02):
        with attempt:
            tries += 1
            if tries < 3:
                raise ConnectionRefusedError
    assert tries == 3
    with pytest.raises(ValueError):  # not what it waits out: raised at once
        async for attempt in background.backoff(OSError, initial=0.01, most=0.02):
            with attempt:
                raise ValueError


@pytest.mark.parametrize("exc", [asyncpg.ConnectionDoesNotExistError("gone"),
                                 asyncpg.CannotConnectNowError("starting"),
                                 asyncpg.AdminShutdownError("shutting down"),
                                 asyncpg.IdleSessionTimeoutError("idle"),
                                 ConnectionResetError(), TimeoutError()])
async def test_the_database_away_is_a_503_to_retry(exc: BaseException) -> None:
    async def work() -> None:
        raise exc

    with pytest.raises(errors.DatabaseUnavailable) as raised:
        await db.guarded(work())
    assert raised.value.status == 503 and raised.value.extra == {"retry_after": 2}
    with pytest.raises(errors.DatabaseUnavailable):
        await db.guard(lambda: work())()


async def test_a_refused_statement_is_not_the_database_away() -> None:
    async def work() -> None:
        raise asyncpg.UniqueViolationError("duplicate")

    with pytest.raises(asyncpg.UniqueViolationError):
        await db.guarded(work())


async def test_a_first_database_connection_is_retried_with_back_off_then_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="boxoffice.db"):
        started = loop.time()
        with pytest.raises(errors.DatabaseUnavailable, match="cannot reach PostgreSQL"):
            async with db.pool(f"postgresql://nobody@127.0.0.1:{port}/none",
                               first_connect_timeout=1.0):
                pass
    assert 1.0 <= loop.time() - started < 10
    said = [r.getMessage() for r in caplog.records]
    assert sum("postgres: not reachable yet (ConnectionRefusedError)" in m for m in said) >= 2


async def test_drain_runs_again_while_busy_and_keeps_a_wake_up_from_a_partial_pass() -> None:
    """drain: a pass that took a full batch is followed at once by another; a wake-up that
    arrives while a pass that took less runs (work committed just after it read) starts the next
    pass at once, not after ``every``; stopping ends it."""
    loop = asyncio.get_running_loop()
    stopping, wake = asyncio.Event(), asyncio.Event()
    results = iter([3, 3, 1, 0])  # two full passes, a partial one woken during, then empty
    passes: list[float] = []

    async def step() -> int:
        passes.append(loop.time())
        n = next(results, 0)
        if len(passes) == 3:
            wake.set()  # during the partial third pass
        if len(passes) == 4:
            stopping.set()
        return n

    # within 5 s or it fails: no pass may wait for the 60 s timer
    await asyncio.wait_for(background.drain(step, stopping, wake, every=60, batch=3), 5)
    assert len(passes) == 4


async def test_drain_runs_no_empty_pass_after_a_partial_one() -> None:
    """drain: a pass that took fewer than its batch took all that was due when it read, so it is
    not followed by another (an empty pass: three round trips for nothing) until a wake-up, after
    which a pass runs at once."""
    stopping, wake = asyncio.Event(), asyncio.Event()
    results = iter([3, 2, 1])  # a full pass, a partial one (nothing woken), then one on wake
    passes: list[int] = []
    woken = asyncio.Event()

    async def step() -> int:
        n = next(results, 0)
        passes.append(n)
        if len(passes) == 3:
            woken.set()
        return n

    task = asyncio.create_task(background.drain(step, stopping, wake, every=60, batch=3))
    try:
        for _ in range(50):  # many turns of the loop: room for a pass that should not run
            await asyncio.sleep(0.01)
        assert passes == [3, 2]
        wake.set()
        await asyncio.wait_for(woken.wait(), 5)
        assert passes == [3, 2, 1]
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)
