"""A workload of webhooks, holds and error reports through ingress, and what the services
acknowledged of it: shared by the tests that kill a NATS node or the PostgreSQL primary under
load (test_nats_cluster, test_pg_failover)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from boxoffice import SERVICES
from tests.errors_support import report
from tests.harness import CLIENT_TOKEN, ServiceProcess
from tests.webhooks_support import charge, event, new_pi, sign


@dataclass
class Accepted:
    """What the services acknowledged, and when (monotonic)."""

    webhooks: dict[str, float] = field(default_factory=dict)
    holds: dict[str, float] = field(default_factory=dict)
    reports: dict[str, float] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)

    def since(self, t: float) -> dict[str, int]:
        return {kind: sum(1 for at in getattr(self, kind).values() if at > t)
                for kind in ("webhooks", "holds", "reports")}


async def workload(base: str, event_id: str, accepted: Accepted, stop: asyncio.Event) -> None:
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"}

    async def webhook(s: aiohttp.ClientSession) -> tuple[str, str] | None:
        body = event("charge.succeeded", charge(new_pi(), refunded=False))
        async with s.post(f"{base}/v1/webhooks/stripe", data=body,
                          headers={"Stripe-Signature": sign(body),
                                   "Content-Type": "application/json"}) as r:
            return ("webhooks", json.loads(body)["id"]) if r.status == 200 else None

    async def hold(s: aiohttp.ClientSession) -> tuple[str, str] | None:
        body = json.dumps({"event_id": event_id, "quantity": 1})
        async with s.post(f"{base}/v1/reservations", data=body, headers=client) as r:
            return ("holds", (await r.json())["id"]) if r.status == 201 else None

    async def error_report(s: aiohttp.ClientSession) -> tuple[str, str] | None:
        body = report(service="checkout-web")
        async with s.post(f"{base}/v1/errors", data=json.dumps(body), headers=client) as r:
            return ("reports", body["id"]) if r.status == 202 else None

    async def loop(s: aiohttp.ClientSession, send: Any) -> None:
        while not stop.is_set():
            try:
                got = await send(s)
            except (TimeoutError, aiohttp.ClientError):
                got = None
            if got is None:  # not acknowledged: nothing is owed
                accepted.refused[send.__name__] += 1
            else:
                getattr(accepted, got[0])[got[1]] = time.monotonic()
            await asyncio.sleep(0.02)

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(loop(s, send) for send in (webhook, hold, error_report)
                               for _ in range(3)))


@contextlib.asynccontextmanager
async def all_services(env: dict[str, str], hold_ttl: int, tmp_path: Path
                       ) -> AsyncIterator[dict[str, ServiceProcess]]:
    """The five services on ``env``, holds living ``hold_ttl`` seconds and no rate limit on error
    reports (the workload sends many), started at once and ready; killed on exit."""
    extra = {"payment": {"RESERVATION_TTL_SECONDS": str(hold_ttl)},
             "ingress": {"ERROR_RATE_LIMIT_PER_MINUTE": "1000000"}}
    procs = {}
    for service in SERVICES:
        e = dict(env, **extra.get(service, {}))
        if service == "ingress":
            e.pop("DATABASE_URL")
            e.pop("STRIPE_API_KEY")
        procs[service] = ServiceProcess(service, e, tmp_path / f"{service}.log")
    try:
        for proc in procs.values():  # all at once: the slow part is each one's imports
            proc.start(wait=False)
        for proc in procs.values():
            await asyncio.to_thread(proc.wait_ready, 60)
        yield procs
    finally:
        for proc in procs.values():
            if proc.running:
                proc.kill()
