"""Validation errors in words: every pattern of the wire types has words for people, and ingress
answers a bad body or query with them ("event_id must be a UUID"), never a regular expression."""

from __future__ import annotations

import json

import aiohttp
import msgspec
import pytest

from boxoffice.asyncapi import document
from boxoffice.ingress.contract import openapi
from boxoffice.wire import admin, reservations
from boxoffice.wire import errors as errw
from boxoffice.wire.words import _PATTERNS, _UUIDISH, describe
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN

U = "0b6f7f52-86a4-4b8e-9a55-1d1c7e0a2c11"


def _patterns(node: object) -> set[str]:
    if isinstance(node, dict):
        own = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return own.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


def test_every_pattern_of_the_wire_types_has_words() -> None:
    # the published documents write \Z as $ (ECMA-262); the wire types as Python has them
    known = {p.replace(r"\Z", "$") for p in _PATTERNS}
    for pattern in _patterns(openapi()) | _patterns(document()):
        if pattern.startswith(_UUIDISH) or pattern in known:
            continue
        if pattern in (r"^[0-9]{1,18}$",):  # a path's project id: the router says 404
            continue
        pytest.fail(f"no words for pattern {pattern!r}: add it to boxoffice.wire.words")


@pytest.mark.parametrize("type_, body, words", [
    (reservations.HoldBody, {"event_id": "x", "quantity": 1}, "event_id must be a UUID"),
    (reservations.HoldBody, {"event_id": U, "quantity": 0}, "quantity must be at least 1"),
    (reservations.HoldBody, {"event_id": U, "quantity": 101}, "quantity must be at most 100"),
    (reservations.HoldBody, {"quantity": 1}, "event_id is required"),
    (reservations.HoldBody, {"event_id": U, "quantity": "1"},
     "quantity must be an integer, not a string"),
    (reservations.HoldBody, {"event_id": U, "quantity": 1, "zzz": 1},
     "zzz is not a field of this request"),
    (reservations.HoldBody, [], "the body must be an object, not an array"),
    (reservations.HoldBody, {"event_id": U, "quantity": 1, "customer_ref": ""},
     "customer_ref must not be empty"),
    (reservations.HoldBody, {"event_id": U, "quantity": 1, "customer_ref": "a\u0001"},
     "customer_ref must be text without control characters"),
    (admin.CreateEvent, {"name": "a", "capacity": 1, "price": 1, "currency": "euro"},
     "currency must be a three-letter currency code such as eur"),
    (errw.ListGroups, {"status": "x"}, "status is not one of the allowed values"),
    (errw.ListGroups, {"since": "x"},
     "since must be a date and time (RFC 3339, e.g. 2026-12-01T18:00:00Z)"),
    (errw.ErrorReport, {"id": U, "occurred_at": "2026-01-01T00:00:00Z", "service": "a b",
                        "level": "error", "message": "m"},
     "service must be made of letters, digits, _ and -"),
])
def test_words(type_: type, body: object, words: str) -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.json.decode(json.dumps(body), type=type_, strict=True)
    assert describe(exc.value) == words


async def test_ingress_answers_in_words(start_service) -> None:
    ingress = start_service("ingress")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{ingress.url}/v1/reservations", json={"event_id": "nope", "quantity": 1},
                          headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as r:
            problem = await r.json(content_type=None)
            assert (r.status, problem["code"], problem["detail"]) == (
                422, "validation_failed", "event_id must be a UUID")
        async with s.get(f"{ingress.url}/v1/admin/payments?limit=0",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            problem = await r.json(content_type=None)
            assert (r.status, problem["detail"]) == (422, "limit must be at least 1")
