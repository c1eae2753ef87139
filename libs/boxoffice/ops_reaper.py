"""Operator commands for holds and the reaper: ``boxoffice reservations stats|cleanup`` and
``boxoffice reaper runs`` (they call ingress's admin API, see ``boxoffice.ops``)."""

from __future__ import annotations

import argparse

from boxoffice.ops import call, with_query


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reservations", help="holds: stats, cleanup (expire overdue holds now)")
    s = p.add_subparsers(dest="verb", required=True)
    s.add_parser("stats", help="active, expired, completed, cancelled, overdue; next expiry").set_defaults(
        func=lambda a: call("GET", "/v1/admin/reservations/stats"))
    c = s.add_parser("cleanup", help="expire every overdue hold now; prints how many")
    c.add_argument("--event-id", help="only this event's holds")
    c.set_defaults(func=lambda a: call("POST", "/v1/admin/reservations/cleanup",
                                       {"event_id": a.event_id} if a.event_id else {}))

    p = sub.add_parser("reaper", help="the reaper: runs (like pg_cron's job_run_details)")
    s = p.add_subparsers(dest="verb", required=True)
    r = s.add_parser("runs", help="recent runs, newest first")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--kind", choices=("expiry", "retention", "manual"))
    r.add_argument("--errors", action="store_true", help="only runs that failed")
    r.set_defaults(func=_runs)


def _runs(args: argparse.Namespace) -> int:
    return call("GET", with_query("/v1/admin/reaper/runs", limit=args.limit, kind=args.kind,
                                  errors=bool(args.errors)))
