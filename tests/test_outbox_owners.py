"""Only the owner of an outbox event publishes it: every subject that the SQL functions write to
the outbox is relayed by exactly the service that calls them (whose NATS user alone may publish
it), and a relay leaves the rows of other services' subjects alone.

The subjects are read from the functions as the database has them (``pg_proc``), a subject
built from a parameter (``'payments.events.' || p_kind``) resolved from the literals its
callers pass, in SQL and in the services' Python; which service calls which function is read
from the SQL in each service's code. A new ``INSERT INTO outbox`` of another shape stops the test
until it is taught to read it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import asyncpg

from boxoffice import bus as busmod
from boxoffice import bus_access, outbox
from boxoffice.wire.subjects import reservation_event

ROOT = Path(__file__).resolve().parent.parent
# What a service's transactions write but another service relays, and why.
HANDED_OVER = {
    # a hold on a sold-out event first expires the event's overdue holds (hold_tickets), and
    # so may re-selling an ended hold (complete_reservation): expiries are the reaper's to
    # announce, its relay woken by the outbox's NOTIFY like any other
    ("payment", reservation_event("expired")): "reaper",
    ("webhook", reservation_event("expired")): "reaper",
    # re-selling an ended hold takes its tickets through hold_tickets, then deletes the hold
    # it made, its held row with it, in the same transaction: it never reaches a relay
    ("webhook", reservation_event("held")): None,
}
_INSERT = re.compile(r"INSERT\s+INTO\s+outbox\b", re.I)
# (an id given with the row, as hold_tickets_batch draws them, comes before the subject)
_SUBJECT = re.compile(r"INSERT\s+INTO\s+outbox\s*\(\s*(?:id\s*,\s*)?subject\s*,\s*payload\s*\)\s*"
                      r"(?:VALUES\s*\(|SELECT\s+)(?:[\w.]+\s*,\s*)?'(?P<lit>[^']*)'"
                      r"(?:\s*\|\|\s*(?P<param>\w+))?", re.I)


def _args(text: str, start: int) -> list[str]:
    """The top-level arguments of the call whose ``(`` is at ``start``."""
    depth, out, current = 0, [], ""
    for ch in text[start:]:
        if ch == "(":
            depth += 1
            if depth == 1:
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(current.strip())
                return out
        elif ch == "," and depth == 1:
            out.append(current.strip())
            current = ""
            continue
        current += ch
    raise AssertionError(f"unbalanced call: {text[start:start + 80]}")


def _literals(arg: str) -> set[str]:
    """The values an argument can take: a literal, or the results of a CASE of literals."""
    if m := re.fullmatch(r"'([^']*)'", arg):
        return {m[1]}
    if arg.upper().startswith("CASE"):
        return set(re.findall(r"(?:THEN|ELSE)\s+'([^']*)'", arg, re.I))
    raise AssertionError(f"an outbox subject built from {arg!r}: teach this test its values")


def _calls(text: str, name: str) -> list[list[str]]:
    return [_args(text, m.end() - 1) for m in re.finditer(rf"\b{name}\s*\(", text)]


def _python_sql(service: str) -> str:
    """Every string in a service's code (its SQL among them)."""
    out = []
    for path in (ROOT / "services" / service).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return "\n".join(out)


async def _functions(db: asyncpg.Pool) -> dict[str, tuple[str, list[str], list[str | None]]]:
    """name -> (body, parameter names, defaults as SQL text or None), public functions."""
    rows = await db.fetch(
        "SELECT proname, prosrc, coalesce(proargnames, '{}') AS names, pronargdefaults, "
        "pg_get_expr(proargdefaults, 0) AS defaults FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace AND prokind = 'f'")
    out = {}
    for r in rows:
        names = list(r["names"])
        defaults: list[str | None] = [None] * len(names)
        if r["defaults"]:
            given = [d.strip().split("::")[0] for d in _args(f"({r['defaults']})", 0)]
            defaults[len(names) - len(given):] = given
        assert r["proname"] not in out, f"{r['proname']} is overloaded: teach this test"
        out[r["proname"]] = (r["prosrc"], names, defaults)
    return out


async def _written(db: asyncpg.Pool) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(subjects each function writes, itself or through the functions it calls;
    functions each service's code calls)."""
    functions = await _functions(db)
    everything = "\n".join(body for body, _, _ in functions.values())
    services = {s: _python_sql(s) for s in bus_access.ACCESS}
    direct: dict[str, set[str]] = {}
    for name, (body, params, defaults) in functions.items():
        found = list(_SUBJECT.finditer(body))
        subjects = set()
        # an INSERT of rows selected from a subquery names each subject as `'...' AS subject`
        # (every branch of a UNION, so that this test reads them all), up to its statement's end
        for insert in _INSERT.finditer(body):
            if any(m.start() == insert.start() for m in found):
                continue
            statement = body[insert.end():body.find(";", insert.end())]
            named = re.findall(r"'([^']*)'\s+AS\s+subject\b", statement, re.I)
            branches = len(re.findall(r"\bUNION\b", statement, re.I)) + 1
            assert len(named) == branches, f"{name}: an INSERT INTO outbox this test cannot read"
            subjects |= set(named)
        for m in found:
            if m["param"] is None:
                subjects.add(m["lit"])
                continue
            position = params.index(m["param"])
            values = set()
            for text in (everything, *services.values()):  # every call site, SQL and Python
                for args in _calls(text, name):
                    if position < len(args):
                        values |= _literals(args[position])
                    else:
                        values |= _literals(defaults[position] or "NULL")
            subjects |= {m["lit"] + v for v in values}
        direct[name] = subjects
    calls = {name: {other for other in functions if other != name and re.search(
        rf"\b{other}\s*\(", body)} for name, (body, _, _) in functions.items()}

    def closure(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(direct[name])
        for other in calls[name] - seen:
            out |= closure(other, seen | {name})
        return out

    writes = {name: closure(name) for name in functions}
    used = {s: {f for f in functions if re.search(rf"\b{f}\s*\(", text)}
            for s, text in services.items()}
    return writes, used


async def test_every_outbox_subject_is_relayed_by_the_service_that_writes_it(db) -> None:
    writes, used = await _written(db)
    every = set().union(*writes.values())
    assert {"reservations.events.held", "reservations.events.expired",
            "payments.events.created", "payments.events.refunded"} <= every  # (it reads them)
    relayed = {s for a in bus_access.ACCESS.values() for s in a.relays}
    # a row that no relay may publish would wait in the outbox forever
    assert every <= relayed, f"written, relayed by nobody: {sorted(every - relayed)}"
    for service, access in bus_access.ACCESS.items():
        mine = set().union(set(), *(writes[f] for f in used[service]))
        assert set(access.relays) <= mine, f"{service} may publish what it never writes"
        handed = {s for (owner, s) in HANDED_OVER if owner == service}
        assert mine - set(access.relays) == handed, (service, sorted(mine - set(access.relays)))
        for subject in handed:
            if (heir := HANDED_OVER[service, subject]) is not None:
                assert subject in bus_access.ACCESS[heir].relays, (service, subject, heir)
    # the operators' SQL (cleanup_expired_reservations) writes only what the reaper relays
    assert writes["cleanup_expired_reservations"] == {reservation_event("expired")}


async def test_a_relay_leaves_other_services_rows_alone(nats_url: str, db) -> None:
    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("RESERVATIONS")
        async with db.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox (subject, payload) VALUES ('reservations.events.held', '{}'), "
                "('reservations.events.expired', '{}'), ('reservations.events.completed', '{}')")
        assert await outbox.publish_batch(db, bus, bus_access.ACCESS["payment"].relays) == 1
        left = {r["subject"] for r in await db.fetch("SELECT subject FROM outbox")}
        assert left == {"reservations.events.expired", "reservations.events.completed"}
        assert await outbox.publish_batch(db, bus, bus_access.ACCESS["reaper"].relays) == 1
        assert await outbox.publish_batch(db, bus, bus_access.ACCESS["webhook"].relays) == 1
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
