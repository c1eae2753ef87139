"""Helpers of the self-audit tests (no tests here): an auditor over given checks, holds sold
through the real SQL path, the findings as rows, and Stripe's refunds list in front of
localstripe."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import asyncpg
from aiohttp import web

from boxoffice import audit
from boxoffice.wire.audit import Invariants
from tests.stripe_keys_proxy import Seen, stripe_error
from tests.stripe_lists_proxy import BOUNDS, StripeListsProxy

APPLY = ("SELECT * FROM apply_stripe_event($1, $2, to_timestamp($3), $4, $5, $6, $7, $8, $9, "
         "$10, $11)")


def auditor(pool: asyncpg.Pool, *checks: audit.Check) -> audit.Auditor:
    return audit.Auditor(pool, list(checks), interval=300)


async def run(a: audit.Auditor, *, full: bool = False) -> Invariants:
    return await a.run(full, timeout=60)


def named(result: Invariants) -> set[tuple[str, str, str]]:
    """(check, kind, subject) of every open finding in an answer."""
    return {(f.check, f.kind, f.subject) for f in result.findings}


async def new_event(db: asyncpg.Pool, capacity: int = 20, buckets: int = 2,
                    price: int = 2500) -> uuid.UUID:
    return await db.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'show', $1, $2, "
                             "'eur', $3)", capacity, price, buckets)


async def hold(db: asyncpg.Pool, ev: uuid.UUID, quantity: int = 2, ttl: int = 900) -> uuid.UUID:
    return await db.fetchval("SELECT id FROM hold_tickets($1, $2, 'client', $3)", ev, quantity, ttl)


async def apply(db: asyncpg.Pool, kind: str, pi: str, res: uuid.UUID | None, amount: int,
                **extra: Any) -> asyncpg.Record:
    """apply_stripe_event for a synthetic Stripe event of ``kind``."""
    event_id = f"evt_{uuid.uuid4().hex}"
    return await db.fetchrow(APPLY, event_id, kind, time.time(),
                             json.dumps({"id": event_id, "type": kind}), pi, res, amount, "eur",
                             extra.get("reason"), extra.get("refund_id"), extra.get("refunded"))


async def sold(db: asyncpg.Pool, ev: uuid.UUID, quantity: int = 2) -> tuple[uuid.UUID, str]:
    """A hold paid the way boxoffice records it: its PaymentIntent recorded, then Stripe's
    payment_intent.succeeded applied. Returns (hold, PaymentIntent)."""
    res = await hold(db, ev, quantity)
    pi = f"pi_{uuid.uuid4().hex[:24]}"
    amount = await db.fetchval("SELECT amount FROM reservations WHERE id = $1", res)
    await db.execute("INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, "
                     "status) VALUES ($1, $2, $3, 'eur', 'created')", pi, res, amount)
    await db.execute("UPDATE reservations SET payment_intent_id = $1 WHERE id = $2", pi, res)
    outcome = await apply(db, "payment_intent.succeeded", pi, res, amount)
    assert outcome["outcome"] == "completed", dict(outcome)
    return res, pi


async def open_findings(db: asyncpg.Pool, check: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM audit_findings WHERE check_name = $1 "
                          "AND resolved_at IS NULL ORDER BY id", check)


class AuditListsProxy(StripeListsProxy):
    """Also ``GET /v1/refunds`` as Stripe serves it: filtered on ``created[...]`` and
    ``payment_intent``, newest first, paged (localstripe filters only on the charge or the
    PaymentIntent and ignores ``created``)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET" or request.path != "/v1/refunds":
            return await super()._handle(request)
        self.requests.append(Seen(request.method, request.path, None))
        tests = []
        pi = None
        for name, value in request.query.items():
            if name.startswith("created[") and name.endswith("]") and name[8:-1] in BOUNDS:
                tests.append((BOUNDS[name[8:-1]], int(value)))
            elif name == "payment_intent":
                pi = value
            elif name not in ("limit", "starting_after"):
                return stripe_error(400, "invalid_request_error",
                                    f"Received unknown parameter: {name}")
        everything = await self._everything(request)
        kept = [r for r in everything if all(t(r["created"], v) for t, v in tests)
                and (pi is None or r.get("payment_intent") == pi)]
        kept.sort(key=lambda r: r["created"], reverse=True)
        limit = int(request.query.get("limit", "10"))
        start = 0
        if after := request.query.get("starting_after"):
            start = [r["id"] for r in kept].index(after) + 1
        return web.json_response({"object": "list", "url": request.path, "data":
                                  kept[start:start + limit], "has_more": start + limit < len(kept)})
