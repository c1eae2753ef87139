"""Routes.ask: an operator route built from its one description (its behaviour over a live
stack is covered route by route in test_reaper_admin, test_console, test_errors_sentry_monitors,
test_contract); here, what the description yields and what it refuses to build."""

from __future__ import annotations

import msgspec
import pytest

from boxoffice.ingress.routing import Routes


class Query(msgspec.Struct, forbid_unknown_fields=True):
    thing_id: str
    limit: int = 10


class Answer(msgspec.Struct):
    n: int


def test_a_get_reads_its_request_from_the_query_and_documents_it_so() -> None:
    routes = Routes()
    routes.ask("GET /v1/admin/things/{thing_id}", "A thing", "admin", "admin.things.get",
               Query, Answer)
    (op,) = routes.ops
    assert (op.method, op.path, op.auth) == ("GET", "/v1/admin/things/{thing_id}", "admin")
    assert op.query is Query and op.body is None and op.ok == (200, Answer)
    (route,) = routes.table
    assert route.method == "GET"  # type: ignore[union-attr]
    assert not hasattr(route.handler, "__wrapped__")  # type: ignore[union-attr]  # not an action


def test_a_post_reads_its_body_with_its_status_and_an_operate_route_is_recorded() -> None:
    routes = Routes()
    routes.ask("POST /v1/admin/things", "Make a thing", "operate", "admin.things.make",
               Answer, Answer, status=201, body_required=False)
    (op,) = routes.ops
    assert op.body is Answer and op.query is None and op.ok == (201, Answer)
    assert op.body_required is False
    (route,) = routes.table
    # the handler is wrapped by http.operate, which records the action before it runs
    assert route.handler.__wrapped__.__qualname__.endswith("handler")  # type: ignore[union-attr]


def test_what_ask_refuses_to_build() -> None:
    with pytest.raises(ValueError, match="operators' routes"):
        Routes().ask("GET /v1/things", "Things", "client", "things.list", Query, Answer)
    with pytest.raises(ValueError, match="a body and path parameters"):
        Routes().ask("POST /v1/admin/things/{thing_id}", "Change", "operate", "things.set",
                     Query, Answer)
