"""The reporter's local spool: every error report is appended here before it is sent, one JSON
per line, and stays until the bus has acknowledged it.

A file first, because a report held only in memory dies with its process (SIGKILL, the OOM
killer): one ``write()`` puts the line in the kernel's page cache, which outlives the process.
No fsync: it would cost milliseconds per log call, and a process crash does not need it (a power
cut may still lose the last lines).

Files live in ``<dir>/<digest of the NATS URL>/<service>.<instance>.<n>.spool``, so reports wait
for the bus they were meant for (a test's, a stack's) and are never replayed into another (the
URL without its user and password: every service's user reaches the same bus).
``<instance>`` is host name, pid and a random token, new for every spool: in containers every
service is pid 1 and replicas share one volume, so a pid alone names nobody.

Ownership is an exclusive ``flock`` held on every file a live spool owns; the kernel releases it
however the process ends. A file whose lock can be taken therefore belongs to an instance that
is gone: ``adopt()`` takes it (lock first, then checks it is still that file), the reporter sends
it, and ``acked()`` removes it. A spool adopts only the files of its own service and of those
``also_adopts`` names: on a bus with per-service permissions, reports its process may not
publish would be refused, and block its own behind them. A file is created under a temporary
name and renamed only once locked, so nobody adopts a file being born.

One size cap holds for the whole directory (every file of every process): the spool counts the
directory's bytes when it starts writing, then again after a second, or once its own writes
since the last count reach an eighth of the room that was left, so that near the cap it counts
at every write. What does not fit is dropped and counted. (Processes writing at the very same
instant near the cap may pass it by a line each.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from boxoffice import bus_access

SEGMENT_BYTES = 1 << 20  # past this the active file is sealed, so sent lines free their space
RECOUNT_SECONDS = 1.0
READ_BYTES = 512 << 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / "boxoffice-spool"


def bus_digest(bus_url: str) -> str:
    """The name of the directory of a bus's spool files: the URL's, credentials left out."""
    return hashlib.sha256(bus_access.without_user(bus_url).encode()).hexdigest()[:16]


def instance_name() -> str:
    """Unique for this spool among every process that shares the directory, now and later."""
    host = _UNSAFE.sub("-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclasses.dataclass(eq=False)
class SpoolFile:
    """A file this spool holds the lock of: its own, or one adopted from a gone instance."""

    path: Path
    fd: int
    size: int  # bytes in the file (for an adopted one, when it was adopted)
    sent: int = 0  # every line before this offset was acknowledged by the bus


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live instance (BlockingIOError), or not lockable here
        return False
    return True


class Spool:
    """Append-only files of encoded reports. Not thread-safe: the reporter holds its lock."""

    def __init__(self, root: Path | str | None, service: str, bus_url: str, *,
                 max_bytes: int = 64 << 20, segment_bytes: int = SEGMENT_BYTES,
                 also_adopts: Callable[[str], bool] = lambda _service: False):
        self.root = Path(root or default_dir())
        self.dir = self.root / bus_digest(bus_url)
        self.service = _UNSAFE.sub("-", service) or "unknown"
        self.also_adopts = also_adopts
        self.instance = instance_name()
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dropped = 0
        self._seq = itertools.count()
        self._files: list[SpoolFile] = []  # oldest first; the active one is among them
        self._active: SpoolFile | None = None
        self._total = 0  # bytes in the whole directory at the last count, plus ours since
        self._since = 0  # bytes written since the last count
        self._counted_at = float("-inf")
        self._recount_after = 0

    # -- writing (the hot path) ----------------------------------------------------------------
    def write(self, line: bytes) -> bool:
        """Append one report; False when it was dropped (spool full or disk unwritable)."""
        n = len(line) + 1
        now = time.monotonic()
        if (self._since > self._recount_after or now - self._counted_at >= RECOUNT_SECONDS
                or (self._total + n > self.max_bytes and now - self._counted_at >= 0.05)):
            self._count(now)
        if self._total + n > self.max_bytes:
            self.dropped += 1
            return False
        f = self._active
        try:
            if f is None or f.size >= self.segment_bytes:
                f = self._active = self._create()
            written = os.writev(f.fd, (line, b"\n"))
        except OSError:
            written = -1
        if written != n:
            if f is not None and written > 0:  # a torn line would spoil the next one
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fd, f.size)
            self.dropped += 1
            return False
        assert f is not None  # (written == n: the line is in the active file)
        f.size += n
        self._total += n
        self._since += n
        return True

    def _create(self) -> SpoolFile:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.service}.{self.instance}.{next(self._seq)}.spool"
        born = path.with_name(path.name + ".new")  # not a *.spool: nobody adopts it
        fd = os.open(born, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(born, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                born.unlink()
            raise
        f = SpoolFile(path, fd, 0)
        self._files.append(f)
        return f

    def _count(self, now: float) -> None:
        total = 0
        with contextlib.suppress(OSError), os.scandir(self.root) as dirs:
            for d in dirs:
                if not d.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError), os.scandir(d.path) as files:
                    for f in files:
                        with contextlib.suppress(OSError):  # (removed meanwhile)
                            total += f.stat(follow_symlinks=False).st_size
        self._total = total
        self._since = 0
        self._counted_at = now
        self._recount_after = max(0, self.max_bytes - total) // 8

    # -- sending -------------------------------------------------------------------------------
    def pending(self) -> bool:
        """Whether a file this spool holds has lines the bus has not acknowledged."""
        return any(f.sent < f.size for f in self._files)

    def unsent(self, max_lines: int = 256) -> tuple[SpoolFile, int, list[bytes]] | None:
        """The oldest lines not yet acknowledged: (file, offset after them, lines), or None.

        A torn last line (its writer died mid-write) comes back as it is; the caller skips it.
        """
        for f in self._files:
            if f.sent >= f.size:
                continue
            left = f.size - f.sent
            try:
                data = os.pread(f.fd, min(left, READ_BYTES), f.sent)
                if b"\n" not in data and len(data) < left:  # one line longer than READ_BYTES
                    data = os.pread(f.fd, left, f.sent)
            except OSError:
                continue
            if not data:  # shorter than we knew (cut by someone): nothing more to send
                f.size = f.sent
                continue
            lines: list[bytes] = []
            pos = 0
            while pos < len(data) and len(lines) < max_lines:
                end = data.find(b"\n", pos)
                if end < 0:
                    if len(data) < left:  # the rest of this line is beyond what we read
                        break
                    end = len(data)  # the file ends without a newline: a torn line
                if end > pos:
                    lines.append(data[pos:end])
                pos = end + 1
            return f, f.sent + min(pos, len(data)), lines
        return None

    def acked(self, f: SpoolFile, offset: int) -> None:
        """Everything in ``f`` before ``offset`` is on the bus: free what can be freed."""
        f.sent = max(f.sent, offset)
        if f.sent < f.size:
            return
        if f is self._active and f.size < self.segment_bytes:
            # keep the file (and the cost of creating one) for the next report
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, 0)
                self._total -= f.size
                f.size = f.sent = 0
            return
        self._release(f, remove=True)

    def _release(self, f: SpoolFile, *, remove: bool) -> None:
        if remove:
            with contextlib.suppress(OSError):
                f.path.unlink()  # while locked: an adopter that waited finds it gone
            self._total -= f.size
        with contextlib.suppress(OSError):
            os.close(f.fd)
        self._files.remove(f)
        if f is self._active:
            self._active = None

    # -- files of instances that are gone --------------------------------------------------------
    def adopt(self) -> int:
        """Take every file in this bus's directory whose owner is gone, of this spool's service
        or one it ``also_adopts``; returns how many."""
        taken = 0
        mine = {f.path for f in self._files}
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return 0
        for name in names:
            path = self.dir / name
            if path in mine or not (name.endswith((".spool", ".spool.new"))):
                continue
            owner = name.split(".", 1)[0]
            if owner != self.service and not self.also_adopts(owner):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not _locked(fd) or os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)  # alive, or sent and removed between our open and our lock
                    continue
                size = os.fstat(fd).st_size
            except OSError:
                os.close(fd)
                continue
            if name.endswith(".new") or size == 0:  # born and died before its first report
                # (a .new file is only ours to remove once it is old: its creator may be between
                # creating and locking it)
                with contextlib.suppress(OSError):
                    if not name.endswith(".new") or time.time() - os.fstat(fd).st_mtime > 60:
                        path.unlink()
                os.close(fd)
                continue
            self._files.insert(taken, SpoolFile(path, fd, size))  # before our own: older
            taken += 1
        return taken

    def close(self) -> None:
        """Remove what was sent, and let go of the rest for whoever adopts it next."""
        for f in list(self._files):
            self._release(f, remove=f.sent >= f.size)
