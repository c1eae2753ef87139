"""Stripe slow, unreachable or cut mid-answer: classified as Stripe's failure, transient, never as
PostgreSQL being down and never as an internal error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import stripe
from aiohttp import web

from boxoffice.embedded import free_port
from boxoffice.payment.stripe_client import Definitive, StripeGateway, Transient
from boxoffice.webhook import actions
from boxoffice.webhook.refunds import Refunds
from tests.harness import STRIPE_KEY


@contextlib.asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> AsyncIterator[str]:
    """``handler`` answering every request on 127.0.0.1; yields the base URL."""
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

    async with serving(handler) as base:
        yield base


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


@contextlib.asynccontextmanager
async def answering(status: int, body: bytes, seen: list[tuple[web.Request, dict[str, object]]]
                    ) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that answers every request with ``status`` and ``body`` (JSON),
    keeping each request with its form fields in ``seen``."""

    async def handler(request: web.Request) -> web.Response:
        seen.append((request, dict(await request.post())))
        return web.Response(status=status, body=body, content_type="application/json")

    async with serving(handler) as base:
        yield base


PI_ANSWER = (b'{"id": "pi_123", "object": "payment_intent", "amount": 2500, "currency": "eur", '
             b'"status": "requires_payment_method", "client_secret": "pi_123_secret_x", '
             b'"metadata": {"reservation_id": "r-1"}}')


async def test_payment_intent_request_and_answer() -> None:
    """The gateway's raw request (no object tree built from the answer) still sends what the SDK
    call did: POST /v1/payment_intents, the amount, currency and reservation as form fields, our
    Idempotency-Key and credentials; and reads the five fields of the answer."""
    seen: list[tuple[web.Request, dict[str, object]]] = []
    async with answering(200, PI_ANSWER, seen) as base:
        sc, http = client(base, 3)
        try:
            pi = await StripeGateway(sc).create_payment_intent(
                amount=2500, currency="eur", reservation_id="r-1", idempotency_key="bxpi_k1")
        finally:
            await http.close_async()
    assert (pi.id, pi.client_secret, pi.status, pi.amount, pi.currency) == (
        "pi_123", "pi_123_secret_x", "requires_payment_method", 2500, "eur")
    [(req, form)] = seen
    assert (req.method, req.path) == ("POST", "/v1/payment_intents")
    assert req.headers["Idempotency-Key"] == "bxpi_k1"
    assert req.headers["Authorization"] == f"Bearer {STRIPE_KEY}"
    assert form == {"amount": "2500", "currency": "eur",
                                 "metadata[reservation_id]": "r-1"}


async def test_payment_intent_answer_that_is_not_one_is_transient() -> None:
    """A 200 whose body is not a PaymentIntent (a proxy's JSON, a truncated object) is never
    taken for one: nothing would be stored, and the client's retry asks again."""
    for body in (b'{"ok": true}', b'[1, 2]', b'{"id": "pi_1", "amount": "2500", "currency": "eur", '
                 b'"status": "requires_payment_method"}'):
        async with answering(200, body, []) as base:
            sc, http = client(base, 3)
            try:
                await StripeGateway(sc).create_payment_intent(
                    amount=2500, currency="eur", reservation_id="r", idempotency_key="k")
            except Transient as exc:
                assert "not a PaymentIntent" in str(exc)
            else:
                raise AssertionError(f"{body!r} was taken as a PaymentIntent")
            finally:
                await http.close_async()


async def test_payment_intent_refusals_stay_definitive() -> None:
    """Stripe's refusals keep their classes through the raw request: a declined card is a 402
    stored for the key, an invalid request a 422, a 5xx transient."""
    declined = (b'{"error": {"type": "card_error", "code": "card_declined", '
                b'"message": "Your card was declined."}}')
    invalid = b'{"error": {"type": "invalid_request_error", "message": "Bad amount."}}'
    for status, body, expected in ((402, declined, 402), (400, invalid, 422),
                                   (500, b'{"error": {"type": "api_error"}}', None)):
        async with answering(status, body, []) as base:
            sc, http = client(base, 3)
            try:
                await StripeGateway(sc).create_payment_intent(
                    amount=2500, currency="eur", reservation_id="r", idempotency_key="k")
            except Definitive as exc:
                assert exc.error.status == expected, (status, exc.error.status)
            except Transient:
                assert expected is None, status
            else:
                raise AssertionError(f"HTTP {status} was taken as a PaymentIntent")
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
