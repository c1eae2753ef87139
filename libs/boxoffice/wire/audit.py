"""The self-audit's operator queries (``admin.<owner>.audit`` and ``admin.reaper.invariants``).

The reaper runs the checks of what it reads (inventory, money, timeliness, errors); the webhook
service, which holds the Stripe key, runs the check of our books against Stripe's. Ingress asks
both to run and joins their answers; the last run of every check and the open findings are read
from the database by the reaper.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from boxoffice.wire import Message

INVARIANTS = "admin.reaper.invariants"   # the last run of each check and the open findings
RUN_REAPER = "admin.reaper.audit"        # run the reaper's checks now
RUN_WEBHOOK = "admin.webhook.audit"      # run the Stripe check now

CheckName = Literal["inventory", "money", "stripe", "timeliness", "errors"]
CHECKS: tuple[str, ...] = ("inventory", "money", "stripe", "timeliness", "errors")
Mode = Literal["incremental", "full"]


class RunRequest(Message):
    """Run the checks now: ``full`` looks at everything, else what changed since the last run.
    ``full`` is required, so that an empty body runs nothing by accident."""

    full: bool


class InvariantsRequest(Message):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200


class Finding(msgspec.Struct):
    """A violation: which check found it, what does not hold (``kind``), about what
    (``subject``, with its ids), what was expected and what was found."""

    id: int
    check: CheckName
    kind: str
    subject: str
    ids: dict[str, Any]
    expected: str
    found: str
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None = None


class CheckRun(msgspec.Struct):
    """One run of a check. ``violations`` is how many of its findings are open after it;
    ``in_flight`` how many differences it let pass because work in flight explains them."""

    check: CheckName
    mode: Mode | None
    started_at: datetime | None
    finished_at: datetime | None
    examined: int
    in_flight: int
    violations: int
    new: int
    resolved: int
    seconds: float | None
    error: str | None
    last_full_at: datetime | None


class Invariants(msgspec.Struct):
    """``holds`` is true only when every check listed ran without error and no finding is open."""

    holds: bool
    checks: list[CheckRun]
    findings: list[Finding]
