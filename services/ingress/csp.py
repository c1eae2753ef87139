"""Browser security reports (``/api/<project>/security/``) as warning-level error reports.

A browser posts a Content-Security-Policy violation to the ``report-uri`` of a policy as
``{"csp-report": {...}}`` (``application/csp-report``), or through the Reporting API
(``report-to``) as a list of ``{"type": "csp-violation", "body": {...}}``. Each violation becomes
one report, grouped by the directive it broke and the host it blocked, as Sentry does.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from boxoffice import scrub
from boxoffice.ingress.sentry_envelope import InvalidEnvelope
from boxoffice.wire.errors import ErrorReport

# Reporting API names -> the csp-report names
_CAMEL = {"documentURL": "document-uri", "blockedURL": "blocked-uri",
          "effectiveDirective": "effective-directive", "violatedDirective": "violated-directive",
          "originalPolicy": "original-policy", "sourceFile": "source-file",
          "lineNumber": "line-number", "columnNumber": "column-number",
          "disposition": "disposition", "referrer": "referrer", "statusCode": "status-code",
          "sample": "script-sample"}


def _violations(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("csp-report"), dict):
        return [body["csp-report"]]
    if isinstance(body, list):
        out = []
        for r in body[:100]:
            if isinstance(r, dict) and isinstance(r.get("body"), dict):
                out.append({_CAMEL.get(k, k): v for k, v in r["body"].items()}
                           | {"report-type": str(r.get("type") or "csp-violation")})
        if out:
            return out
    raise InvalidEnvelope("a security report must be {\"csp-report\": {...}} or a Reporting API list")


def _host(uri: str) -> str:
    if "://" not in uri:
        return uri or "self"  # "inline", "eval", "data", ...
    try:
        return urlsplit(uri).netloc or uri
    except ValueError:
        return uri


def to_reports(body: Any, *, project_id: str, service: str | None) -> list[ErrorReport]:
    """The reports of one security-report request; ``InvalidEnvelope`` when it is none."""
    out = []
    for v in _violations(body):
        directive = str(v.get("effective-directive") or v.get("violated-directive") or "unknown")
        directive = directive.split(" ", 1)[0][:100]
        blocked = _host(str(v.get("blocked-uri") or ""))[:200]
        out.append(ErrorReport(
            id=str(uuid.uuid4()), occurred_at=datetime.now(UTC),
            service=service or "csp", level="warning",
            message=scrub.truncate(f"Blocked '{directive}' from '{blocked}'", 65536),
            error_type="CspViolation",
            # scrubbed and bounded once, by scrub.report as ingress publishes it
            context={"csp": v, "sentry": {"project_id": project_id, "platform": "csp"}},
            fingerprint=["csp", directive, blocked],
            environment=None, release=None, request_id=None))
    return out
