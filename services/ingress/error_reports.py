"""Client error reports: ``POST /v1/errors`` (client token), one report in the bus's own schema,
answered 202 once the bus kept it.

Reports are rate limited per key to ``ERROR_RATE_LIMIT_PER_MINUTE`` (429 with ``Retry-After``);
the limiter is per ingress replica and shared with the Sentry protocol (``sentry_ingest``), which
publishes its reports through ``publish`` here as well.
"""

from __future__ import annotations

import math
import time

import msgspec
from aiohttp import web

from boxoffice import errors, scrub
from boxoffice.ingress.http import CONFIG, client_id, json_response, read_json
from boxoffice.ingress.routing import Routes
from boxoffice.ingress.state import BUS
from boxoffice.wire import errors as w

routes = Routes()


class RateLimiter:
    """A token bucket per key: ``per_minute`` tokens, refilled continuously."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, n: int = 1) -> float:
        """0 when ``n`` tokens were taken, else the seconds until they would be there."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= n:
            self._buckets[key] = (tokens - n, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:  # forget idle keys rather than grow without bound
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
        return (min(n, self.capacity) - tokens) / self.rate


LIMITER = web.AppKey("error_rate_limiter", RateLimiter)


class ReportAccepted(msgspec.Struct):
    id: str


def setup(app: web.Application) -> None:
    """The report route and the rate limiter (which ``sentry_ingest`` uses too)."""
    app[LIMITER] = RateLimiter(app[CONFIG].error_rate_limit_per_minute)
    routes.setup(app)


def limit(request: web.Request, key: str, n: int = 1) -> None:
    """Take ``n`` reports from ``key``'s budget, or refuse with 429."""
    wait = request.app[LIMITER].take(key, n)
    if wait:
        raise errors.RateLimited(f"more than {request.app[CONFIG].error_rate_limit_per_minute} "
                                 "error reports a minute from this key",
                                 retry_after=max(1, math.ceil(wait)))


async def publish(request: web.Request, report: w.ErrorReport) -> None:
    """Put ``report`` on the ERRORS stream, scrubbed and sealed (``boxoffice.scrub.sealed``):
    what clients send stays on the stream for days, so secrets are taken out before it gets
    there, and the error-sink does not scrub it a second time."""
    subject, body = scrub.sealed(report)
    await request.app[BUS].publish(subject, body, report.id)


@routes.post("/v1/errors", "An error report", "client", w.ErrorReport, ok=(202, ReportAccepted),
             tag="ingest")
async def post_error(request: web.Request) -> web.Response:
    who = client_id(request)
    limit(request, who)
    report = await read_json(request, w.ErrorReport)
    await publish(request, report)
    return json_response({"id": report.id}, status=202)
