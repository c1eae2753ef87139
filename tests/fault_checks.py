"""After the faults (no tests here): wait until the stack has settled, then check every promise
from the outcomes (PostgreSQL, the streams, Stripe's own state at localstripe), never from the
services' internals. Each invariant collects its violations; none stops at the first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from boxoffice import db
from tests.fault_cluster import Cluster
from tests.fault_stripe import StripeBuyer, WebhookRelay
from tests.fault_workload import Ledger
from tests.harness import eventually, in_one_snapshot

OVERDUE_GRACE = 5.0  # seconds an active hold may be past expires_at ("about a second", generously)
CONSUMERS = (("STRIPE_EVENTS", "webhook"), ("ERRORS", "error-sink"))
EXPIRED = "reservations.events.expired"


@dataclass
class Invariant:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.violations.append(what)


async def _unsettled(cluster: Cluster, relay: WebhookRelay, stripe: StripeBuyer) -> list[str]:
    """What is still moving; empty once the stack is at rest."""
    out = []
    if missing := await cluster.not_ready():
        out.append(f"services not ready: {', '.join(missing)}")
    if relay.pending:
        out.append(f"{relay.pending} webhook deliveries still retrying")
    created = await stripe.count("/v1/events")
    if created > len(relay.received):  # localstripe sends each a second after creating it
        out.append(f"{created - len(relay.received)} Stripe events not yet sent")
    try:
        nc = await nats.connect(cluster.nats_servers, connect_timeout=2, max_reconnect_attempts=0,
                                allow_reconnect=False)
    except (nats.errors.Error, OSError, TimeoutError):
        return out + ["nats-server unreachable"]
    try:
        js = nc.jetstream(timeout=2)
        for stream, durable in CONSUMERS:
            try:
                info = await js.consumer_info(stream, durable)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                out.append(f"consumer {durable}: {type(exc).__name__}")
                continue
            if info.num_pending or info.num_ack_pending:
                out.append(f"consumer {durable}: {info.num_pending} pending, "
                           f"{info.num_ack_pending} unacknowledged")
    finally:
        await nc.close()
    try:
        conn = await asyncpg.connect(cluster.database_url, timeout=3)
    except db.FAILURES as exc:  # (mid-failover: no server taking writes, among others)
        return out + [f"postgres unreachable ({type(exc).__name__})"]
    try:
        row = await conn.fetchrow("""
            SELECT (SELECT count(*) FROM outbox) AS outbox,
                   (SELECT count(*) FROM reservations
                    WHERE status = 'active' AND expires_at < clock_timestamp()) AS overdue,
                   -- every hold ends within its few seconds; one still active when the
                   -- evidence is read could expire, and be announced, between the database's
                   -- snapshot and the read of RESERVATIONS
                   (SELECT count(*) FROM reservations WHERE status = 'active') AS active_holds,
                   (SELECT count(*) FROM webhook_events_log
                    WHERE processing_status = 'received') AS received,
                   (SELECT count(*) FROM stripe_actions
                    WHERE status = 'pending') AS stripe_actions_pending""")
    finally:
        await conn.close()
    for what, n in row.items():
        if n:
            out.append(f"{what}: {n}")
    return out


async def settle(cluster: Cluster, relay: WebhookRelay, stripe: StripeBuyer, timeout: float
                 ) -> list[str]:
    """Poll until nothing moves (or ``timeout``); returns what had not settled, if anything."""
    last: list[str] = []

    async def quiet() -> bool:
        nonlocal last
        last = await _unsettled(cluster, relay, stripe)
        return not last

    try:
        await eventually(quiet, timeout=timeout, interval=0.5, what="the stack to settle")
    except AssertionError:
        return last
    return []


@dataclass
class Evidence:
    """Everything the invariants read, gathered once after settling."""

    reservations: dict[str, asyncpg.Record]
    inventory: list[asyncpg.Record]
    log: list[asyncpg.Record]           # payment_intents_log
    payments: dict[str, asyncpg.Record]
    webhook_log: dict[str, str]         # event id -> processing_status
    errors_stored: Counter[str]
    overdue: list[str]
    stripe_intents: list[dict[str, Any]]
    stripe_events: list[dict[str, Any]]
    expired_messages: Counter[str]
    # payment intent -> its Stripe side effects ("refund done", "cancel moot: ...")
    actions: dict[str, list[str]] = field(default_factory=dict)


async def gather_evidence(cluster: Cluster, stripe: StripeBuyer, ledger: Ledger) -> Evidence:
    # one snapshot for every table: a transaction committing between two reads (an expiry, a
    # late webhook) would show half of itself
    return await in_one_snapshot(cluster.database_url,
                                 lambda conn: _read_evidence(conn, cluster, stripe, ledger))


async def _read_evidence(conn: asyncpg.Connection, cluster: Cluster, stripe: StripeBuyer,
                         ledger: Ledger) -> Evidence:
    reservations = {str(r["id"]): r for r in await conn.fetch(
        "SELECT id, event_id, status, quantity, payment_intent_id, expires_at "
        "FROM reservations")}
    inventory = await conn.fetch("""
        SELECT e.id, e.capacity, sum(b.capacity) AS bucket_capacity, sum(b.held) AS held,
               sum(b.sold) AS sold,
               (SELECT coalesce(sum(quantity), 0) FROM reservations r
                WHERE r.event_id = e.id AND r.status = 'active') AS active_q,
               (SELECT coalesce(sum(quantity), 0) FROM reservations r
                WHERE r.event_id = e.id AND r.status = 'completed') AS completed_q
        FROM ticketed_events e JOIN inventory_buckets b ON b.event_id = e.id GROUP BY e.id""")
    log = await conn.fetch("SELECT client_id, idempotency_key, reservation_id, recovery_point, "
                           "stripe_payment_intent_id, response_status FROM payment_intents_log")
    payments = {r["payment_intent_id"]: r for r in await conn.fetch(
        "SELECT payment_intent_id, reservation_id, status, refund_id, refund_reason "
        "FROM payments")}
    webhook_log = {r["event_id"]: r["processing_status"] for r in await conn.fetch(
        "SELECT event_id, processing_status FROM webhook_events_log")}
    stored = Counter(str(r["id"]) for r in await conn.fetch(
        "SELECT id FROM error_logs WHERE id = ANY($1::uuid[])", list(ledger.errors_acked)))
    actions: dict[str, list[str]] = {}
    for a in await conn.fetch("SELECT payment_intent_id, kind, status, attempts, detail, "
                              "last_error FROM stripe_actions ORDER BY id"):
        actions.setdefault(a["payment_intent_id"], []).append(
            f"{a['kind']} {a['status']} after {a['attempts']} attempts "
            f"({a['detail'] or a['last_error'] or ''})")
    overdue = [f"{r['id']} ({r['late']:.1f}s past expires_at)" for r in await conn.fetch(
        "SELECT id, extract(epoch FROM clock_timestamp() - expires_at)::float8 AS late "
        "FROM reservations WHERE status = 'active' "
        "AND expires_at < clock_timestamp() - make_interval(secs => $1)", OVERDUE_GRACE)]
    expired = await expired_messages(cluster.nats_servers)
    return Evidence(reservations, inventory, log, payments, webhook_log, stored, overdue,
                    await stripe.list_all("/v1/payment_intents"),
                    await stripe.list_all("/v1/events"), expired, actions)


async def expired_messages(nats_url: str | list[str], timeout: float = 60.0) -> Counter[str]:
    """Every ``reservations.events.expired`` message on RESERVATIONS, counted by reservation."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info("RESERVATIONS", subjects_filter=EXPIRED)
        expect = (info.state.subjects or {}).get(EXPIRED, 0)
        sub = await js.pull_subscribe(
            EXPIRED, durable=None, stream="RESERVATIONS",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
        counts: Counter[str] = Counter()
        deadline = time.monotonic() + timeout
        while counts.total() < expect:
            if time.monotonic() > deadline:
                raise AssertionError(f"read only {counts.total()} of {expect} expired events")
            try:
                msgs = await sub.fetch(500, timeout=1)
            except TimeoutError:  # nats' own TimeoutError is one too
                continue
            except nats.js.errors.ServiceUnavailableError:
                # in a cluster, the node this client is on may not know of the new consumer
                # yet ("no responders"): asked again
                await asyncio.sleep(0.2)
                continue
            for m in msgs:
                counts[json.loads(m.data)["reservation_id"]] += 1
        await sub.unsubscribe()
        return counts
    finally:
        await nc.close()


def _refunded(pi: dict[str, Any]) -> bool:
    charge = pi.get("latest_charge")
    return isinstance(charge, dict) and charge.get("amount_refunded", 0) >= pi["amount"]


def _story(ev: Evidence, pi: dict[str, Any], rid: str | None) -> str:
    """What boxoffice made of a PaymentIntent: its hold, its payment row, its Stripe events."""
    r = ev.reservations.get(rid or "")
    pay = ev.payments.get(pi["id"])
    events = [f"{e['type']}:{ev.webhook_log.get(e['id'], 'not logged')}"
              for e in ev.stripe_events if e["data"]["object"].get("id") == pi["id"]]
    return (f"reservation {rid} {r['status'] if r else 'missing'} "
            f"(payment_intent_id {r['payment_intent_id'] if r else None}); payment row "
            f"{dict(pay) if pay else 'missing'}; events {events}; "
            f"stripe actions {ev.actions.get(pi['id'], [])}")


def no_event_oversold(ev: Evidence) -> Invariant:
    inv = Invariant("no event oversold (held + sold <= capacity; sold = completed holds' "
                    "tickets; held = active holds' tickets)")
    for r in ev.inventory:
        inv.checked += 1
        name = f"event {r['id']}"
        if r["held"] + r["sold"] > r["capacity"] or r["bucket_capacity"] != r["capacity"]:
            inv.fail(f"{name}: held {r['held']} + sold {r['sold']} > capacity {r['capacity']}")
        if r["sold"] != r["completed_q"]:
            inv.fail(f"{name}: sold {r['sold']} but completed reservations hold "
                     f"{r['completed_q']} tickets")
        if r["held"] != r["active_q"]:
            inv.fail(f"{name}: held {r['held']} but active reservations hold {r['active_q']}")
    return inv


def paid_once(ev: Evidence) -> Invariant:
    inv = Invariant("every PaymentIntent that succeeded at Stripe is sold exactly once or "
                    "refunded; nothing sold without a payment")
    sold_by: dict[str, list[str]] = {}
    for rid, r in ev.reservations.items():
        if r["status"] == "completed":
            sold_by.setdefault(r["payment_intent_id"] or "", []).append(rid)
    by_id = {pi["id"]: pi for pi in ev.stripe_intents}
    for pi in ev.stripe_intents:
        if pi["status"] != "succeeded":
            continue
        inv.checked += 1
        sold, refunded = sold_by.get(pi["id"], []), _refunded(pi)
        rid = pi.get("metadata", {}).get("reservation_id")
        if not sold and not refunded:
            inv.fail(f"{pi['id']} paid ({pi['amount']}) but neither sold nor refunded; "
                     f"{_story(ev, pi, rid)}")
        elif len(sold) > 1:
            inv.fail(f"{pi['id']} sold {len(sold)} times: {sold}; {_story(ev, pi, rid)}")
        elif sold and refunded:
            inv.fail(f"{pi['id']} sold (reservation {sold[0]}) and refunded too; "
                     f"{_story(ev, pi, rid)}")
    for pi_id, rids in sold_by.items():
        inv.checked += len(rids)
        pi = by_id.get(pi_id)
        if pi is None or pi["status"] != "succeeded":
            inv.fail(f"reservations {rids} completed with PaymentIntent {pi_id or None} that did "
                     f"not succeed at Stripe ({pi['status'] if pi else 'no such PaymentIntent'})")
    return inv


def one_intent_per_key(ev: Evidence, ledger: Ledger) -> Invariant:
    inv = Invariant("one PaymentIntent per idempotency key, one live per reservation, and none "
                    "at Stripe that boxoffice does not know")
    known = {r["stripe_payment_intent_id"] for r in ev.log if r["stripe_payment_intent_id"]}
    known |= set(ev.payments)
    live_per_reservation: dict[str, list[str]] = {}
    for pi in ev.stripe_intents:
        inv.checked += 1
        rid = pi.get("metadata", {}).get("reservation_id")
        if pi["id"] not in known:
            keys = [f"{r['idempotency_key']} ({r['recovery_point']}, {r['response_status']})"
                    for r in ev.log if str(r["reservation_id"]) == rid]
            inv.fail(f"{pi['id']} (reservation {rid}, {pi['status']}) is at Stripe but no key "
                     f"or payment row knows it; the reservation's keys: {keys}")
        if pi["id"] in known and pi["status"] != "canceled":
            live_per_reservation.setdefault(rid or "", []).append(pi["id"])
    for rid, pis in live_per_reservation.items():
        if len(pis) > 1:
            inv.fail(f"reservation {rid} has {len(pis)} live PaymentIntents: {pis}")
    per_key: dict[tuple[str, str], set[str]] = {}
    for r in ev.log:
        if r["stripe_payment_intent_id"]:
            per_key.setdefault((r["client_id"], r["idempotency_key"]), set()).add(
                r["stripe_payment_intent_id"])
    inv.checked += len(ledger.intent_keys)
    for key, pis in per_key.items():
        if len(pis) > 1:
            inv.fail(f"key {key[1]!r} has PaymentIntents {sorted(pis)}")
    return inv


def webhooks_applied(ev: Evidence, relay: WebhookRelay) -> Invariant:
    inv = Invariant("every Stripe event is in webhook_events_log once, processed or ignored")
    sent = {e["id"]: e["type"] for e in ev.stripe_events}
    for event_id, kind in sorted(sent.items() | relay.received.items()):
        inv.checked += 1
        status = ev.webhook_log.get(event_id)
        if event_id not in relay.received:
            inv.fail(f"{event_id} ({kind}) created at Stripe but never delivered to the relay")
        elif event_id not in relay.accepted:
            inv.fail(f"{event_id} ({kind}) never accepted by ingress")
        if status is None:
            inv.fail(f"{event_id} ({kind}) not in webhook_events_log")
        elif status not in ("processed", "ignored"):
            inv.fail(f"{event_id} ({kind}) is '{status}' in webhook_events_log")
    return inv


def expiry_announced(ev: Evidence) -> Invariant:
    inv = Invariant("one reservations.events.expired per expired hold; no hold overdue")
    for rid, r in ev.reservations.items():
        n = ev.expired_messages.get(rid, 0)
        if r["status"] == "expired" or n:
            inv.checked += 1
        if r["status"] == "expired" and n != 1:
            inv.fail(f"hold {rid} expired with {n} expired events on RESERVATIONS")
        elif n > 1:
            inv.fail(f"hold {rid} ({r['status']}) announced expired {n} times")
        elif n == 1 and r["status"] == "active":
            inv.fail(f"hold {rid} announced expired but still active")
    for rid in set(ev.expired_messages) - set(ev.reservations):
        inv.fail(f"expired event for unknown reservation {rid}")
    for what in ev.overdue:
        inv.fail(f"active hold overdue: {what}")
    return inv


def errors_stored(ev: Evidence, ledger: Ledger) -> Invariant:
    inv = Invariant("every acknowledged error report is in error_logs exactly once")
    for report_id in sorted(ledger.errors_acked):
        inv.checked += 1
        n = ev.errors_stored.get(report_id, 0)
        if n != 1:
            inv.fail(f"error report {report_id} acknowledged, stored {n} times")
    return inv


def promises_kept(ev: Evidence, ledger: Ledger) -> Invariant:
    inv = Invariant("every 201 is durable (hold, PaymentIntent) and every cancel 200 stands")
    logged = {r["stripe_payment_intent_id"]: r for r in ev.log if r["stripe_payment_intent_id"]}
    at_stripe = {pi["id"] for pi in ev.stripe_intents}
    for rid, quantity in ledger.holds.items():
        inv.checked += 1
        r = ev.reservations.get(rid)
        if r is None:
            inv.fail(f"hold {rid} answered 201 but does not exist")
        elif r["quantity"] != quantity:
            inv.fail(f"hold {rid} answered 201 for {quantity} tickets, has {r['quantity']}")
    for pi, rid in ledger.intents.items():
        inv.checked += 1
        row = logged.get(pi)
        if pi not in at_stripe:
            inv.fail(f"PaymentIntent {pi} answered 201 but is not at Stripe")
        if row is None or row["response_status"] != 201:
            inv.fail(f"PaymentIntent {pi} answered 201 but its key row is "
                     f"{'missing' if row is None else row['response_status']}")
        elif str(row["reservation_id"]) != rid:
            inv.fail(f"PaymentIntent {pi} answered for {rid}, logged for {row['reservation_id']}")
    for rid in ledger.cancelled:
        inv.checked += 1
        r = ev.reservations.get(rid)
        if r is None or r["status"] not in ("cancelled", "completed"):
            inv.fail(f"hold {rid} cancelled (200) but is {r['status'] if r else 'missing'}")
    return inv


def answers_well_formed(ledger: Ledger, relay: WebhookRelay) -> Invariant:
    inv = Invariant("no HTTP 500; every 503/504 with Retry-After; idempotent answers consistent")
    inv.checked = sum(ledger.ops.values()) + sum(relay.answers.values())
    inv.violations.extend(ledger.violations)
    inv.violations.extend(relay.violations)
    return inv


def check_all(ev: Evidence, ledger: Ledger, relay: WebhookRelay) -> list[Invariant]:
    return [no_event_oversold(ev), paid_once(ev), one_intent_per_key(ev, ledger),
            webhooks_applied(ev, relay), expiry_announced(ev), errors_stored(ev, ledger),
            promises_kept(ev, ledger), answers_well_formed(ledger, relay)]


def elapsed_since(t0: float) -> float:
    return round(time.monotonic() - t0, 1)
