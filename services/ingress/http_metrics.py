"""Ingress's HTTP metrics: requests by route and status, and their latency.

The route label is the router's template (``/v1/reservations/{reservation_id}``), or
``unmatched`` for a path that is no route, so the labels stay few whatever clients send.
The middleware runs outside the problem+json one, so it counts the status the client got.
"""

from __future__ import annotations

import time

import prometheus_client
from aiohttp import web

from boxoffice.ingress.http import Handler

REQUESTS = prometheus_client.Counter(
    "boxoffice_http_requests_total", "HTTP requests answered by ingress",
    ["method", "route", "status"])
LATENCY = prometheus_client.Histogram(
    "boxoffice_http_request_duration_seconds", "Time to answer an HTTP request of ingress",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The labelled children, looked up once per label set: ``.labels(...)`` validates and joins its
# arguments under a lock on every call. The label sets are few (methods x routes x statuses).
_counted: dict[tuple[str, str, int], prometheus_client.Counter] = {}
_timed: dict[tuple[str, str], prometheus_client.Histogram] = {}


def _count(method: str, route: str, status: int) -> prometheus_client.Counter:
    child = _counted.get((method, route, status))
    if child is None:
        child = _counted[(method, route, status)] = REQUESTS.labels(method, route, str(status))
    return child


def _timer(method: str, route: str) -> prometheus_client.Histogram:
    child = _timed.get((method, route))
    if child is None:
        child = _timed[(method, route)] = LATENCY.labels(method, route)
    return child


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        method = request.method if request.method in METHODS else "other"
        route = _route(request)
        _count(method, route, status).inc()
        _timer(method, route).observe(time.perf_counter() - start)
