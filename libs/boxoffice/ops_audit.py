"""``boxoffice audit [--full] [--json]``: run every check of the self-audit now.

It calls ingress's admin API (``POST /v1/admin/invariants/run``, see ``boxoffice.ops``) and
exits 0 when every promise holds, 1 when a check found a violation (each one is named) or could
not run, 2 when the audit could not be asked at all.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from boxoffice.ops import fetch

RUN_TIMEOUT = 620.0  # ingress gives the services 600 s


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="run the self-audit now; exit 1 on any violation")
    p.add_argument("--full", action="store_true",
                   help="look at everything, not only what changed since the last run")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.set_defaults(func=_audit)


def _audit(args: argparse.Namespace) -> int:
    ok, result = fetch("POST", "/v1/admin/invariants/run", {"full": args.full},
                       timeout=RUN_TIMEOUT)
    if not ok:
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["holds"] else 1


def render(result: dict[str, Any]) -> str:
    """One line per check, one per violation, and the verdict last."""
    lines = []
    for c in result["checks"]:
        state = f"failed: {c['error']}" if c["error"] else (
            f"{c['violations']} violation(s)" if c["violations"] else "holds")
        extra = f", {c['in_flight']} in flight" if c["in_flight"] else ""
        lines.append(f"{c['check']:<11} {c['mode'] or '-':<12} examined {c['examined']}{extra}: "
                     f"{state}")
    for f in result["findings"]:
        lines.append(f"VIOLATION {f['check']}.{f['kind']} {f['subject']}: expected "
                     f"{f['expected']}, found {f['found']} (since {f['first_seen']})")
    count = len(result["findings"])
    lines.append("every promise holds" if result["holds"] else
                 f"NOT HOLDING: {count} violation(s)" if count else "NOT HOLDING: a check failed")
    return "\n".join(lines)
