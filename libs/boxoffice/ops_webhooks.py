"""``boxoffice webhooks``: the Stripe events kept by the webhook service (list, replay) and its
reconciliation with Stripe."""

from __future__ import annotations

import argparse
import json
import urllib.parse

from boxoffice import ops
from boxoffice.wire.stripe import WebhookStatus



def _list(args: argparse.Namespace) -> int:
    return ops.call("GET", ops.with_query("/v1/admin/webhooks/events", limit=args.limit,
                                          status=args.status, type=args.type))


def _replay(args: argparse.Namespace) -> int:
    """Replay one event; exits 1 when it failed again (the error is on the event)."""
    path = f"/v1/admin/webhooks/events/{urllib.parse.quote(args.event_id, safe='')}/replay"
    ok, result = ops.fetch("POST", path, timeout=60)
    if not ok:
        return 1
    print(json.dumps(result, indent=2))
    return 1 if result.get("outcome") == "failed" else 0


def _reconciliation(args: argparse.Namespace) -> int:
    return ops.call("GET", ops.with_query("/v1/admin/webhooks/reconciliation", limit=args.limit))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhooks", help="Stripe webhook events: list, replay, reconciliation")
    s = p.add_subparsers(dest="verb", required=True)
    ls = s.add_parser("list", help="events newest first (e.g. --status failed)")
    ls.add_argument("--status", choices=[s.value for s in WebhookStatus])
    ls.add_argument("--type", help="a Stripe event type, e.g. payment_intent.succeeded")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_list)
    rp = s.add_parser("replay", help="apply a failed (or waiting) event again, now")
    rp.add_argument("event_id")
    rp.set_defaults(func=_replay)
    rc = s.add_parser("reconciliation",
                      help="reconciliation with Stripe: how far it got, its last runs")
    rc.add_argument("--limit", type=int, default=10, help="runs to show (newest first)")
    rc.set_defaults(func=_reconciliation)
