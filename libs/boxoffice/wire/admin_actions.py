"""The log of operators' actions (``admin.actions.<verb>``): who did what, when, to what.

Ingress records an action before it is carried out (``begin``: if it cannot be recorded, it is
not carried out) and its outcome after (``finish``); the reaper keeps the log in
``admin_actions``. The actor is a token's id (a digest, as ``a_<hex>``), never the token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from boxoffice.wire import Message

BEGIN = "admin.actions.begin"
FINISH = "admin.actions.finish"
LIST = "admin.actions.list"

Scope = Literal["read", "operate"]
Short = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Begin(Message):
    actor: Annotated[str, msgspec.Meta(pattern=r"^a_[0-9a-f]{12,64}\Z")]
    action: Short                      # the route: "POST /v1/admin/webhooks/events/{event_id}/replay"
    target: Annotated[str, msgspec.Meta(max_length=2000)]  # the path acted on
    request_id: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Begun(msgspec.Struct):
    id: int


class Finish(Message):
    id: int
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]


class Finished(msgspec.Struct):
    id: int


class ListRequest(Message):
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    actor: Annotated[str, msgspec.Meta(max_length=80)] | None = None


class Action(msgspec.Struct):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    request_id: str
    status: int | None        # the HTTP status answered; None: begun, outcome not recorded
    finished_at: datetime | None


class Actions(msgspec.Struct):
    actions: list[Action]
