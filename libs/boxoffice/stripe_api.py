"""The one way a Stripe client is made: on ``STRIPE_API_BASE`` when it is set (localstripe, a
proxy), else on Stripe itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import stripe

from boxoffice.config import Config


def client(api_key: str, api_base: str | None, *, max_network_retries: int = 2,
           http_client: Any = None) -> stripe.StripeClient:
    """A Stripe client with ``api_key``, on ``api_base`` when given."""
    return stripe.StripeClient(api_key, http_client=http_client,
                               base_addresses={"api": api_base} if api_base else {},
                               max_network_retries=max_network_retries)


@contextlib.asynccontextmanager
async def service_client(cfg: Config, *, timeout: Any, max_network_retries: int
                         ) -> AsyncIterator[stripe.StripeClient]:
    """A service's Stripe client for its lifetime (aiohttp, each attempt within ``timeout``);
    its HTTP session is closed on exit."""
    assert cfg.stripe_api_key is not None
    logging.getLogger("stripe").setLevel(logging.WARNING)  # one line per request otherwise
    http = stripe.AIOHTTPClient(timeout=timeout)
    try:
        yield client(cfg.stripe_api_key, cfg.stripe_api_base,
                     max_network_retries=max_network_retries, http_client=http)
    finally:
        await http.close_async()
