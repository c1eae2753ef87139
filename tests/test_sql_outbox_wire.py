"""The outbox events the SQL functions build decode strictly into their wire structs, kind by
kind, and every subject the SQL writes to the outbox is one the wire module builds and a service
relays (the subject literals stay in SQL so that each function keeps one round trip; this test
keeps them equal to ``boxoffice.wire.subjects``)."""

from __future__ import annotations

import json
import re

import asyncpg
import msgspec
import pytest

from boxoffice import bus_access, migrate
from boxoffice.wire import subjects
from boxoffice.wire.payments import PaymentEvent
from boxoffice.wire.reservations import ReservationEvent
from tests.sql_support import hold, new_event, outbox, pi


class StrictReservationEvent(ReservationEvent, forbid_unknown_fields=True):
    pass


class StrictPaymentEvent(PaymentEvent, forbid_unknown_fields=True):
    pass


STRUCTS = {subjects.reservation_event(""): StrictReservationEvent,
           subjects.payment_event(""): StrictPaymentEvent}
RELAYED = {subject for access in bus_access.ACCESS.values() for subject in access.relays}
# built in SQL, kind by kind (payments.events.created is built in Python: record_payment_intent
# stores the event its caller encoded from the struct)
BUILT_IN_SQL = {subjects.reservation_event(k) for k in ("held", "expired", "completed",
                                                          "cancelled")} | {
    subjects.payment_event(k) for k in ("succeeded", "failed", "refunded")}


def strict(subject: str, payload: dict) -> msgspec.Struct:
    [struct] = [t for prefix, t in STRUCTS.items() if subject.startswith(prefix)]
    # required fields present, types exact, no field the struct does not know (optional ones,
    # such as a held event's payment_intent_id, may be left out)
    return msgspec.json.decode(json.dumps(payload).encode(), type=struct)


async def test_every_event_built_in_sql_decodes_strictly(db: asyncpg.Pool) -> None:
    ev = await new_event(db, capacity=20)
    held, ended, overdue, sold, refunded = [(await hold(db, ev))["id"] for _ in range(5)]
    await db.execute("SELECT release_reservation($1, 'cancelled')", ended)
    await db.execute("SELECT release_reservation($1, 'expired')", held)
    await db.execute("UPDATE reservations SET expires_at = now() - interval '1 second' "
                     "WHERE id = $1", overdue)
    assert await db.fetchval("SELECT count(*) FROM reap_due_reservations(10, $1)", ev) == 1
    p, p2 = pi(), pi()
    assert await db.fetchval("SELECT complete_reservation($1, $2)", sold, p) == "completed"
    assert await db.fetchval("SELECT complete_reservation($1, $2)", refunded, p2) == "completed"
    assert await db.fetchval("SELECT return_reservation_tickets($1, $2)", refunded, p2) == \
        "returned"  # the cancelled event that says why: refunded
    for kind in ("succeeded", "failed", "refunded"):
        await db.execute("SELECT emit_payment_event($1, $2, $3, 5000, 'eur', now(), $4)",
                         kind, p, sold, "requested_by_customer" if kind == "refunded" else None)
    await db.execute("SELECT emit_payment_event('succeeded', $1, NULL, 700, 'usd', now())", pi())

    rows = await outbox(db)
    assert {subject for subject, _ in rows} == BUILT_IN_SQL
    events = [strict(subject, payload) for subject, payload in rows]
    ours = {str(r) for r in (held, ended, overdue, sold, refunded)}
    assert all(e.reservation_id in ours for e in events if isinstance(e, ReservationEvent))
    assert any(isinstance(e, ReservationEvent) and e.reason == "refunded" for e in events)


def test_a_field_the_struct_lacks_is_refused() -> None:
    # the check above can fail: an extra or missing field, or a wrong type, is caught
    payload = {"payment_intent_id": "pi_1", "reservation_id": None, "amount": 1,
               "currency": "eur", "occurred_at": "2026-12-01T00:00:00Z", "reason": None}
    strict(subjects.payment_event("failed"), payload)
    with pytest.raises(msgspec.ValidationError):
        strict(subjects.payment_event("failed"), {**payload, "surprise": 1})
    with pytest.raises(msgspec.ValidationError):
        strict(subjects.payment_event("failed"), {**payload, "amount": "1"})


LITERAL = re.compile(r"'((?:reservations|payments)\.events\.[a-z_]*)'")


def sql_subjects() -> set[str]:
    found = set()
    for name in migrate.FUNCTION_FILES:
        for line in (migrate.FUNCTIONS_DIR / name).read_text().splitlines():
            found |= set(LITERAL.findall(line.split("--", 1)[0]))  # code, not comments
    return found


def test_every_subject_in_sql_is_built_by_the_wire_module_and_relayed() -> None:
    found = sql_subjects()
    prefixes = {s for s in found if s.endswith(".")}
    # a prefix completed in SQL by the function's kind argument
    assert prefixes <= {subjects.reservation_event(""), subjects.payment_event("")}, prefixes
    # and every full subject is one a service relays (bus_access, built by wire.subjects)
    assert found - prefixes <= RELAYED, found - prefixes - RELAYED
    assert BUILT_IN_SQL <= RELAYED
    assert subjects.reservation_event("held") in found and prefixes  # the scan finds them
