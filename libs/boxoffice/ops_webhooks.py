"""``boxoffice webhooks``: the Stripe events kept by the webhook service (list, show, replay
one or all matching) and its reconciliation with Stripe."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from boxoffice import ops
from boxoffice.wire.stripe import REPLAYABLE, WebhookStatus


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


def _show(args: argparse.Namespace) -> int:
    event_id = urllib.parse.quote(args.event_id, safe="")
    return ops.call("GET", f"/v1/admin/webhooks/events/{event_id}")


def _replay_all(args: argparse.Namespace) -> int:
    """Replay every event of a status (and type), oldest first: progress on stderr, the totals
    as JSON on stdout; exits 1 when any failed again."""
    body: dict[str, object] = {"status": args.status, "limit": args.limit}
    if args.type:
        body["type"] = args.type
    last: dict = {}
    for last in ops.lines("POST", "/v1/admin/webhooks/replay", body, timeout=300):
        if not last.get("finished"):
            extra = f" ({last['code']})" if last.get("code") else ""
            print(f"[{last['done']}/{last['total']}] {last['event_id']}: {last['outcome']}{extra}",
                  file=sys.stderr, flush=True)
    print(json.dumps({k: last.get(k) for k in ("total", "succeeded", "failed")}, indent=2))
    return 1 if last.get("failed") else 0


def _reconciliation(args: argparse.Namespace) -> int:
    return ops.call("GET", ops.with_query("/v1/admin/webhooks/reconciliation", limit=args.limit))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhooks", help="Stripe webhook events: list, show, replay, replay-all, "
                                       "reconciliation")
    s = p.add_subparsers(dest="verb", required=True)
    ls = s.add_parser("list", help="events newest first (e.g. --status failed)")
    ls.add_argument("--status", choices=[s.value for s in WebhookStatus])
    ls.add_argument("--type", help="a Stripe event type, e.g. payment_intent.succeeded")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_list)
    rp = s.add_parser("replay", help="apply a failed (or waiting) event again, now")
    rp.add_argument("event_id")
    rp.set_defaults(func=_replay)
    sh = s.add_parser("show", help="one event: its payload (secrets filtered) and last error")
    sh.add_argument("event_id")
    sh.set_defaults(func=_show)
    ra = s.add_parser("replay-all", help="replay every failed (or waiting) event, oldest first, "
                                         "with progress (e.g. --type payment_intent.succeeded)")
    ra.add_argument("--status", choices=[s.value for s in REPLAYABLE],
                    default=WebhookStatus.FAILED.value)
    ra.add_argument("--type", help="only events of this Stripe type")
    ra.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    ra.set_defaults(func=_replay_all)
    rc = s.add_parser("reconciliation",
                      help="reconciliation with Stripe: how far it got, its last runs")
    rc.add_argument("--limit", type=int, default=10, help="runs to show (newest first)")
    rc.set_defaults(func=_reconciliation)
