"""Observability: ingress's HTTP metrics, build info, outbox backlog and consumer lag in every
service, and the request id carried from ingress over the bus into logs and error reports."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import aiohttp

from boxoffice import bus as busmod
from boxoffice import logs, wire
from boxoffice.wire import admin
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, metrics
from tests.webhooks_support import event, sign


def find(figures: dict[str, float], name: str, **labels: str) -> float | None:
    for key, value in figures.items():
        if key == name or key.startswith(name + "{"):
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                return value
    return None


async def test_every_service_reports_build_backlog_lag_and_ingress_its_requests(
        start_service, localstripe) -> None:
    procs = {
        "payment": start_service("payment", STRIPE_API_BASE=localstripe.url),
        "webhook": start_service("webhook", STRIPE_API_BASE=localstripe.url),
        "error_sink": start_service("error_sink"),
        "reaper": start_service("reaper"),
        "ingress": start_service("ingress"),
    }
    base = procs["ingress"].url
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/admin/events", headers={
                "Authorization": f"Bearer {ADMIN_TOKEN}"}, json={
                "name": "Observed", "capacity": 5, "price": 500, "currency": "eur"}) as r:
            assert r.status == 201
            event_id = (await r.json())["id"]
        for _ in range(2):
            async with s.post(f"{base}/v1/reservations", headers={
                    "Authorization": f"Bearer {CLIENT_TOKEN}"},
                    json={"event_id": event_id, "quantity": 1}) as r:
                assert r.status == 201
        async with s.get(f"{base}/v1/reservations/{'x' * 10}", headers={
                "Authorization": f"Bearer {CLIENT_TOKEN}"}) as r:
            assert r.status == 404
        async with s.get(f"{base}/no/such/route/{event_id}") as r:
            assert r.status == 404

    ingress = metrics(procs["ingress"])
    assert find(ingress, "boxoffice_http_requests_total", method="POST",
                route="/v1/reservations", status="201") == 2
    assert find(ingress, "boxoffice_http_requests_total", method="GET",
                route="/v1/reservations/{reservation_id}", status="404") == 1
    # a path that is no route is counted under one label, whatever it was
    assert find(ingress, "boxoffice_http_requests_total", route="unmatched", status="404") == 1
    assert not any(event_id in key for key in ingress)
    assert find(ingress, "boxoffice_http_request_duration_seconds_count", method="POST",
                route="/v1/reservations") == 2
    assert find(ingress, "boxoffice_http_request_duration_seconds_bucket", method="POST",
                route="/v1/reservations", le="+Inf") == 2

    for name, proc in procs.items():
        figures = metrics(proc)
        assert find(figures, "boxoffice_build_info", service=name) == 1, name
    for name in ("payment", "webhook", "reaper"):  # the services with an outbox relay
        backlog = find(metrics(procs[name]), "boxoffice_outbox_backlog", service=name)
        assert backlog is not None and backlog >= 0, name
    assert find(metrics(procs["payment"]), "boxoffice_outbox_oldest_seconds",
                service="payment") is not None
    for name, stream, durable in (("webhook", "STRIPE_EVENTS", "webhook"),
                                  ("error_sink", "ERRORS", "error-sink"),
                                  ("reaper", "AUDIT", "reaper")):
        figures = metrics(procs[name])
        for metric in ("boxoffice_consumer_pending", "boxoffice_consumer_ack_pending",
                       "boxoffice_consumer_redelivered"):
            value = find(figures, metric, stream=stream, durable=durable)
            assert value is not None and value >= 0, (name, metric)
        assert not find(figures, "boxoffice_metrics_refresh_errors_total"), name


async def test_consumer_lag_counts_what_waits_and_what_came_back(nats_url: str) -> None:
    """The figures a scrape reads for a durable: pending (not yet delivered), delivered and not
    acknowledged, and redelivered."""
    from boxoffice import observe

    async with busmod.connect(nats_url, "test") as bus:
        await bus.declare_streams("STRIPE_EVENTS")
        await bus.declare_consumer("STRIPE_EVENTS", "webhook", ack_wait=1.0)
        for i in range(5):
            await bus.publish(f"stripe.events.lag.t{i}", b"{}", f"lag-{i}")
        refreshers = observe.watch("webhook", bus=bus)

        async def figures() -> tuple[float, float, float]:
            await observe.refresh(refreshers)
            gauges = (observe.CONSUMER_PENDING, observe.CONSUMER_ACK_PENDING,
                      observe.CONSUMER_REDELIVERED)
            a, b, c = (g.labels("STRIPE_EVENTS", "webhook")._value.get() for g in gauges)
            return a, b, c

        assert await figures() == (5, 0, 0)
        sub = await bus.pull("STRIPE_EVENTS", "webhook")
        got = await sub.fetch(3, timeout=5)
        await got[0].ack_sync()  # the figures read right after must see it
        await got[1].nak()
        assert await figures() == (2, 2, 0)  # one acked; one nak'd and one unanswered wait
        again = await sub.fetch(1, timeout=5)
        assert again[0].metadata.num_delivered == 2
        pending, _ack_pending, redelivered = await figures()
        assert (pending, redelivered) == (2, 1)
        await sub.unsubscribe()


async def test_request_id_travels_from_ingress_into_bus_headers(nats_url: str,
                                                                start_service) -> None:
    ingress = start_service("ingress")
    body = event("payment_intent.created", {"id": "pi_rid", "object": "payment_intent"})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{ingress.url}/v1/webhooks/stripe", data=body, headers={
                "Stripe-Signature": sign(body), "X-Request-Id": "rid-observe-42"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "rid-observe-42"
    async with busmod.connect(nats_url, "test") as bus:
        msg = await bus.js.get_last_msg("STRIPE_EVENTS", "stripe.events.payment_intent.created")
        assert (msg.headers or {}).get(busmod.REQUEST_ID_HEADER) == "rid-observe-42"


async def test_request_id_reaches_the_answering_service_logs_and_reports(nats_url: str) -> None:
    """A request made while serving an HTTP request carries its id; the answering side's log
    lines and error reports name it, and a request without one names none."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter("payment"))
    probe = logging.getLogger("boxoffice.test.observe")
    probe.addHandler(handler)
    probe.setLevel(logging.INFO)
    seen: list[str | None] = []

    async def answer(req: admin.GetEvent) -> admin.TicketedEvent:
        seen.append(logs.REQUEST_ID.get())
        probe.info("answering %s", req.event_id)
        return admin.TicketedEvent(id=req.event_id, name="n", capacity=1, price=1,
                                   currency="eur", buckets=1, held=0, sold=0, available=1)

    try:
        async with busmod.connect(nats_url, "server") as server, \
                busmod.connect(nats_url, "client") as client:
            subject = f"test.observe.{id(seen)}"
            await server.serve(subject, admin.GetEvent, answer, queue="q")

            async def from_http(rid: str | None, eid: str) -> None:
                logs.REQUEST_ID.set(rid)  # as ingress's middleware does, in its own task
                await client.request(subject, admin.GetEvent(event_id=eid), admin.TicketedEvent)

            await asyncio.gather(from_http("rid-a", "e1"), from_http("rid-b", "e2"))
            await asyncio.create_task(from_http(None, "e3"))
    finally:
        probe.removeHandler(handler)
    assert sorted(seen, key=str) == sorted(["rid-a", "rid-b", None], key=str)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {re.sub(r"^answering ", "", line["msg"]): line.get("request_id") for line in lines}
    assert by_event == {"e1": "rid-a", "e2": "rid-b", "e3": None}


def test_error_reports_name_the_request_being_served(tmp_path, monkeypatch) -> None:
    from boxoffice import report

    reporter = report.Reporter("payment", bus_url="nats://127.0.0.1:1", spool_dir=str(tmp_path))
    filed: list = []
    monkeypatch.setattr(reporter, "_enqueue", filed.append)
    token = logs.REQUEST_ID.set("rid-report-7")
    try:
        reporter.report("error", "boom while serving", fold=False)
    finally:
        logs.REQUEST_ID.reset(token)
    reporter.report("error", "boom on a timer", fold=False)
    assert [r.request_id for r in filed] == ["rid-report-7", None]
    assert wire.decode(wire.encode(filed[0]), type(filed[0])).request_id == "rid-report-7"


async def test_ingress_counts_each_route_and_status_apart_with_its_cached_series(
        http: aiohttp.ClientSession) -> None:
    """The metrics middleware keeps each label set's series after its first use: the same route
    answered with two statuses, and a second route, are still counted apart and exactly (a cache
    keyed on less than method, route and status would add one's requests to another's)."""
    from aiohttp import web
    from prometheus_client import REGISTRY

    from boxoffice.embedded import free_port
    from boxoffice.ingress import http_metrics

    async def flip(request: web.Request) -> web.Response:
        if request.query.get("fail"):
            raise web.HTTPConflict()
        return web.Response(status=201)

    async def other(_request: web.Request) -> web.Response:
        return web.Response(status=201)

    route, other_route = f"/t/{free_port()}/{{item}}", f"/t/{free_port()}/other"
    app = web.Application(middlewares=[http_metrics.measure])
    app.router.add_post(route, flip)
    app.router.add_post(other_route, other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    def count(path: str, status: str) -> float:
        return REGISTRY.get_sample_value("boxoffice_http_requests_total", {
            "method": "POST", "route": path, "status": status}) or 0.0

    def timed(path: str) -> float:
        return REGISTRY.get_sample_value("boxoffice_http_request_duration_seconds_count", {
            "method": "POST", "route": path}) or 0.0

    try:
        base = f"http://127.0.0.1:{port}"
        for i, fail in enumerate([False, True, False, True, True, False, False]):
            async with http.post(f"{base}{route.replace('{item}', str(i))}",
                                 params={"fail": "1"} if fail else {}) as r:
                assert r.status == (409 if fail else 201)
        for _ in range(2):
            async with http.post(base + other_route) as r:
                assert r.status == 201
    finally:
        await runner.cleanup()
    assert (count(route, "201"), count(route, "409"), count(other_route, "201")) == (4, 3, 2)
    assert count(other_route, "409") == 0
    assert (timed(route), timed(other_route)) == (7, 2)
