"""The reporter's local spool: error reports that could not reach the bus, one JSON per line.

Files live in ``<dir>/<digest of the NATS URL>/<service>.<pid>.<n>.spool``, so reports wait for
the bus they were meant for (a test's, a stack's) and are never replayed into another. A file
is claimed by renaming it to the claimer's pid: the process's own older files, and files left
by processes that are gone (a crash, a restart). The active file is capped; past the cap new
reports are counted as dropped rather than filling the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import tempfile
from pathlib import Path


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / "boxoffice-spool"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """Append-only files of encoded reports. Not thread-safe: the reporter holds its lock."""

    def __init__(self, root: Path | str | None, service: str, bus_url: str, *,
                 max_bytes: int = 64 << 20):
        digest = hashlib.sha256(bus_url.encode()).hexdigest()[:16]
        self.dir = Path(root or default_dir()) / digest
        self.service = service
        self.max_bytes = max_bytes
        self.dropped = 0
        self._seq = itertools.count()
        self._active: Path | None = None
        self._size = 0

    def _name(self, pid: int | None = None) -> Path:
        return self.dir / f"{self.service}.{pid or os.getpid()}.{next(self._seq)}-{os.urandom(3).hex()}.spool"

    def write(self, line: bytes) -> bool:
        """Append one report; False when it was dropped (spool full or disk unwritable)."""
        if self._size + len(line) + 1 > self.max_bytes:
            self.dropped += 1
            return False
        try:
            if self._active is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._active = self._name()
                self._size = 0
            # opened for each line: nothing is left open, and a crash loses at most this line
            with open(self._active, "ab") as fh:
                fh.write(line + b"\n")
        except OSError:
            self.dropped += 1
            return False
        self._size += len(line) + 1
        return True

    def seal(self) -> None:
        """Finish the active file; the next write starts a new one."""
        self._active = None
        self._size = 0

    def pending(self) -> bool:
        return self._active is not None or any(self._claimable())

    def _claimable(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob(f"{self.service}.*.spool")):
            if path == self._active:
                continue
            try:
                pid = int(path.name.split(".")[-3])
            except (ValueError, IndexError):
                continue
            if pid == os.getpid() or not _alive(pid):
                out.append(path)
        return out

    def claim(self) -> list[Path]:
        """Seal the active file and take every file this process may send, oldest first."""
        self.seal()
        mine = []
        for path in self._claimable():
            if path.name.split(".")[-3] == str(os.getpid()):
                mine.append(path)
                continue
            target = self._name()
            try:
                path.rename(target)  # whoever renames first owns it
            except OSError:
                continue
            mine.append(target)
        return mine

    @staticmethod
    def read(path: Path) -> list[bytes]:
        try:
            return [line for line in path.read_bytes().split(b"\n") if line.strip()]
        except OSError:
            return []

    @staticmethod
    def rewrite(path: Path, lines: list[bytes]) -> None:
        """Keep only ``lines`` in ``path`` (what was not sent), or remove it when none are left."""
        with contextlib.suppress(OSError):
            if not lines:
                path.unlink()
                return
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(b"\n".join(lines) + b"\n")
            tmp.replace(path)
