"""Operator commands of the ``boxoffice`` CLI: they call ingress's admin API.

They read ``INGRESS_URL`` and ``ADMIN_API_TOKEN`` from the environment, else from
``.boxoffice/stack.env`` (written by ``boxoffice up``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from boxoffice import stack


def _settings() -> tuple[str, str]:
    env = {}
    path = stack.home() / "stack.env"
    if path.exists():
        env = stack.read_env(path)
    url = os.environ.get("INGRESS_URL") or env.get("INGRESS_URL")
    token = os.environ.get("ADMIN_API_TOKEN") or env.get("ADMIN_API_TOKEN")
    if not url or not token:
        raise SystemExit("boxoffice: set INGRESS_URL and ADMIN_API_TOKEN (or run `boxoffice up`)")
    return url.rstrip("/"), token


def fetch(method: str, path: str, body: Any = None, *, timeout: float = 30,
          raw: bytes | None = None) -> tuple[bool, Any]:
    """Call ingress's admin API: ``(True, decoded answer)``, or ``(False, None)`` after printing
    why it failed (the problem+json of an HTTP error, or ingress unreachable). ``raw`` is a body
    sent as it is (a file)."""
    url, token = _settings()
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    if raw is not None:
        data = raw
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return True, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"), file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"boxoffice: cannot reach ingress at {url}: {exc.reason}", file=sys.stderr)
    return False, None


def lines(method: str, path: str, body: Any, *, timeout: float = 60) -> Iterator[Any]:
    """Call a route that answers NDJSON and yield each line decoded, as it arrives; on an error
    print why (as ``fetch``) and raise ``SystemExit(1)``."""
    url, token = _settings()
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
            return
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"), file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"boxoffice: cannot reach ingress at {url}: {exc.reason}", file=sys.stderr)
    raise SystemExit(1)


def download(path: str, *, timeout: float = 60) -> bytes | None:
    """GET a file from ingress's admin API: its bytes, or None after printing why not."""
    url, token = _settings()
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"), file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"boxoffice: cannot reach ingress at {url}: {exc.reason}", file=sys.stderr)
    return None


# How answers are printed: "json" (``--json``), "table" (``--table``), or by default tables on a
# terminal and JSON when the output goes to a pipe or a file (a script reading it).
OUTPUT = {"mode": "auto"}


def show(result: Any) -> None:
    """Print an answer: tables for people, or JSON for scripts."""
    mode = OUTPUT["mode"]
    if mode == "json" or (mode == "auto" and not sys.stdout.isatty()):
        print(json.dumps(result, indent=2))
    else:
        from boxoffice import tables
        tables.render(result)


def with_query(path: str, **params: Any) -> str:
    """``path`` with the ``params`` that are set as its query string: None, "" and False are
    left out, True is ``true``."""
    query = {name: "true" if value is True else str(value) for name, value in params.items()
             if value is not None and value is not False and value != ""}
    return f"{path}?{urllib.parse.urlencode(query)}" if query else path


def call(method: str, path: str, body: Any = None, *, timeout: float = 30,
         raw: bytes | None = None) -> int:
    """``fetch`` and print the answer; the exit code of an operator command."""
    ok, result = fetch(method, path, body, timeout=timeout, raw=raw)
    if ok:
        show(result)
    return 0 if ok else 1


# Modules (libs/boxoffice/ops_<area>.py) that add their own commands with add_commands(sub).
AREAS: tuple[str, ...] = ("ops_webhooks", "ops_reaper", "ops_errors", "ops_payments", "ops_audit",
                          "ops_ticketed_events")


def add_commands(sub: argparse._SubParsersAction) -> None:
    import importlib
    for area in AREAS:
        importlib.import_module(f"boxoffice.{area}").add_commands(sub)
