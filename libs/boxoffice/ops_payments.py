"""``boxoffice payments``: the PaymentIntent audit trail (``payment_intents_log``).

It calls ingress's admin API (see ``boxoffice.ops``)."""

from __future__ import annotations

import argparse

from boxoffice.ops import call, with_query


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("payments", help="PaymentIntent idempotency keys: state, Stripe id, "
                                        "attempts, last error (newest first)")
    p.add_argument("--reservation-id", help="only the keys of this reservation")
    p.add_argument("--key", help="only this Idempotency-Key (of any client)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    return call("GET", with_query("/v1/admin/payments", limit=args.limit,
                                  reservation_id=args.reservation_id, idempotency_key=args.key))
