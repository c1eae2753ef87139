"""Helpers of the hostile-input tests (no tests here): a raw HTTP/1.1 client that sends exactly
the bytes it is given, the ingress route table, and snapshots of everything that could change."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats

CODE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, Any] | None:
        if not self.headers.get("content-type", "").startswith("application/problem+json"):
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass
class Case:
    """One hostile request: what it is (for failure messages) and its exact bytes."""

    what: str
    method: str
    target: str  # the request-target, already percent-encoded (or deliberately not)
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes | None = None
    chunked: bool = False
    # refused by aiohttp's HTTP parser before any code of ours runs (bytes a field may not hold,
    # a request line past 8190 bytes, a Content-Encoding it cannot decode: zstd): a plain-text 400
    parser: bool = False

    def __post_init__(self) -> None:
        values = [v if isinstance(v, bytes) else v.encode("latin-1") for _, v in self.headers]
        self.parser = self.parser or any(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v) for v in values) \
            or len(self.target) > 8000 or " " in self.target or any(len(v) > 8000 for v in values) or any(
                name.lower() == "content-encoding" and v == b"zstd"
                for (name, _), v in zip(self.headers, values))


def _head(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


async def send(port: int, case: Case, timeout: float = 15.0) -> RawResponse:
    """Send ``case`` on a fresh connection and read the whole answer (``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{case.method} ".encode("latin-1") + _head(case.target) + b" HTTP/1.1",
                 f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
        lines += [name.encode() + b": " + _head(value) for name, value in case.headers]
        body = case.body or b""
        if case.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif case.body is not None:
            lines.append(f"Content-Length: {len(body)}".encode())
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if case.chunked:
            for i in range(0, len(body), 1 << 20):
                part = body[i:i + (1 << 20)]
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(body)
        try:
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server may answer (413) and close before it read everything
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return RawResponse(int(status_line.split(" ")[1]), headers, rest)


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


# -- the route table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str
    template: str            # e.g. /v1/reservations/{reservation_id}/cancel
    params: tuple[str, ...]  # dynamic parts in order
    patterns: dict[str, str]  # param -> regex (aiohttp's, '[^{}/]+' by default)


def ingress_routes() -> list[Route]:
    """Every route of ingress's real aiohttp app (HEAD twins of GETs left out)."""
    import contextlib

    from boxoffice import config, runtime
    from boxoffice.ingress.main import create_app
    from tests.harness import base_env

    env = base_env("nats://127.0.0.1:1", "postgresql://unused@127.0.0.1/unused")
    cfg = config.load("ingress", env)
    svc = runtime.Service(config=cfg, stack=contextlib.AsyncExitStack(), stopping=asyncio.Event())
    app = create_app(cfg, None, svc)  # type: ignore[arg-type] - the bus is not used to list routes
    out = []
    for r in app.router.routes():
        if r.method == "HEAD":
            continue
        info = r.resource.get_info() if r.resource else {}
        template = r.resource.canonical if r.resource else ""
        params = tuple(re.findall(r"\{(\w+)\}", template))
        patterns = {}
        if "pattern" in info:
            # aiohttp compiles '{name:regex}' to '(?P<name>regex)'
            for name, rx in re.findall(r"\(\?P<(\w+)>((?:[^()]|\([^()]*\))+)\)", info["pattern"].pattern):
                patterns[name] = rx
        out.append(Route(r.method, template, params, patterns))
    return out


# -- snapshots -----------------------------------------------------------------------------------
async def db_snapshot(db: asyncpg.Pool) -> dict[str, tuple[int, str]]:
    """Per table of the public schema: row count and a digest of every row's full content."""
    tables = [r["tablename"] for r in await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
    out = {}
    for t in tables:
        row = await db.fetchrow(f'SELECT count(*) AS n, md5(coalesce(string_agg(x::text, \'|\' '
                                f'ORDER BY x::text), \'\')) AS digest FROM "{t}" x')
        out[t] = (row["n"], row["digest"])
    return out


async def stream_snapshot(nats_url: str) -> dict[str, tuple[int, int, int]]:
    """Per JetStream stream: messages, bytes, last sequence."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        return {s.config.name: (s.state.messages, s.state.bytes, s.state.last_seq)
                for s in await js.streams_info()}
    finally:
        await nc.close()


def deep(n: int, obj: bool = False) -> bytes:
    return (b'{"a":' * n + b"1" + b"}" * n) if obj else (b"[" * n + b"]" * n)


def chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
