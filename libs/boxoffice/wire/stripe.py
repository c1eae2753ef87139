"""The part of a Stripe event that boxoffice relies on; the rest is kept as raw JSON."""

from __future__ import annotations

from typing import Any

import msgspec


class StripeEventData(msgspec.Struct):
    object: dict[str, Any]


class StripeEvent(msgspec.Struct):
    id: str
    type: str
    created: int
    data: StripeEventData
