"""The console in a real browser: Debian's Chromium (/usr/bin/chromium, installed by .ci/run)
driven by Playwright, against every service. Refused without a token; signed in, it watches a
sell-out move the bars without a reload, replays a failed webhook and resolves an error group,
with no Content-Security-Policy violation on the way. Screenshots are kept in
test-artifacts/console/ (not in git)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.console_support import allow_payments, failed_webhook_events
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, eventually
from tests.webhooks_support import deliver, event, log_status, new_pi, payment_intent

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"
READ_TOKEN = "admin-read-token-browser-00000000"


async def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.timeout(240)
async def test_console_in_chromium(db: asyncpg.Pool, start_service, localstripe) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it)"
    start_service("payment", STRIPE_API_BASE=localstripe.url)
    start_service("webhook", WEBHOOK_RETRY_DELAYS="0.2,0.3", STRIPE_API_BASE=localstripe.url)
    start_service("error_sink")
    start_service("reaper")
    ingress = start_service("ingress", ADMIN_READ_API_TOKENS=READ_TOKEN)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{ingress.url}/v1/admin/events", headers=admin, json={
                "name": "Sell-out night", "capacity": 6, "price": 2500, "currency": "eur"}) as r:
            gig = await r.json()
        async with http.post(f"{ingress.url}/v1/admin/events", headers=admin, json={
                "name": "Other night", "capacity": 10, "price": 2500, "currency": "eur"}) as r:
            other = await r.json()
        failed, failed_too = await failed_webhook_events(db, ingress.url,
                                                         uuid.UUID(other["id"]), count=2)
        report = {"id": str(uuid.uuid4()), "occurred_at": "2026-11-30T12:00:00Z",
                  "service": "shop-web", "level": "error", "message": "Checkout exploded",
                  "error_type": "TypeError", "stacktrace": "TypeError: x is undefined\n  at pay",
                  "context": {"cart": 3}, "fingerprint": ["console-browser"]}
        async with http.post(f"{ingress.url}/v1/errors", headers=client, json=report) as r:
            assert r.status == 202

        async def group_id() -> str | None:
            async with http.get(f"{ingress.url}/v1/admin/errors", headers=admin) as r:
                groups = (await r.json())["groups"]
            return next((g["id"] for g in groups if "Checkout exploded" in g["title"]), None)

        gid = await eventually(group_id, 20, "the error group")

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            # refused without a token: the sign-in form, and the API says 401
            await page.goto(f"{ingress.url}/console")
            await expect(page.locator("#signin")).to_be_visible()
            assert await page.evaluate("fetch('/v1/admin/events').then(r => r.status)") == 401
            await page.fill("#token", "not-a-token-0000000000000")
            await page.click("#signin-form button[type=submit]")
            await expect(page.locator("#message")).to_contain_text("not an admin token")
            await expect(page.locator("#tabs")).to_be_hidden()
            await _shot(page, "01-refused")
            problems.clear()  # the refusals above are logged by the browser as failed loads

            # a read token sees, and is offered no action
            await page.fill("#token", READ_TOKEN)
            await page.click("#signin-form button[type=submit]")
            await expect(page.locator("#scope")).to_have_text("read")
            await expect(page.locator("#create-event")).to_be_hidden()
            await page.click("#sign-out")
            await expect(page.locator("#signin")).to_be_visible()

            # signed in with an operate token, cookie as the server set it
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("#signin-form button[type=submit]")
            await expect(page.locator("#scope")).to_have_text("operate")
            cookie = next(c for c in await page.context.cookies()
                          if c["name"] == "boxoffice_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]
            assert ADMIN_TOKEN not in cookie["value"]
            assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
            row = page.locator(f'[data-event-id="{gig["id"]}"]')
            await expect(row.locator('[data-count="available"]')).to_have_text("6")
            await expect(page.locator("#live.on")).to_be_visible()
            await page.evaluate("window.notReloaded = true")

            # the sell-out: three buyers hold two each, one pays; the bars follow live
            holds = []
            for _ in range(3):
                async with http.post(f"{ingress.url}/v1/reservations", headers=client,
                                     json={"event_id": gig["id"], "quantity": 2}) as r:
                    assert r.status == 201
                    holds.append((await r.json())["id"])
            async with http.post(f"{ingress.url}/v1/reservations", headers=client,
                                 json={"event_id": gig["id"], "quantity": 1}) as r:
                assert r.status == 409 and (await r.json())["code"] == "sold_out"
            await expect(row.locator('[data-count="available"]')).to_have_text("0")
            await expect(row.locator('[data-count="held"]')).to_have_text("6")
            await deliver(http, ingress.url, event("payment_intent.succeeded", payment_intent(
                new_pi(), holds[0], amount=5000)))
            await expect(row.locator('[data-count="sold"]')).to_have_text("2")
            await expect(row.locator('[data-count="held"]')).to_have_text("4")
            async with http.post(f"{ingress.url}/v1/payment_intents",
                                 json={"reservation_id": holds[1]},
                                 headers={**client, "Idempotency-Key": "pay-1"}) as r:
                assert r.status == 201, await r.text()
            sold_width = float(await row.locator("rect.sold").get_attribute("width") or 0)
            assert sold_width == pytest.approx(300 * 2 / 6, rel=0.01)
            assert await page.evaluate("window.notReloaded") is True
            await _shot(page, "02-sold-out")

            # an event created from the console appears with its bar
            await page.fill('#create-event input[name="name"]', "Matinee")
            await page.fill('#create-event input[name="capacity"]', "40")
            await page.fill('#create-event input[name="price"]', "1200")
            await page.click('#create-event button[type="submit"]')
            await expect(page.locator("#message")).to_contain_text("Created Matinee")
            matinee = page.locator(".event", has_text="Matinee")
            await expect(matinee.locator('[data-count="available"]')).to_have_text("40")

            # the payments' audit trail of a hold: its key at its recovery point
            await page.click('.tab[data-tab="payments"]')
            await page.fill('#payment-search input[name="reservation_id"]', holds[1])
            await page.click('#payment-search button[type="submit"]')
            key = page.locator("#payment-log tbody tr", has_text="pay-1")
            await expect(key.locator(".point")).to_have_text("finished")

            # holds: the figures, the expiry-lag chart, the reaper's runs
            await page.click('.tab[data-tab="holds"]')
            # two holds of the sell-out still waiting, two of the other night's failed payments
            await expect(page.locator('[data-stat="active"] dd')).to_have_text("4")
            await expect(page.locator("#lag-chart svg")).to_be_visible()
            await _shot(page, "03-holds")

            # a failed webhook: its payload and last error, then replayed once the cause is gone
            await page.click('.tab[data-tab="webhooks"]')
            line = page.locator("#webhook-list tbody tr", has_text=failed)
            await expect(line).to_contain_text("failed")
            await line.click()
            detail = page.locator("#webhook-detail")
            await expect(detail.locator(".last-error")).to_contain_text("effects refused")
            await expect(detail.locator(".payload")).to_contain_text(
                '"client_secret": "[Filtered]"')
            await allow_payments(db)
            await line.locator("button.replay").click()
            await expect(page.locator("#message")).to_contain_text(f"Replayed {failed}")
            await expect(detail.locator(".title")).to_contain_text("· processed")
            assert await log_status(db, failed) == "processed"
            # the rest that match the filter, with progress
            await page.click("#replay-all")
            await expect(page.locator("#replay-progress .text")).to_have_text(
                "done: 1 applied, 0 failed of 1")
            assert await page.locator("#replay-progress progress").get_attribute("value") == "1"
            assert await log_status(db, failed_too) == "processed"
            await expect(page.locator("#webhook-list tbody")).to_contain_text("nothing")
            await _shot(page, "04-webhook-replayed")

            # an error group: its stack trace and context, then resolved
            await page.click('.tab[data-tab="errors"]')
            group = page.locator("#error-groups tbody tr", has_text="Checkout exploded")
            await expect(group.locator("svg.spark")).to_be_visible()
            await group.click()
            box = page.locator("#error-detail")
            await expect(box.locator(".stacktrace")).to_contain_text("TypeError: x is undefined")
            await expect(box.locator(".context")).to_contain_text('"cart": 3')
            await page.click("#resolve-group")
            await expect(box.locator(".meta")).to_contain_text(" · resolved · ")
            assert await db.fetchval("SELECT status FROM error_groups WHERE id = $1",
                                     uuid.UUID(gid)) == "resolved"
            await _shot(page, "05-error-resolved")

            # signed out: the API refuses the browser again
            await page.click("#sign-out")
            await expect(page.locator("#signin")).to_be_visible()
            assert await page.evaluate("fetch('/v1/admin/events').then(r => r.status)") == 401
            problems = [p for p in problems if "401" not in p]
            assert not problems, json.dumps(problems, indent=2)  # no CSP violation, no error
            await browser.close()
