"""Helpers of the console tests (no tests here): a console signed in over HTTP, and a webhook
event made to fail (its effects refused by a trigger) until the trigger is dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import asyncpg

from boxoffice.ingress import sessions
from tests.harness import eventually
from tests.sql_support import new_hold
from tests.webhooks_support import deliver, event, new_pi, payment_intent


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Console:
    """What a browser holds after signing in: the cookie (sent by hand: aiohttp keeps no Secure
    cookie for http://) and the CSRF token."""

    http: aiohttp.ClientSession
    url: str
    cookie: str = ""
    csrf: str = ""
    set_cookie: str = ""

    async def call(self, method: str, path: str, body: Any = None, *, csrf: str | None = None,
                   headers: dict[str, str] | None = None) -> Answer:
        hdrs = {"Cookie": f"{sessions.COOKIE}={self.cookie}"} if self.cookie else {}
        token = self.csrf if csrf is None else csrf
        if method != "GET" and token:
            hdrs[sessions.CSRF_HEADER] = token
        hdrs.update(headers or {})
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        async with self.http.request(method, self.url + path, data=data, headers=hdrs) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())

    async def sign_in(self, token: str) -> Answer:
        answer = await self.call("POST", "/console/session", {"token": token})
        if answer.status == 201:
            self.set_cookie = answer.headers["Set-Cookie"]
            jar: SimpleCookie = SimpleCookie()
            jar.load(self.set_cookie)
            self.cookie = jar[sessions.COOKIE].value
            self.csrf = answer.json["csrf_token"]
        return answer


def console(http: aiohttp.ClientSession, url: str) -> Console:
    return Console(http, url)


REFUSE = """
CREATE FUNCTION refuse_payment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payment_intent_id LIKE 'pi_refused_%' THEN
        RAISE EXCEPTION 'effects refused for this test';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_payment BEFORE INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION refuse_payment();
"""


async def failed_webhook_events(db: asyncpg.Pool, ingress_url: str, event_id: Any,
                                count: int = 1) -> list[str]:
    """``count`` payment_intent.succeeded events for holds of ``event_id`` that fail (their
    payments refused by a trigger) until ``allow_payments``; their Stripe event ids."""
    await db.execute(REFUSE)
    ids = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            reservation = await new_hold(db, event_id, 1)
            pi = "pi_refused_" + new_pi()[3:]
            body = event("payment_intent.succeeded", payment_intent(
                pi, reservation, amount=2500, client_secret=f"{pi}_secret_do_not_show"))
            ids.append(json.loads(body)["id"])
            await deliver(http, ingress_url, body)

    async def all_failed() -> bool:
        return await db.fetchval("SELECT count(*) FROM webhook_events_log WHERE event_id = ANY($1)"
                                 " AND processing_status = 'failed'", ids) == len(ids)

    await eventually(all_failed, 60, "the events to be marked failed")
    return ids


async def allow_payments(db: asyncpg.Pool) -> None:
    await db.execute("DROP TRIGGER refuse_payment ON payments; DROP FUNCTION refuse_payment()")
