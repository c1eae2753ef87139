"""Commands for the stack on this machine (``boxoffice up``):

- ``boxoffice logs [service] [-n N] [-f]``: the services' JSON log lines from
  ``.boxoffice/logs/``, one readable line each (time, level, service, message, request id);
- ``boxoffice dev pay <payment_intent> [--card N]``: pay a PaymentIntent at localstripe the way
  a test card would, so that Stripe's webhook reaches ingress and the hold is sold;
- ``boxoffice dev webhook-outage on|off``: a drill on a development stack: while on, recording a
  payment as succeeded fails in the database, so Stripe's payment events fail, are retried, are
  marked failed and reported, as they would in a real outage; off, they can be replayed.

They read ``.boxoffice/stack.env`` (``BOXOFFICE_HOME``) where the environment does not say.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from boxoffice import SERVICES, stack

SUCCEEDS = "4242424242424242"  # the test card that pays; 4000000000000341 is declined


def _setting(name: str) -> str | None:
    if os.environ.get(name):
        return os.environ[name]
    path = stack.home() / "stack.env"
    return stack.read_env(path).get(name) if path.exists() else None


def readable(line: str) -> str:
    """One JSON log line as ``time level service: message (key=value ...)``; other text as is."""
    try:
        rec: dict[str, Any] = json.loads(line)
    except ValueError:
        return line.rstrip("\n")
    if not isinstance(rec, dict):
        return line.rstrip("\n")
    head = (f"{rec.pop('ts', '')} {str(rec.pop('level', '')).upper():<7} "
            f"{rec.pop('service', '')}: {rec.pop('msg', '')}")
    rec.pop("logger", None)
    stack_text = rec.pop("stack", None)
    extra = " ".join(f"{k}={v}" for k, v in rec.items())
    return head + (f"  ({extra})" if extra else "") + (f"\n{stack_text}" if stack_text else "")


def _files(service: str | None) -> list[Path]:
    logs = stack.home() / "logs"
    names = [service] if service else [*SERVICES, "localstripe"]
    files = []
    for n in names:  # a service's replicas (BOXOFFICE_REPLICAS) log to <service>-<n>.log
        replicas = sorted(logs.glob(f"{n}-[0-9]*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        files += [p for p in [logs / f"{n}.log", *replicas] if p.exists()]
    return files


def _tail(path: Path, n: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024 * max(1, n // 100)))
        lines = f.read().decode(errors="replace").splitlines()
    return lines[-n:] if n else []


def cmd_logs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.service and args.service not in SERVICES:
        print(f"boxoffice logs: unknown service {args.service!r} (one of {', '.join(SERVICES)})",
              file=sys.stderr)
        return 2
    files = _files(args.service)
    if not files:
        print(f"boxoffice logs: no logs in {stack.home() / 'logs'} (start with `boxoffice up`)",
              file=sys.stderr)
        return 2
    lines = [(line, path) for path in files for line in _tail(path, args.lines)]
    # one timeline: JSON lines start with their ISO time, which sorts as text
    lines.sort(key=lambda lp: lp[0][8:37] if lp[0].startswith('{"ts":"') else "")
    for line, _ in lines[-args.lines:] if args.lines else []:
        print(readable(line), file=out, flush=True)
    if not args.follow:
        return 0
    handles = {p: open(p, errors="replace") for p in files}  # noqa: SIM115 - followed until Ctrl-C
    for h in handles.values():
        h.seek(0, os.SEEK_END)
    try:
        while True:
            quiet = True
            for h in handles.values():
                while line := h.readline():
                    quiet = False
                    print(readable(line), file=out, flush=True)
            if quiet:
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        for h in handles.values():
            h.close()


def cmd_pay(args: argparse.Namespace) -> int:
    import stripe

    from boxoffice import stripe_api

    base, key = _setting("STRIPE_API_BASE"), _setting("STRIPE_API_KEY")
    if not base or not key:
        print("boxoffice dev pay: STRIPE_API_BASE and STRIPE_API_KEY are needed (localstripe's, "
              "from .boxoffice/stack.env)", file=sys.stderr)
        return 2
    if not key.startswith("sk_test_"):
        print("boxoffice dev pay: only with a test key (localstripe or Stripe's test mode)",
              file=sys.stderr)
        return 2
    client = stripe_api.client(key, base)
    try:
        pm = client.v1.payment_methods.create(params={"type": "card", "card": {
            "number": args.card, "exp_month": 12, "exp_year": 2040, "cvc": "123"}})
        client.v1.payment_intents.update(args.payment_intent, params={"payment_method": pm.id})
        pi = client.v1.payment_intents.confirm(args.payment_intent)
    except stripe.StripeError as exc:
        print(f"boxoffice dev pay: {exc.user_message or type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"{pi.id}: {pi.status}")
    return 0 if pi.status == "succeeded" else 1


OUTAGE_ON = """
CREATE OR REPLACE FUNCTION boxoffice_webhook_outage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'webhook outage drill: boxoffice dev webhook-outage off ends it';
END $$;
DROP TRIGGER IF EXISTS boxoffice_webhook_outage ON payments;
CREATE TRIGGER boxoffice_webhook_outage BEFORE INSERT OR UPDATE ON payments
    FOR EACH ROW WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION boxoffice_webhook_outage();
"""
OUTAGE_OFF = """
DROP TRIGGER IF EXISTS boxoffice_webhook_outage ON payments;
DROP FUNCTION IF EXISTS boxoffice_webhook_outage();
"""


def cmd_webhook_outage(args: argparse.Namespace) -> int:
    """Refuse (``on``) or allow again (``off``) recording a payment as succeeded: a drill, for
    the stack of ``boxoffice up`` only (its operator's ``DATABASE_URL``)."""
    import asyncio

    from boxoffice import db
    from boxoffice.db import operator_connect

    url = _setting("DATABASE_URL")
    if not url or (_setting("BOXOFFICE_ENV") or "development") != "development":
        print("boxoffice dev webhook-outage: only on a development stack (boxoffice up's "
              "DATABASE_URL, BOXOFFICE_ENV unset or development)", file=sys.stderr)
        return 2

    async def run() -> None:
        conn = await operator_connect(url)
        try:
            await conn.execute(OUTAGE_ON if args.state == "on" else OUTAGE_OFF)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except db.FAILURES as exc:
        print(f"boxoffice dev webhook-outage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("webhook outage drill " + ("on: payments are refused" if args.state == "on"
                                     else "off: payments are recorded again"))
    return 0


def add_commands(sub: argparse._SubParsersAction, dev: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="the services' logs (from boxoffice up), readable")
    p.add_argument("service", nargs="?", help="one of " + ", ".join(SERVICES) + " (default all)")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show first (50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=cmd_logs)
    p = dev.add_parser("pay", help="pay a PaymentIntent at localstripe as a test card would")
    p.add_argument("payment_intent")
    p.add_argument("--card", default=SUCCEEDS,
                   help=f"card number ({SUCCEEDS}: succeeds, 4000000000000341: declined)")
    p.set_defaults(func=cmd_pay)
    p = dev.add_parser("webhook-outage", help="a drill: Stripe's payment events fail while on "
                       "(development stacks only)")
    p.add_argument("state", choices=("on", "off"))
    p.set_defaults(func=cmd_webhook_outage)
