"""The randomized fault run (issue 9): the whole stack under faults, then every promise checked.

Its own PostgreSQL, nats-server and localstripe, the five services as real processes under a
supervisor (two replicas of payment, webhook and reaper); Stripe's idempotency layer and its
webhook retries as proxies (``fault_stripe``).
Concurrent buyers hold, pay (good and declined cards, late, after cancelling), cancel, abandon
and play with idempotency keys; clients report errors over HTTP and on the bus. A nemesis
SIGKILLs and SIGSTOPs services, kills nats-server and every PostgreSQL process and restarts
them, and makes Stripe flaky. Then everything is healed, left to settle, and checked
(``fault_checks``).

``--fault-seconds=N`` (default 90) sets how long the faults last, ``--fault-seed=S`` replays a
run: the seed decides the schedule of faults and every buyer's sequence of operations (timing
aside). The seed is printed first and is in the failure message; the figures are printed at the
end and written to ``fault_run.json`` in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.checkout_support import Api
from tests.fault_checks import Invariant, check_all, gather_evidence, settle
from tests.fault_cluster import INSTANCES, Cluster
from tests.fault_stripe import FlakyStripe, StripeBuyer, WebhookRelay
from tests.fault_workload import Buyer, Ledger, Sale, Workload, bus_reporter
from tests.harness import ADMIN_TOKEN, WEBHOOK_SECRET

TTL_SECONDS = 4
BUYERS = 10
SETTLE_SECONDS = 120.0
DRAIN_SECONDS = 60.0  # a client still retrying when the faults stop gives up after this


def timeout_for_fault_seconds(seconds: float) -> float:
    """The test's pytest timeout (tests/conftest.py applies it): faults plus every bounded
    phase after them (heal, drain, settle, checks) and the setup."""
    return seconds + 90 + DRAIN_SECONDS + SETTLE_SECONDS + 60


@dataclass(frozen=True)
class Fault:
    at: float       # seconds into the run
    kind: str       # kill | pause | nats | postgres | stripe
    target: str     # a service, or the server
    seconds: float  # how long it lasts (pause, downtime, flaky window)


KINDS = {"kill": 30, "pause": 20, "nats": 12, "postgres": 12, "stripe": 14}


def schedule(seed: int, seconds: float, nats_targets: tuple[str, ...] = (),
             pg_targets: tuple[str, ...] = ()) -> list[Fault]:
    """The nemesis's plan, from the seed alone. Faults start 1-4 s apart and may overlap (a
    service killed while PostgreSQL is down); the two servers' own faults take turns. With a
    NATS cluster (``nats_targets``: its nodes and "all") a nats fault kills one node or every
    node; with a PostgreSQL pair (``pg_targets``) a PostgreSQL fault crashes its primary or its
    standby or fails over. With one server of each the plan is what it always was for the
    seed, and on a cluster the same faults at the same times: the targets are drawn apart."""
    rng, targets = random.Random(f"{seed}/nemesis"), random.Random(f"{seed}/targets")
    out, t = [], rng.uniform(2.0, 4.0)
    while t < seconds:
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        target = rng.choice(INSTANCES) if kind in ("kill", "pause") else kind
        if kind == "nats" and nats_targets:
            target = targets.choice(nats_targets)
        if kind == "postgres" and pg_targets:
            target = targets.choice(pg_targets)
        lasts = {"kill": 0.0, "pause": rng.uniform(1.0, 12.0), "nats": rng.uniform(0.5, 4.0),
                 "postgres": rng.uniform(0.5, 4.0), "stripe": rng.uniform(3.0, 10.0)}[kind]
        out.append(Fault(round(t, 2), kind, target, round(lasts, 2)))
        t += rng.uniform(1.0, 4.0)
    return out


async def flaky_window(proxy: FlakyStripe, seconds: float) -> None:
    proxy.windows += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        proxy.windows -= 1


async def inject(cluster: Cluster, proxy: FlakyStripe, f: Fault, injected: Counter[str],
                 troubles: list[str]) -> None:
    try:
        await _inject(cluster, proxy, f, injected)
    except Exception as exc:  # noqa: BLE001 - a server that would not restart: heal() retries
        troubles.append(f"{f}: {type(exc).__name__}: {exc}")


async def _inject(cluster: Cluster, proxy: FlakyStripe, f: Fault, injected: Counter[str]) -> None:
    if f.kind == "kill":
        cluster.kill_service(f.target)
        injected[f"SIGKILL {f.target}"] += 1
    elif f.kind == "pause":
        injected[f"SIGSTOP/SIGCONT {f.target}"] += 1
        await cluster.pause_service(f.target, f.seconds)
    elif f.kind == "nats":
        injected["nats-server SIGKILL and restart" if f.target == "nats"
                 else f"nats node {f.target} SIGKILL and restart"] += 1
        await cluster.kill_nats(f.seconds, f.target)
    elif f.kind == "postgres":
        injected[{"postgres": "PostgreSQL: every process SIGKILLed, restarted",
                  "primary": "PostgreSQL primary: every process SIGKILLed, restarted",
                  "standby": "PostgreSQL standby: every process SIGKILLed, restarted",
                  "failover": "PostgreSQL failover: primary SIGKILLed, standby promoted, "
                              "a new standby made"}[f.target]] += 1
        injected["PostgreSQL processes SIGKILLed"] += await cluster.kill_postgres(f.seconds,
                                                                                  f.target)
    else:
        injected["Stripe flaky window"] += 1
        await flaky_window(proxy, f.seconds)


async def nemesis(cluster: Cluster, proxy: FlakyStripe, plan: list[Fault], started: float,
                  injected: Counter[str], troubles: list[str]) -> None:
    """Each fault at its time, alongside those still running; returns when all are over."""
    running = []
    for f in plan:
        await asyncio.sleep(max(0.0, started + f.at - time.monotonic()))
        running.append(asyncio.create_task(inject(cluster, proxy, f, injected, troubles)))
    await asyncio.gather(*running)


def report(seed: int, seconds: float, ledger: Ledger, injected: Counter[str],
           proxy: FlakyStripe, relay: WebhookRelay, cluster: Cluster,
           invariants: list[Invariant], phases: dict[str, float]) -> dict:
    return {
        "seed": seed, "fault_seconds": seconds, "nats_nodes": cluster.nats_nodes,
        "pg_standby": cluster.pg_standby,
        "phases_seconds": phases,
        "operations": dict(sorted(ledger.ops.items())),
        "operations_total": sum(ledger.ops.values()),
        "faults": dict(sorted(injected.items())),
        "stripe_proxy_faults": dict(proxy.faults),
        "webhook_relay": {"events": len(relay.received), "shaped": dict(relay.shaped),
                          "answers": dict(relay.answers)},
        "service_restarts": dict(cluster.restarts),
        "promises": {"holds 201": len(ledger.holds), "PaymentIntents 201": len(ledger.intents),
                     "cancels 200": len(ledger.cancelled),
                     "error reports acknowledged": len(ledger.errors_acked)},
        "invariants": [{"name": i.name, "checked": i.checked, "violations": i.violations}
                       for i in invariants],
    }


def describe(figures: dict) -> str:
    lines = [f"fault run seed={figures['seed']}: {figures['operations_total']} operations, "
             f"{sum(v for k, v in figures['faults'].items() if 'processes' not in k)} faults, "
             f"phases {figures['phases_seconds']}"]
    lines.append("operations: " + ", ".join(f"{k}: {v}" for k, v in figures["operations"].items()))
    lines.append("faults: " + ", ".join(f"{k}: {v}" for k, v in figures["faults"].items()))
    lines.append(f"stripe proxy faults: {figures['stripe_proxy_faults']}; webhook relay: "
                 f"{figures['webhook_relay']}; service restarts: {figures['service_restarts']}")
    lines.append(f"promises recorded: {figures['promises']}")
    for inv in figures["invariants"]:
        mark = "ok" if not inv["violations"] else f"{len(inv['violations'])} VIOLATIONS"
        lines.append(f"  [{mark}] {inv['name']} ({inv['checked']} checked)")
    return "\n".join(lines)


def replay(seed: int, seconds: float, cluster: Cluster) -> str:
    nodes = f" --fault-nats-nodes={cluster.nats_nodes}" if cluster.nats_nodes != 1 else ""
    standby = " --fault-pg-standby" if cluster.pg_standby else ""
    return f"--fault-seed={seed} --fault-seconds={seconds:g}{nodes}{standby}"


def failure_message(seed: int, seconds: float, cluster: Cluster, invariants: list[Invariant],
                    path: Path) -> str:
    bad = [i for i in invariants if i.violations]
    out = [f"fault run seed={seed}: {len(bad)} of {len(invariants)} invariants violated "
           f"(replay: pytest tests/test_fault_run.py {replay(seed, seconds, cluster)}; "
           f"figures in {path})"]
    for inv in bad:
        out.append(f"[{inv.name}] seed={seed}, {len(inv.violations)} violations:")
        out.extend(f"  - {v}" for v in inv.violations[:15])
        if len(inv.violations) > 15:
            out.append(f"  ... and {len(inv.violations) - 15} more (see {path})")
    return "\n".join(out)


async def self_audit(api: Api) -> Invariant:
    """The stack's own audit, run in full at the end: it must find nothing either. A check that
    could not run (Stripe's lists through the flaky proxy) is not a violation; it is named."""
    inv = Invariant("the self-audit finds nothing (POST /v1/admin/invariants/run, full)", 1)
    r = await api.call("POST", "/v1/admin/invariants/run", token=ADMIN_TOKEN,
                       body={"full": True}, timeout=120)
    if r.status != 200:
        inv.fail(f"the audit answered {r.status}: {r.body[:300]!r}")
        return inv
    for check in r.json["checks"]:
        if check["violations"]:
            inv.fail(f"{check['check']}: {check['violations']} violations")
    for finding in r.json["findings"]:
        if finding.get("resolved_at") is None:
            inv.fail(f"{finding['check']}/{finding['kind']}: {finding['subject']}: expected "
                     f"{finding['expected']}, found {finding['found']}")
    return inv


def test_the_seed_decides_the_fault_schedule() -> None:
    plan = schedule(42, 90)
    assert plan == schedule(42, 90) != schedule(43, 90)
    assert {f.kind for f in plan} == set(KINDS) and plan[-1].at < 90
    assert all(f.target in INSTANCES for f in plan if f.kind in ("kill", "pause"))
    assert {f.target for f in plan if f.kind == "nats"} == {"nats"}
    # a cluster's plan: the same faults at the same times, its nats faults aimed at nodes
    nodes = ("n1", "n2", "n3", "all")
    on_cluster = schedule(42, 90, nodes)
    assert on_cluster == schedule(42, 90, nodes)
    assert [(f.at, f.kind, f.seconds) for f in on_cluster] == [
        (f.at, f.kind, f.seconds) for f in plan]
    assert {f.target for f in schedule(42, 600, nodes) if f.kind == "nats"} == set(nodes)
    pair = ("primary", "standby", "failover")
    with_pair = schedule(42, 600, pg_targets=pair)
    assert {f.target for f in with_pair if f.kind == "postgres"} == set(pair)
    assert with_pair == schedule(42, 600, pg_targets=pair) != schedule(42, 600)


@pytest.mark.slow
async def test_fault_run(request: pytest.FixtureRequest, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    seconds = float(request.config.getoption("--fault-seconds"))
    seed = request.config.getoption("--fault-seed")
    nats_nodes = int(request.config.getoption("--fault-nats-nodes"))
    pg_standby = bool(request.config.getoption("--fault-pg-standby"))
    if seed is None:
        seed = random.SystemRandom().randrange(1, 1_000_000)

    def say(text: str) -> None:
        with capsys.disabled():
            print(f"\n{text}", flush=True)

    cluster = Cluster(tmp_path / "stack", TTL_SECONDS, nats_nodes, pg_standby)
    plan = schedule(seed, seconds, cluster.nats_targets, cluster.pg_targets)
    on = ("one nats-server" if nats_nodes == 1 else f"{nats_nodes} nats nodes") + (
        ", PostgreSQL and its standby" if pg_standby else ", one PostgreSQL")
    say(f"fault run seed={seed} ({seconds:g} s of faults, {len(plan)} planned, {on}; replay with "
        f"{replay(seed, seconds, cluster)}); logs in {tmp_path / 'stack'}")
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    proxy = FlakyStripe("http://unset", random.Random(f"{seed}/stripe"))
    relay: WebhookRelay | None = None
    ledger, injected = Ledger(), Counter[str]()
    troubles: list[str] = []  # faults whose server did not come back when the fault ended
    invariants: list[Invariant] = []
    try:
        await cluster.start_servers()
        proxy.upstream = cluster.localstripe.url
        await proxy.start()
        cluster.stripe_base = proxy.url
        await cluster.start_services()
        relay = await WebhookRelay(f"{cluster.ingress_url}/v1/webhooks/stripe", WEBHOOK_SECRET,
                                   random.Random(f"{seed}/relay")).start()
        await asyncio.to_thread(cluster.localstripe.configure_webhook, relay.url, WEBHOOK_SECRET,
                                "fault-run")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http, \
                aiohttp.ClientSession() as stripe_http:
            api, stripe = Api(http, cluster.ingress_url), StripeBuyer(stripe_http,
                                                                      cluster.localstripe.url)
            sale_plan = random.Random(f"{seed}/sales")
            n_sales = max(3, round(seconds / 8))  # a new sale every ~8 s
            sales = []
            for i in range(n_sales):
                capacity = sale_plan.randint(10, 24)
                event_id = await api.create_event(capacity, price=sale_plan.choice((1500, 2500)),
                                                  buckets=sale_plan.randint(1, 4))
                sales.append(Sale(event_id, capacity, i * seconds / n_sales))
            phases["setup"] = round(time.monotonic() - t0, 1)

            started = time.monotonic()
            run = Workload(seed, api, stripe, ledger, sales, TTL_SECONDS, started,
                           end=started + seconds, give_up=started + seconds + DRAIN_SECONDS)
            clients = [asyncio.create_task(Buyer(run, n).loop()) for n in range(BUYERS)]
            clients.append(asyncio.create_task(bus_reporter(run, cluster.nats_servers)))
            await nemesis(cluster, proxy, plan, started, injected, troubles)
            await asyncio.sleep(max(0.0, run.end - time.monotonic()))
            phases["faults"] = round(time.monotonic() - started, 1)

            t = time.monotonic()
            unhealed = await cluster.heal()
            done, stuck = await asyncio.wait(clients, timeout=DRAIN_SECONDS + 15)
            for task in stuck:
                task.cancel()
            for task in done:
                task.result()  # a client that crashed is a bug of this test: fail loudly
            phases["heal and drain"] = round(time.monotonic() - t, 1)

            t = time.monotonic()
            unsettled = await settle(cluster, relay, stripe, SETTLE_SECONDS)
            phases["settle"] = round(time.monotonic() - t, 1)

            t = time.monotonic()
            try:
                evidence = await gather_evidence(cluster, stripe, ledger)
            except Exception as exc:  # noqa: BLE001 - reported with the figures, not lost
                gathered = Invariant("the outcome can be read (PostgreSQL, streams, Stripe)", 1)
                gathered.fail(f"{type(exc).__name__}: {exc}")
                invariants = [gathered]
            else:
                invariants = check_all(evidence, ledger, relay)
            calm = Invariant("the stack heals and settles after the faults", checked=1)
            calm.violations.extend(f"did not recover from {t}" for t in troubles)
            if unhealed:
                calm.fail(f"services not ready after healing: {unhealed}")
            if stuck:
                calm.fail(f"{len(stuck)} clients still busy {DRAIN_SECONDS:g}s after the faults")
            if unsettled:
                calm.fail(f"not settled within {SETTLE_SECONDS:g}s: {'; '.join(unsettled)}")
            invariants.append(calm)
            invariants.append(await self_audit(api))
            phases["checks"] = round(time.monotonic() - t, 1)
    finally:
        if relay is not None:
            await relay.close()
        await proxy.close()
        await cluster.close()

    figures = report(seed, seconds, ledger, injected, proxy, relay, cluster, invariants, phases)
    figures["plan"] = [asdict(f) for f in plan]
    path = tmp_path / "fault_run.json"
    path.write_text(json.dumps(figures, indent=2, default=str))
    say(describe(figures) + f"\nfigures written to {path}")
    assert not any(i.violations for i in invariants), \
        failure_message(seed, seconds, cluster, invariants, path)
