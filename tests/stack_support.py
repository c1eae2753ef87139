"""Helpers of the tests of `boxoffice up`: start the whole stack as one process, stop it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def start_stack(home: Path, port: int, **extra: str) -> tuple[subprocess.Popen, list[str]]:
    """`boxoffice up` in ``home`` with ingress on ``port``, once ingress listens; with the lines
    it printed so far."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "DATABASE_URL", "STRIPE_API_KEY", "STRIPE_API_BASE")}
    env.update(BOXOFFICE_HOME=str(home), INGRESS_PORT=str(port), RESERVATION_TTL_SECONDS="120",
               **extra)
    proc = subprocess.Popen([sys.executable, "-m", "boxoffice.cli", "up"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, read_until(proc, "ingress listening on", timeout=120)


def read_until(proc: subprocess.Popen, *marks: str, timeout: float = 90) -> list[str]:
    """``boxoffice up``'s lines up to the first that holds every one of ``marks``; fails with
    the lines it read when none does within ``timeout`` seconds (read in a thread, so that a
    stack that goes quiet fails with what it said rather than at the test's timeout)."""
    assert proc.stdout is not None
    said: list[str] = []
    lines: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        while not stop.is_set():
            line = proc.stdout.readline()
            lines.put(line)
            if not line or all(m in line for m in marks):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not said or not all(m in said[-1] for m in marks):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {marks} in {timeout:g}s; boxoffice up "
                                     "said:\n" + "".join(said)) from None
            assert line, "boxoffice up exited:\n" + "".join(said)
            said.append(line)
    finally:
        stop.set()
    return said


def stop_stack(proc: subprocess.Popen) -> set[psutil.Process]:
    """SIGINT, as an operator's Ctrl-C; it must exit 0. Returns the processes it had started."""
    family = set(psutil.Process(proc.pid).children(recursive=True))
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:  # (its output closed only once it is gone: a reader may wait)
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return family
