"""The log of operators' actions: who did what, when, to what, and how it ended.

Ingress publishes an action on the ``AUDIT`` stream before carrying it out
(``audit.actions.begun``; if JetStream does not acknowledge it, the action is refused and nothing
is done) and its outcome after (``audit.actions.finished``). The reaper keeps the stream in
``admin_actions`` and answers ``admin.actions.list``. Recording needs only the bus that ingress
needs anyway: no service has to be up for an operator to act. The actor is a token's id (a
digest, ``a_<hex>``), never the token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from boxoffice.wire import Event, Message
from boxoffice.wire.reservations import TEXT

BEGUN = "audit.actions.begun"
FINISHED = "audit.actions.finished"
LIST = "admin.actions.list"

ActionId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}\Z")]


class Begun(Event):
    id: ActionId
    at: datetime
    actor: str
    action: str               # the route: "POST /v1/admin/webhooks/events/{event_id}/replay"
    target: str               # the path acted on
    request_id: str = ""


class Finished(Event):
    id: ActionId
    at: datetime
    status: int               # the HTTP status answered


class ListRequest(Message):
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    # no control characters: PostgreSQL's text cannot hold NUL (a 500 found by Schemathesis)
    actor: Annotated[str, msgspec.Meta(max_length=80, pattern=TEXT)] | None = None


class Action(msgspec.Struct):
    id: str
    at: datetime
    actor: str
    action: str
    target: str
    request_id: str
    status: int | None        # the HTTP status answered; None: begun, outcome not recorded
    finished_at: datetime | None


class Actions(msgspec.Struct):
    actions: list[Action]
