"""PostgreSQL roles: each service that uses the database logs in with a role of its own.

The migrations create the roles (without LOGIN) and grant each one exactly what its service
uses (tables in ``migrations/``, functions beside each one in ``sql/``); the role that runs the
migrations owns the schema. Whoever deploys gives the roles LOGIN and a password: ``boxoffice up`` with random
passwords, ``boxoffice migrate`` from ``PG_<SERVICE>_PASSWORD`` (the compose file). Ingress has
no role: it never touches the database.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    import asyncpg

ROLES: dict[str, str] = {"payment": "boxoffice_payment", "webhook": "boxoffice_webhook",
                         "error_sink": "boxoffice_error_sink", "reaper": "boxoffice_reaper"}


def password_variable(service: str) -> str:
    """The variable ``boxoffice migrate`` reads a service role's password from."""
    return f"PG_{service.upper()}_PASSWORD"


def url_for(url: str, service: str, password: str) -> str:
    """``url`` (the owner's) with the service's role and password: same server, database and
    parameters (``sslmode`` and the rest)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(
        netloc=f"{ROLES[service]}:{quote(password, safe='')}@{host}"))


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677), made
    here as ``psql``'s ``\\password`` does, so the password itself is never sent to the server
    nor written to its logs."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    salt_b64, stored_b64, server_b64 = (base64.b64encode(b).decode()
                                        for b in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt_b64}${stored_b64}:{server_b64}"


async def grant_logins(conn: asyncpg.Connection, passwords: Mapping[str, str]) -> None:
    """Give the roles of ``passwords`` (service -> password) LOGIN and that password. ``conn``
    is the owner's: a superuser, or a role with CREATEROLE that created them."""
    for service, password in passwords.items():
        verifier = scram_verifier(password)
        await conn.execute(f'ALTER ROLE "{ROLES[service]}" WITH LOGIN PASSWORD \'{verifier}\'')


def set_logins(owner_url: str, passwords: Mapping[str, str],
               command_timeout: float | None = None) -> None:
    """``grant_logins`` over an operator's connection of its own (for the command line and
    ``boxoffice up``; ``db.operator_connect``: each statement bounded, by ``command_timeout``
    when given, as with a synchronous standby an ``ALTER ROLE`` waits for the standby like any
    commit)."""
    from boxoffice.db import OPERATOR_STATEMENT_SECONDS, operator_connect

    async def run() -> None:
        conn = await operator_connect(owner_url,
                                      command_timeout=command_timeout or OPERATOR_STATEMENT_SECONDS)
        try:
            await grant_logins(conn, passwords)
        finally:
            await conn.close()

    asyncio.run(run())
