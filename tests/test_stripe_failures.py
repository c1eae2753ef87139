"""Stripe slow, unreachable or cut mid-answer: classified as Stripe's failure, transient, never as
PostgreSQL being down and never as an internal error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import stripe
from aiohttp import web

from boxoffice.embedded import free_port
from boxoffice.payment.stripe_client import StripeGateway, Transient
from boxoffice.webhook import actions
from boxoffice.webhook.refunds import Refunds
from tests.harness import STRIPE_KEY


@contextlib.asynccontextmanager
async def bad_stripe(mode: str) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that answers every request badly: ``hang`` never answers, ``cut``
    sends a 200 with a Content-Length and half the body, then closes the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if mode == "hang":
            await asyncio.sleep(3600)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Content-Length": "4000"})
        await resp.prepare(request)
        await resp.write(b'{"id": "pi_cut", "object": "payment_intent", "amou')
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # a hanging handler is not waited for
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def client(base: str, timeout: float) -> tuple[stripe.StripeClient, stripe.AIOHTTPClient]:
    http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout))
    return stripe.StripeClient(STRIPE_KEY, http_client=http, base_addresses={"api": base},
                               max_network_retries=0), http


async def test_payment_intent_cut_mid_answer_is_transient() -> None:
    async with bad_stripe("cut") as base:
        sc, http = client(base, 3)
        try:
            gateway = StripeGateway(sc, deadline=5)
            try:
                await gateway.create_payment_intent(amount=100, currency="eur",
                                                    reservation_id="r", idempotency_key="k")
            except Transient as exc:
                assert "cut" in str(exc) or "Error" in str(exc)
            else:
                raise AssertionError("a cut answer was taken as a PaymentIntent")
        finally:
            await http.close_async()


async def test_payment_intent_hanging_stripe_is_transient() -> None:
    async with bad_stripe("hang") as base:
        sc, http = client(base, 10)
        try:
            gateway = StripeGateway(sc, deadline=0.5)
            try:
                await gateway.create_payment_intent(amount=100, currency="eur",
                                                    reservation_id="r", idempotency_key="k")
            except Transient as exc:
                assert "did not answer" in str(exc)
            else:
                raise AssertionError("no answer was taken as a PaymentIntent")
        finally:
            await http.close_async()


def _row(kind: str) -> dict[str, object]:
    return {"id": 1, "kind": kind, "payment_intent_id": "pi_x", "reservation_id": None,
            "amount": 100, "reason": "oversold", "idempotency_key": f"{kind}-pi_x",
            "attempts": 1}


async def test_refund_that_times_out_is_a_stripe_retry_not_a_database_outage() -> None:
    async with bad_stripe("hang") as base:
        sc, http = client(base, 10)
        try:
            result = await actions.perform(Refunds(sc, timeout=0.5), _row("refund"))
        finally:
            await http.close_async()
    assert result.outcome == "retry" and "TimeoutError" in (result.detail or "")


async def test_refund_and_cancel_cut_mid_answer_are_retried() -> None:
    async with bad_stripe("cut") as base:
        sc, http = client(base, 3)
        try:
            refund = await actions.perform(Refunds(sc, timeout=5), _row("refund"))
            cancel = await actions.perform(Refunds(sc, timeout=5), _row("cancel"))
        finally:
            await http.close_async()
    assert (refund.outcome, cancel.outcome) == ("retry", "retry")


async def test_unreachable_stripe_is_retried() -> None:
    sc, http = client(f"http://127.0.0.1:{free_port()}", 2)
    try:
        result = await actions.perform(Refunds(sc, timeout=5), _row("refund"))
    finally:
        await http.close_async()
    assert result.outcome == "retry" and "APIConnectionError" in (result.detail or "")
