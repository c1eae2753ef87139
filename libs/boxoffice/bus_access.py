"""Who may do what on the bus: one NATS user per service, the operator and the reporter.

``ACCESS`` says, for each service, what it publishes, what its outbox relay publishes, where it
sends requests, what it answers, what it only listens to, which streams it declares and which
durable consumers it reads. Everything else follows from it, in this module only:

- ``permissions(user)``: the user's nats-server permissions, allow lists (nats-server denies
  whatever a list does not allow): the subjects above, the JetStream API calls they need (its
  streams' create, update and info; its durables' create, info and next; acks of its own
  durables only; for the reaper's self-audit, reading the streams it audits without acking),
  and replies on an inbox of its own (``inbox_prefix``), so that no service
  reads another's replies. A service that answers gets ``allow_responses`` (one reply to each
  request it received), never the right to publish on other services' inboxes.
- ``authorization(...)``: the nats-server ``authorization`` block with every user, for
  ``boxoffice up`` and the tests (passwords written in) and for deploy/nats/nats.conf
  (passwords read by nats-server from ``NATS_<USER>_PASSWORD`` in its environment).
- the outbox relays claim only the rows of their own subjects (``ACCESS[...].relays``).

``operator`` may do anything (local tools, ``.boxoffice/stack.env``); ``reporter`` may only
publish error reports (``errors.<service>.<level>``) and read the acknowledgements on its inbox:
the user any other process reports errors with (``NATS_REPORTER_URL``).

Error reports under a fourth token, ``errors.<service>.<level>.<seal>``, are sealed: scrubbed by
their publisher, and stored by the error-sink without scrubbing them again (``boxoffice.scrub``).
Only ingress may publish them; the services' own reports and the reporter's are three tokens.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from boxoffice.wire import admin as admin_wire
from boxoffice.wire import admin_actions as actions_wire
from boxoffice.wire import audit as audit_wire
from boxoffice.wire import errors as errors_wire
from boxoffice.wire import reaper as reaper_wire
from boxoffice.wire import sentry_items as sentry_wire
from boxoffice.wire import stripe as stripe_wire
from boxoffice.wire import subjects as s

OPERATOR = "operator"
REPORTER = "reporter"
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
AUDIT_READER = "AUDIT"  # the self-audit's own consumer (boxoffice.reaper.audit_streams)


@dataclass(frozen=True)
class Access:
    """What one service does on the bus (subjects may end in NATS wildcards)."""

    publishes: tuple[str, ...] = ()  # JetStream subjects it publishes itself
    relays: tuple[str, ...] = ()  # outbox subjects its relay claims and publishes
    requests: tuple[str, ...] = ()  # subjects it sends requests to
    answers: tuple[str, ...] = ()  # subjects it answers (in its queue group)
    watches: tuple[str, ...] = ()  # subjects it only listens to (core NATS, no reply, no ack)
    declares: tuple[str, ...] = ()  # streams it declares at start
    consumes: tuple[tuple[str, str], ...] = ()  # its durable pull consumers: (stream, durable)
    # streams it audits, each with the durable consumer whose progress it checks: the stream's
    # and that consumer's state, and single messages (it never acks, nor touches the consumer)
    audits: tuple[tuple[str, str], ...] = ()
    # streams it reads whole through a consumer of its own named AUDIT_READER (acking nothing)
    reads: tuple[str, ...] = ()


def _owner(subject: str) -> str:
    """``admin.<owner>.>`` of an operator query subject: the owner answers all of its queries."""
    return ".".join(subject.split(".")[:2]) + ".>"


ACCESS: dict[str, Access] = {
    "ingress": Access(
        # Stripe's events (signature checked), clients' error reports for any service, and the
        # operators' actions before it carries them out
        publishes=(*s.STREAMS["STRIPE_EVENTS"], *s.STREAMS["ERRORS"], *s.STREAMS["AUDIT"],
                   sentry_wire.SUBJECTS),  # and what Sentry SDKs send besides errors
        requests=(s.RESERVATIONS_HOLD, s.RESERVATIONS_GET, s.RESERVATIONS_CANCEL,
                  s.PAYMENTS_INTENTS_CREATE, f"{s.ADMIN}.>"),
        declares=("STRIPE_EVENTS", "ERRORS", "AUDIT", sentry_wire.STREAM),
        # the console's live inventory, while one is open (boxoffice.ingress.console)
        watches=(*s.STREAMS["RESERVATIONS"], *s.STREAMS["PAYMENTS"])),
    "payment": Access(
        publishes=(s.error_report("payment", "*"),),
        relays=(s.reservation_event("held"), s.reservation_event("cancelled"),
                s.payment_event("created")),
        # and admin.payment.*: ticketed events and the payments' audit trail
        answers=(s.RESERVATIONS_HOLD, s.RESERVATIONS_GET, s.RESERVATIONS_CANCEL,
                 s.PAYMENTS_INTENTS_CREATE, _owner(admin_wire.EVENTS_CREATE)),
        declares=("RESERVATIONS", "PAYMENTS", "ERRORS")),
    "webhook": Access(
        # reconciliation feeds the events that webhooks missed into the same stream, read from
        # Stripe's own API: the one consumer of STRIPE_EVENTS applies them like any other
        publishes=(*s.STREAMS["STRIPE_EVENTS"], s.error_report("webhook", "*")),
        relays=(s.reservation_event("completed"), s.reservation_event("cancelled"),
                s.payment_event("succeeded"), s.payment_event("failed"),
                s.payment_event("refunded")),
        # admin.webhooks.*, and admin.webhook.* (its part of the self-audit)
        answers=(_owner(stripe_wire.EVENTS_LIST), _owner(audit_wire.RUN_WEBHOOK)),
        declares=("STRIPE_EVENTS", "PAYMENTS", "RESERVATIONS", "ERRORS"),
        consumes=(s.WEBHOOK_CONSUMER,)),
    "error_sink": Access(
        publishes=(s.alert(">"), s.error_report("error_sink", "*")),
        answers=(_owner(errors_wire.GROUPS_LIST),),
        declares=("ERRORS", "ALERTS", sentry_wire.STREAM),
        consumes=(s.ERROR_SINK_CONSUMER, sentry_wire.CONSUMER)),
    "reaper": Access(
        publishes=(s.error_report("reaper", "*"),),
        relays=(s.reservation_event("expired"),),
        # admin.reaper.*, and admin.actions.*: the operators' action log it keeps (AUDIT)
        answers=(_owner(reaper_wire.STATS), _owner(actions_wire.LIST)),
        declares=("RESERVATIONS", "ERRORS", s.ADMIN_ACTIONS_CONSUMER[0]),
        consumes=(s.ADMIN_ACTIONS_CONSUMER,),
        # the self-audit: every report on the bus stored, no Stripe event left waiting
        audits=(s.ERROR_SINK_CONSUMER, s.WEBHOOK_CONSUMER), reads=("ERRORS",)),
}
USERS = (OPERATOR, REPORTER, *ACCESS)


def inbox_prefix(user: str) -> str:
    """Where ``user`` receives replies and acknowledgements: nobody else may subscribe there."""
    return f"_INBOX_{user}"


def matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` (``*`` one token, ``>`` the rest) covers ``subject``,
    itself a subject or a pattern (then every subject it matches must be covered)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or have[i] == ">" or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


def may_publish(user: str, subject: str) -> bool:
    """Whether ``user``'s permissions let it publish ``subject``."""
    return any(matches(p, subject) for p in permissions(user)["publish"]["allow"])


def permissions(user: str) -> dict:
    """``user``'s permissions as nats-server takes them (allow lists: the rest is denied)."""
    inbox = f"{inbox_prefix(user)}.>"
    if user == OPERATOR:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if user == REPORTER:
        # a JetStream publish is a request: the acknowledgement comes back on the inbox
        return {"publish": {"allow": [s.error_report("*", "*")]},
                "subscribe": {"allow": [inbox]}}
    a = ACCESS[user]
    publish = [*a.publishes, *a.relays, *a.requests]
    publish += [f"$JS.API.STREAM.{verb}.{stream}" for stream in a.declares
                for verb in ("INFO", "CREATE", "UPDATE")]
    for stream, durable in a.consumes:
        publish += [f"$JS.API.CONSUMER.{verb}.{stream}.{durable}"
                    for verb in ("CREATE", "DURABLE.CREATE", "INFO", "MSG.NEXT")]
        publish.append(f"$JS.ACK.{stream}.{durable}.>")
    for stream, durable in a.audits:
        publish += [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}",
                    f"$JS.API.CONSUMER.INFO.{stream}.{durable}"]
    publish += [f"$JS.API.CONSUMER.{verb}.{stream}.{AUDIT_READER}" for stream in a.reads
                for verb in ("CREATE", "DELETE", "MSG.NEXT")]
    publish = list(dict.fromkeys(publish))  # (a stream declared and audited: once)
    out: dict = {"publish": {"allow": publish},
                 "subscribe": {"allow": [*a.answers, *a.watches, inbox]}}
    if a.answers:
        out["allow_responses"] = True
    return out


def password_variable(user: str) -> str:
    """The variable holding ``user``'s password in deploy/nats/nats.conf's environment."""
    return f"NATS_{user.upper()}_PASSWORD"


def new_password() -> str:
    """A random password: URL-safe (it goes into ``NATS_URL`` as it is) and starting with a
    letter (nats-server reads a ``$VARIABLE`` that starts with a digit or ``-`` as a number)."""
    return "p" + secrets.token_urlsafe(24)


def authorization(passwords: Mapping[str, str] | None = None) -> str:
    """The nats-server ``authorization`` block for every user in ``USERS``.

    With ``passwords`` they are written in (keep the file private); without, each is read by
    nats-server from the variable ``password_variable(user)`` of its environment.
    """
    lines = ["authorization {", "  users = ["]
    for user in USERS:
        password = json.dumps(passwords[user]) if passwords is not None \
            else f"${password_variable(user)}"
        perms = permissions(user)
        lines.append(f"    {{user: {json.dumps(user)}, password: {password}, permissions: {{")
        for kind in ("publish", "subscribe"):
            items = [json.dumps(x) for x in perms[kind]["allow"]]
            if len(", ".join(items)) <= 70:
                lines.append(f"      {kind}: {{allow: [{', '.join(items)}]}}")
                continue
            lines.append(f"      {kind}: {{allow: [")
            row = ""
            for item in items:  # a few per line
                if row and len(row) + len(item) > 88:
                    lines.append(f"        {row.rstrip()}")
                    row = ""
                row += f"{item}, "
            lines += [f"        {row.rstrip(', ')}", "      ]}"]
        if perms.get("allow_responses"):
            lines.append("      allow_responses: true")
        lines.append("    }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m boxoffice.bus_access``: print the ``authorization`` block of
    deploy/nats/nats.conf (passwords from nats-server's environment)."""
    print(authorization(), end="")


def with_user(url: str, user: str, password: str) -> str:
    """``url`` (comma-separated servers) with ``user`` and ``password`` on every server.

    Both must be URL-safe as they are (letters, digits, ``-``, ``_``): NATS clients take the
    user and password from the URL without decoding them.
    """
    if not _URL_SAFE.fullmatch(user) or not _URL_SAFE.fullmatch(password):
        raise ValueError("NATS user names and passwords must be letters, digits, - and _")
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.netloc.rpartition("@")[2]
        out.append(urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}")))
    return ",".join(out)


def without_user(url: str) -> str:
    """``url`` with no credentials: what may be printed, and what names the bus."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        out.append(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    return ",".join(out)


def user_of(url: str) -> str | None:
    """The user ``url`` connects as (the first server's), or None when anonymous."""
    return urlsplit(url.split(",")[0].strip()).username or None


if __name__ == "__main__":
    main()
