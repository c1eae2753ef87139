"""``boxoffice events``: ticketed events (list, create, show).

It calls ingress's admin API (see ``boxoffice.ops``)."""

from __future__ import annotations

import argparse

from boxoffice.ops import call, with_query


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="ticketed events: list, create, show")
    s = p.add_subparsers(dest="verb", required=True)
    ls = s.add_parser("list", help="events and their inventory, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=lambda a: call("GET", with_query("/v1/admin/events", limit=a.limit)))
    c = s.add_parser("create")
    c.add_argument("--name", required=True)
    c.add_argument("--capacity", type=int, required=True)
    c.add_argument("--price", type=int, required=True, help="in minor units")
    c.add_argument("--currency", default="eur")
    c.set_defaults(func=lambda a: call("POST", "/v1/admin/events", {
        "name": a.name, "capacity": a.capacity, "price": a.price, "currency": a.currency}))
    g = s.add_parser("show")
    g.add_argument("event_id")
    g.set_defaults(func=lambda a: call("GET", f"/v1/admin/events/{a.event_id}"))
