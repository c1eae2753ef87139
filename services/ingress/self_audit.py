"""Operator routes (admin token) of the self-audit.

- ``GET /v1/admin/invariants``: the last run of every check and the open findings (the reaper
  reads them from the database; ``?limit=`` caps the findings listed).
- ``POST /v1/admin/invariants/run`` with ``{"full": true|false}``: run every check now. The
  checks live in two services (the reaper's read the database and the bus, the Stripe check
  runs where the Stripe key is), so both are asked at once and their answers joined; if either
  cannot answer, neither answer is a verdict and the request fails as a whole.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from boxoffice.ingress.http import json_response, read_json, require_admin
from boxoffice.ingress.routing import Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import audit

routes = Routes()

RUN_TIMEOUT = 600.0  # a full pass over a large history, Stripe's lists included


def setup(app: web.Application) -> None:
    routes.setup(app)


routes.ask("GET /v1/admin/invariants", "The self-audit: last runs and open findings", "admin",
           audit.INVARIANTS, audit.InvariantsRequest, audit.Invariants)


@routes.post("/v1/admin/invariants/run", "Run every check of the self-audit now", "admin",
             audit.RunRequest, ok=(200, audit.Invariants))
async def run(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json(request, audit.RunRequest)
    bus = request.app[BUS]
    answers = await asyncio.gather(
        bus.request(audit.RUN_REAPER, body, audit.Invariants, timeout=RUN_TIMEOUT),
        bus.request(audit.RUN_WEBHOOK, body, audit.Invariants, timeout=RUN_TIMEOUT),
        return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    reaper, webhook = answers
    assert isinstance(reaper, audit.Invariants) and isinstance(webhook, audit.Invariants)
    return json_response(audit.Invariants(holds=reaper.holds and webhook.holds,
                                          checks=reaper.checks + webhook.checks,
                                          findings=reaper.findings + webhook.findings))
