"""CPU time of the processes a benchmark runs (Linux /proc): what one operation costs each."""

from __future__ import annotations

import os
import subprocess


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree(pid: int) -> list[int]:
    """A process and its children (PostgreSQL's postmaster and its backends)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid, *(int(p) for p in out.split())]
