"""Source maps: kept per release, and used when a group's events are shown, to resolve their
minified JavaScript frames to the original file, line, column and function (Sentry's own
``symbolic``). A frame is looked up by its file as sent (``abs_path`` or ``filename``), without
its query, and as ``~/<path>`` (any origin), as Sentry tries them; first by the Debug ID the
event names for the file (``debug_meta.images``), whatever the release. The stored report is not
changed: a map uploaded later still resolves earlier errors."""

from __future__ import annotations

import functools
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from symbolic import SourceMapView  # type: ignore[attr-defined]  # (not in its stubs)

from boxoffice import errors
from boxoffice.wire import sentry_items as si

InvalidSourceMap = errors.define("InvalidSourceMap", "invalid_source_map", 422,
                                 "Not a source map")

UPSERT = """
INSERT INTO source_maps (release, name, map, size, debug_id) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (release, name) DO UPDATE SET map = excluded.map, size = excluded.size,
                                         debug_id = excluded.debug_id, uploaded_at = now()
"""


@functools.lru_cache(maxsize=64)
def _view(data: bytes) -> SourceMapView:
    return SourceMapView.from_json_bytes(data)


async def upload(pool: asyncpg.Pool, req: si.SourceMapUpload) -> si.SourceMapInfo:
    try:
        _view(req.map)
        doc = msgspec.json.decode(req.map)
        sources = [str(x) for x in doc.get("sources") or []] if isinstance(doc, dict) else []
    except Exception as exc:  # noqa: BLE001 - symbolic raises its own error types
        raise InvalidSourceMap(f"not a source map: {type(exc).__name__}") from None
    raw_id = (doc.get("debug_id") or doc.get("debugId")) if isinstance(doc, dict) else None
    await pool.execute(UPSERT, req.release, req.name, req.map, len(req.map), _debug_id(raw_id))
    return si.SourceMapInfo(release=req.release, name=req.name, size=len(req.map),
                            sources=sources[:100])


def _debug_id(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)[:36]) if isinstance(value, str) else None
    except ValueError:
        return None


def _names(path: str) -> list[str]:
    bare = path.split("?", 1)[0].split("#", 1)[0]
    out = [path, bare]
    try:
        parts = urlsplit(bare)
        if parts.scheme and parts.path:
            out.append("~" + parts.path)
    except ValueError:
        pass
    return list(dict.fromkeys(out))


async def resolve(conn: asyncpg.Connection, events: list[dict[str, Any]]) -> None:
    """Add ``resolved`` (filename, lineno, colno, function) to the JavaScript frames of
    ``events`` (rows of error_logs as dicts) whose release has a map for their file."""
    wanted: dict[tuple[str, str], None] = {}
    frames = []
    by_file: dict[str, uuid.UUID] = {}  # a frame's file -> its map's Debug ID (any release)
    for e in events:
        ctx, release = e.get("context") or {}, e.get("release") or ""
        for image in ctx.get("debug_images") or [] if isinstance(ctx.get("debug_images"), list) else []:
            if isinstance(image, dict) and (d := _debug_id(image.get("debug_id"))):
                by_file[str(image.get("code_file"))] = d
        if not isinstance(ctx.get("exception"), list):
            continue
        for exc in ctx["exception"]:
            for f in exc.get("frames") or [] if isinstance(exc, dict) else []:
                path = f.get("abs_path") or f.get("filename") if isinstance(f, dict) else None
                if (isinstance(path, str) and isinstance(f.get("lineno"), int)
                        and isinstance(f.get("colno"), int)):
                    frames.append((release, f, _names(path)))
                    for n in _names(path):
                        wanted[(release, n)] = None
    if not frames:
        return
    rows = await conn.fetch(
        "SELECT release, name, map FROM source_maps m JOIN unnest($1::text[], $2::text[]) AS w(r, n) "
        "ON m.release = w.r AND m.name = w.n", [r for r, _ in wanted], [n for _, n in wanted])
    maps = {(r["release"], r["name"]): bytes(r["map"]) for r in rows}
    by_id = {r["debug_id"]: bytes(r["map"]) for r in await conn.fetch(
        "SELECT debug_id, map FROM source_maps WHERE debug_id = ANY($1::uuid[])",
        list(set(by_file.values())))} if by_file else {}
    for release, f, names in frames:
        data = next((by_id[by_file[n]] for n in names if by_file.get(n) in by_id), None)
        data = data or next((maps[(release, n)] for n in names if (release, n) in maps), None)
        if data is None:
            continue
        try:
            token = _view(data).lookup(f["lineno"] - 1, f["colno"] - 1)
        except Exception:  # noqa: BLE001 - a bad map resolves nothing
            token = None
        if token is not None:
            f["resolved"] = {"filename": token.src, "lineno": token.src_line + 1,
                             "colno": token.src_col + 1,
                             "function": token.function_name or token.name or f.get("function")}
