"""Helpers of the tests of `boxoffice up`: start the whole stack as one process, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("boxoffice up exited:\n" + "".join(lines))
        lines.append(line)
        if "ingress listening on" in line:
            return proc, lines
    raise AssertionError("not ready in time:\n" + "".join(lines))


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
