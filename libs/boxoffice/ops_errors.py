"""``boxoffice errors``: error groups kept by the error-sink (list, show, resolve, ignore).

They call ingress's admin API (see ``boxoffice.ops``)."""

from __future__ import annotations

import argparse
import urllib.parse

from boxoffice.ops import call
from boxoffice.wire.errors import LEVELS, STATUSES


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("errors", help="error groups: list, show, resolve, ignore")
    s = p.add_subparsers(dest="verb", required=True)
    ls = s.add_parser("list", help="groups, most recently seen first")
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--level", choices=LEVELS)
    ls.add_argument("--service")
    ls.add_argument("--since", help="RFC 3339 time: only groups seen since then")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_list)
    show = s.add_parser("show", help="one group and its most recent reports")
    show.add_argument("group_id")
    show.add_argument("--events", type=int, default=20)
    show.set_defaults(func=lambda a: call(
        "GET", f"/v1/admin/errors/{urllib.parse.quote(a.group_id)}?events={a.events}"))
    for verb, what in (("resolve", "mark resolved (a new report reopens it)"),
                       ("ignore", "stop showing it; its reports are kept")):
        v = s.add_parser(verb, help=what)
        v.add_argument("group_id")
        v.set_defaults(func=lambda a, verb=verb: call(
            "POST", f"/v1/admin/errors/{urllib.parse.quote(a.group_id)}/{verb}"))


def _list(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    for name in ("status", "level", "service", "since"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    return call("GET", "/v1/admin/errors?" + urllib.parse.urlencode(query))
