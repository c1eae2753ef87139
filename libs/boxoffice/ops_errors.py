"""``boxoffice errors``: error groups kept by the error-sink (list, show, resolve, ignore), the
feedback users sent, the files sent with errors, and what was dropped on the way.

They call ingress's admin API (see ``boxoffice.ops``)."""

from __future__ import annotations

import argparse
import sys
import urllib.parse

from boxoffice.ops import call, download, with_query
from boxoffice.wire.errors import LEVELS, STATUSES


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("errors", help="error groups: list, show, resolve, ignore; feedback, "
                                      "attachment, dropped, monitors, releases")
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

    fb = s.add_parser("feedback", help="users' feedback, newest first")
    fb.add_argument("--service")
    fb.add_argument("--since", help="RFC 3339 time")
    fb.add_argument("--limit", type=int, default=50)
    fb.set_defaults(func=lambda a: call("GET", "/v1/admin/feedback" + _query(a, "service", "since", "limit")))
    dr = s.add_parser("dropped", help="what SDKs and ingress dropped, by reason and category")
    dr.add_argument("--service")
    dr.add_argument("--since", help="RFC 3339 time (default: the last 24 hours)")
    dr.set_defaults(func=lambda a: call("GET", "/v1/admin/errors/dropped" + _query(a, "service", "since")))
    mo = s.add_parser("monitors", help="cron monitors: schedule, status, last and next check-in")
    mo.add_argument("--service")
    mo.set_defaults(func=lambda a: call("GET", "/v1/admin/monitors" + _query(a, "service")))
    ms = s.add_parser("monitor", help="create or change a cron monitor")
    ms.add_argument("service")
    ms.add_argument("slug")
    when = ms.add_mutually_exclusive_group(required=True)
    when.add_argument("--crontab", help="five fields, such as '0 3 * * *'")
    when.add_argument("--every", type=int, help="an interval: a count of --unit")
    ms.add_argument("--unit", choices=("minute", "hour", "day", "week", "month", "year"), default="hour")
    ms.add_argument("--margin", type=int, default=1, help="minutes a check-in may be late")
    ms.add_argument("--max-runtime", type=int, default=30, help="minutes a run may take")
    ms.add_argument("--timezone")
    ms.set_defaults(func=_set_monitor)
    rel = s.add_parser("releases", help="release health: sessions and crash-free rates")
    rel.add_argument("--service")
    rel.add_argument("--since", help="RFC 3339 time (default: the last 30 days)")
    rel.set_defaults(func=lambda a: call("GET", "/v1/admin/releases" + _query(a, "service", "since")))
    sm = s.add_parser("sourcemap", help="upload a release's source map for one minified file")
    sm.add_argument("release")
    sm.add_argument("name", help="the minified file as frames name it: its URL, or ~/path")
    sm.add_argument("map_file", help="the .map file")
    sm.set_defaults(func=_source_map)
    at = s.add_parser("attachment", help="download a file sent with an error")
    at.add_argument("attachment_id")
    at.add_argument("-o", "--output", help="file to write (default: standard output)")
    at.set_defaults(func=_attachment)


def _query(args: argparse.Namespace, *names: str) -> str:
    return with_query("", **{n: getattr(args, n) for n in names})


def _set_monitor(args: argparse.Namespace) -> int:
    body: dict = {"service": args.service, "slug": args.slug, "checkin_margin": args.margin,
                  "max_runtime": args.max_runtime}
    if args.crontab:
        body.update(schedule_type="crontab", schedule_value=args.crontab)
    else:
        body.update(schedule_type="interval", schedule_value=str(args.every), schedule_unit=args.unit)
    if args.timezone:
        body["timezone"] = args.timezone
    return call("POST", "/v1/admin/monitors", body)


def _source_map(args: argparse.Namespace) -> int:
    with open(args.map_file, "rb") as f:
        data = f.read()
    path = with_query(f"/v1/admin/releases/{urllib.parse.quote(args.release, safe='')}/sourcemaps",
                      name=args.name)
    return call("POST", path, raw=data)


def _attachment(args: argparse.Namespace) -> int:
    data = download(f"/v1/admin/attachments/{urllib.parse.quote(args.attachment_id, safe='')}")
    if data is None:
        return 1
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def _list(args: argparse.Namespace) -> int:
    return call("GET", with_query("/v1/admin/errors", limit=args.limit, status=args.status,
                                  level=args.level, service=args.service, since=args.since))
