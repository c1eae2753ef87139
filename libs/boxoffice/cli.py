"""The ``boxoffice`` command: run a service, the local stack, migrations, operator commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from boxoffice import SERVICES


def _service_name(name: str) -> str:
    return name.replace("-", "_")


def cmd_run(args: argparse.Namespace) -> int:
    service = _service_name(args.service)
    if service not in SERVICES:
        print(f"boxoffice: unknown service {args.service!r} (one of {', '.join(SERVICES)})",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"boxoffice.{service}.main").main()


def cmd_migrate(args: argparse.Namespace) -> int:
    from boxoffice import migrate
    from boxoffice.config import ConfigError, _url

    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:  # like the other operator commands: the local stack's, from stack.env
        from boxoffice import stack
        kept = stack.home() / "stack.env"
        url = stack.read_env(kept).get("DATABASE_URL", "") if kept.exists() else ""
    try:
        if not url:
            raise ConfigError("DATABASE_URL", "is required but not set")
        _url("DATABASE_URL", url, ("postgres", "postgresql"))
    except ConfigError as exc:
        print(f"boxoffice migrate: {exc}", file=sys.stderr)
        return 2
    command = "down" if args.down else ("status" if args.status else "up")
    result = migrate.run(url, command, check=False)
    out = (result.stdout + result.stderr).strip()
    if out:
        print(out.replace(url, "<DATABASE_URL>"))
    if result.returncode != 0 or command != "up":
        return result.returncode
    return _set_role_logins(url)


def _set_role_logins(url: str) -> int:
    """Give each service role whose PG_<SERVICE>_PASSWORD is set LOGIN and that password."""
    from boxoffice import db, roles

    passwords = {service: os.environ[var] for service in roles.ROLES
                 if os.environ.get(var := roles.password_variable(service))}
    if not passwords:
        return 0
    try:
        roles.set_logins(url, passwords)  # (each statement bounded: a standby down is said)
    except db.FAILURES as exc:  # (no server taking writes, among others)
        print(f"boxoffice migrate: cannot set the service roles' logins: {type(exc).__name__}: "
              f"{exc}", file=sys.stderr)
        return 1
    print("logins set: " + ", ".join(roles.ROLES[s] for s in passwords))
    return 0


def cmd_up(_: argparse.Namespace) -> int:
    from boxoffice import stack
    return stack.up()


def cmd_status(_: argparse.Namespace) -> int:
    from boxoffice import stack
    return stack.status()


def cmd_configure_localstripe(args: argparse.Namespace) -> int:
    """Point the localstripe emulator's webhooks at ingress (development stacks only)."""
    import time
    import urllib.error

    from boxoffice.embedded import configure_localstripe_webhook

    base = os.environ.get("STRIPE_API_BASE", "").strip()
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "").split(",")[0].strip()
    if not base or not secret:
        print("boxoffice dev: STRIPE_API_BASE and STRIPE_WEBHOOK_SECRET are required", file=sys.stderr)
        return 2
    for _ in range(30):
        try:
            configure_localstripe_webhook(base, args.url, secret)
            print(f"localstripe webhooks -> {args.url}")
            return 0
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    print(f"boxoffice dev: cannot reach {base}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from boxoffice import __version__
    parser = argparse.ArgumentParser(prog="boxoffice", description=__doc__)
    parser.add_argument("--version", action="version", version=f"boxoffice {__version__}")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print answers as JSON (the default "
                     "when the output is no terminal); also after the command")
    out.add_argument("--table", action="store_true", help="print answers as tables (the default "
                     "on a terminal); also after the command")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one service: " + ", ".join(SERVICES))
    p.add_argument("service")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("migrate", help="apply migrations and then the functions (or --down: roll "
                       "back one migration); then give each "
                       "service role whose PG_<SERVICE>_PASSWORD is set LOGIN and that password")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--down", action="store_true", help="roll back the newest migration")
    g.add_argument("--status", action="store_true",
                   help="list applied and pending migrations; are the functions current")
    p.set_defaults(func=cmd_migrate)
    sub.add_parser("up", help="run the whole stack on this machine").set_defaults(func=cmd_up)
    sub.add_parser("status", help="exit 0 once every service is ready").set_defaults(func=cmd_status)
    p = sub.add_parser("dev", help="development helpers")
    d = p.add_subparsers(dest="dev_command", required=True)
    c = d.add_parser("configure-localstripe", help="point localstripe's webhooks at ingress")
    c.add_argument("--url", required=True, help="ingress webhook URL")
    c.set_defaults(func=cmd_configure_localstripe)
    from boxoffice import local_tools
    local_tools.add_commands(sub, d)
    from boxoffice import ops
    ops.add_commands(sub)
    # --json and --table are taken anywhere on the line; a command's own --json stays its own
    args, extra = parser.parse_known_args(argv)
    if set(extra) - {"--json", "--table"} or len(set(extra)) > 1:
        parser.error(f"unrecognized or conflicting arguments: {' '.join(extra)}")
    if extra:
        setattr(args, extra[0].lstrip("-"), True)
    if getattr(args, "json", False) and getattr(args, "table", False):
        parser.error("conflicting arguments: --json and --table")
    ops.OUTPUT["mode"] = ("json" if getattr(args, "json", False)
                          else "table" if getattr(args, "table", False) else "auto")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
