"""Webhook benchmarks: accepted webhooks/s at ingress, and applied events/s in the webhook service.

Run: ``.venv/bin/python -m bench.webhooks`` (about a minute). Prints one JSON object with the
figures and the baselines measured in the same run, on the same machine:

- ingress: signed ~1.5 kB Stripe events POSTed by 64 concurrent clients to a real ingress
  process, against (a) a plain aiohttp handler in its own process (read the body, answer JSON),
  (b) a bare aiohttp handler in its own process that awaits the same JetStream publish (PubAck)
  before answering, and (c) plain JetStream publishes with PubAck (64 concurrent, from this
  process); once with nats-server's default fsync and once with ``sync_interval: always``.
- webhook service: a real webhook process applying ``payment_intent.succeeded`` events (each
  completes a hold: log row, payment row, reservation, inventory, two outbox rows relayed to
  JetStream, one transaction) from STRIPE_EVENTS, and then events that are only recorded
  (``charge.succeeded``), against plain single-row insert transactions on 16 connections into
  the same PostgreSQL, measured before and after the applied events (the mean of the two); once
  with nats-server's default fsync (``apply``) and once with ``sync_interval: always``
  (``apply_sync_always``), where the relay's two events per applied event cost an fsync each.

``--quick`` runs each phase on about a fifth of the requests and events. ``--replicas N`` runs
N ingress processes on one port (``INGRESS_REUSE_PORT=1``) and N webhook processes on one durable
consumer, the baselines staying single processes. ``--apply-only`` runs only the webhook
service's round.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from nats.js import JetStreamContext

from bench.cpu import cpu_seconds, tree
from bench.polls import wait_until
from boxoffice import bus as busmod
from boxoffice import migrate
from boxoffice.embedded import NatsServer, Postgres, free_port, wait_port

SECRET = "whsec_bench_secret_0123456789"
CONCURRENCY = 64
WARM_UP = 500


@dataclass(frozen=True)
class Sizes:
    requests: int = 16_500  # per ingress round, warm-up included
    apply_events: int = 10_000
    inserts: int = 10_000
    recorded_events: int = 5_000


JS = web.AppKey("js", JetStreamContext)  # the bare publishing baseline's JetStream
QUICK = Sizes(requests=3_500, apply_events=2_000, inserts=2_000, recorded_events=1_000)


def body_for(i: int, reservation: str | None = None) -> bytes:
    """A Stripe-like payment_intent.succeeded event of about 1.5 kB."""
    pi = f"pi_{uuid.uuid4().hex[:24]}"
    return json.dumps({
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "api_version": "2024-06-20",
        "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
        "request": {"id": f"req_{uuid.uuid4().hex[:14]}", "idempotency_key": str(uuid.uuid4())},
        "type": "payment_intent.succeeded",
        "data": {"object": {
            "id": pi, "object": "payment_intent", "amount": 2500, "amount_capturable": 0,
            "amount_received": 2500, "capture_method": "automatic", "currency": "eur",
            "client_secret": f"{pi}_secret_{uuid.uuid4().hex}", "confirmation_method": "automatic",
            "created": int(time.time()) - 30, "customer": None, "description": f"order {i}",
            "latest_charge": f"ch_{uuid.uuid4().hex[:24]}", "livemode": False,
            "metadata": {"reservation_id": reservation or str(uuid.uuid4())},
            "payment_method": f"pm_{uuid.uuid4().hex[:24]}",
            "payment_method_types": ["card"], "status": "succeeded",
            "payment_method_options": {"card": {"installments": None, "network": None,
                                                "request_three_d_secure": "automatic"}},
            "shipping": None, "statement_descriptor": None, "transfer_data": None,
            "charges": {"object": "list", "has_more": False, "total_count": 1,
                        "url": f"/v1/charges?payment_intent={pi}", "data": []},
            "last_payment_error": None, "next_action": None, "receipt_email": "buyer@example.com",
            "setup_future_usage": None, "source": None, "review": None,
            "application_fee_amount": None, "canceled_at": None, "cancellation_reason": None,
        }},
    }).encode()


def sign(body: bytes) -> str:
    t = int(time.time())
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100)
    return {"per_second": round(len(latencies) / seconds), "p50_ms": round(q[49] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2)}


async def load(url: str, bodies: list[tuple[bytes, str]],
               pids: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """POST ``bodies`` from CONCURRENCY clients; with ``pids``, the CPU milliseconds each of
    those processes spent per request meanwhile."""
    before = {name: cpu_seconds(p) for name, p in (pids or {}).items()}
    latencies: list[float] = []
    failures = 0
    queue = iter(bodies)

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal failures
        for body, sig in queue:
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers={"Stripe-Signature": sig,
                                                       "Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(CONCURRENCY)))
        took = time.perf_counter() - t0
    out: dict[str, Any] = {**summary(latencies, took), "failed": failures}
    if pids:
        out["cpu_ms_per_request"] = {name: round((cpu_seconds(p) - before[name]) * 1000
                                                 / len(bodies), 3) for name, p in pids.items()}
    return out


async def plain_publishes(nats_url: str, n: int) -> dict[str, float]:
    async with busmod.connect(nats_url, "bench") as bus:
        await bus.declare_streams("STRIPE_EVENTS")
        body = body_for(0)
        latencies: list[float] = []
        ids = iter(range(n))

        async def worker() -> None:
            for i in ids:
                t0 = time.perf_counter()
                await bus.js.publish("stripe.events.bench", body,
                                     headers={"Nats-Msg-Id": f"plain-{i}-{uuid.uuid4().hex}"})
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return summary(latencies, time.perf_counter() - t0)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=out)


def service_env(nats_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "DATABASE_", "STRIPE_", "SENTRY_", "BOXOFFICE_"))}
    env.update({"NATS_URL": nats_url, "STRIPE_WEBHOOK_SECRET": SECRET, "LOG_LEVEL": "WARNING",
                "CLIENT_API_TOKENS": "bench-client-token-aaaaaaaa",
                "ADMIN_API_TOKENS": "bench-admin-token-bbbbbbbbb", "BOXOFFICE_ENV": "bench",
                "STRIPE_API_KEY": "sk_test_bench"})
    env.update(extra)
    return env


async def ingress_round(root: Path, sync_always: bool, sizes: Sizes, replicas: int = 1
                        ) -> dict[str, Any]:
    nats = NatsServer(root / ("nats-sync" if sync_always else "nats-default"),
                      sync_always=sync_always).start()
    procs: list[subprocess.Popen] = []
    try:
        publishes = await plain_publishes(nats.url, sizes.requests)
        ports = {"plain": free_port(), "publish": free_port(), "ingress": free_port()}
        procs.append(spawn([sys.executable, "-m", "bench.webhooks", "--plain-server",
                            str(ports["plain"])], dict(os.environ), root / "plain.log"))
        procs.append(spawn([sys.executable, "-m", "bench.webhooks", "--plain-server",
                            str(ports["publish"]), nats.url], dict(os.environ),
                           root / "publish.log"))
        shared = {"INGRESS_REUSE_PORT": "1"} if replicas > 1 else {}
        health = [free_port() for _ in range(replicas)]
        ingresses = [spawn([sys.executable, "-m", "boxoffice.cli", "run", "ingress"],
                           service_env(nats.url, INGRESS_PORT=str(ports["ingress"]),
                                       HEALTH_PORT=str(hp), **shared),
                           root / f"ingress-{i}.log") for i, hp in enumerate(health)]
        procs.append(ingresses[0])
        for proc, port in zip(procs, ports.values()):
            wait_port(port, 30, proc)
        for proc, hp in zip(ingresses, health):  # each replica, on its own health port
            wait_port(hp, 30, proc)
        bodies = [(b, sign(b)) for b in (body_for(i) for i in range(sizes.requests))]
        warm, half = bodies[:WARM_UP], (sizes.requests - WARM_UP) // 2
        urls = {name: f"http://127.0.0.1:{port}/v1/webhooks/stripe" for name, port in ports.items()}
        assert nats.proc is not None
        # whose CPU each request costs: the handler's process, and nats-server's
        pids = {name: {name: [proc.pid], "nats": [nats.proc.pid]}
                for name, proc in zip(ports, procs)}
        pids["plain"].pop("nats")
        pids["ingress"]["ingress"] = [p.pid for p in ingresses]
        for url in urls.values():
            await load(url, warm)
        # alternate, best of two: the machine is shared, so a burst elsewhere hits one run only
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        for part in (bodies[WARM_UP:WARM_UP + half], bodies[WARM_UP + half:]):
            for name, url in urls.items():
                runs[name].append(await load(url, part, pids[name]))
        best = {name: max(r, key=lambda one: one["per_second"]) for name, r in runs.items()}
        ingress, plain, publish = best["ingress"], best["plain"], best["publish"]
        return {"ingress": ingress, "plain_aiohttp": plain,
                "plain_aiohttp_awaiting_publish": publish,
                "plain_jetstream_publish": publishes,
                "ingress_vs_aiohttp": round(ingress["per_second"] / plain["per_second"], 2),
                "ingress_vs_aiohttp_publish": round(ingress["per_second"] / publish["per_second"],
                                                    2),
                "ingress_vs_jetstream": round(ingress["per_second"] / publishes["per_second"], 2)}
    finally:
        for p in [*procs, *ingresses[1:]]:
            p.terminate()
            p.wait(15)
        nats.stop()


async def plain_inserts(url: str, n: int, connections: int = 16,
                        table: str = "bench_rows") -> dict[str, float]:
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    try:
        await pool.execute(f"CREATE TABLE {table} (event_id text PRIMARY KEY, payload jsonb)")
        payload = json.dumps({"n": 1, "pad": "x" * 1400})
        ids = iter(range(n))
        latencies: list[float] = []

        async def worker() -> None:
            async with pool.acquire() as conn:
                for i in ids:
                    t0 = time.perf_counter()
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES ($1, $2::jsonb)",
                                           f"evt_{i}", payload)
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return summary(latencies, time.perf_counter() - t0)
    finally:
        await pool.close()


async def applied(conn: asyncpg.Connection, event_type: str, n: int) -> tuple[int, float]:
    """Wait until ``n`` events of ``event_type`` are done; (how many, seconds first to last)."""
    deadline = time.monotonic() + 120
    while True:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(processed_at) - min(processed_at)) AS s "
            "FROM webhook_events_log WHERE event_type = $1 AND processed_at IS NOT NULL",
            event_type)
        if row["n"] >= n or time.monotonic() > deadline:
            return row["n"], float(row["s"] or 1)
        await asyncio.sleep(0.2)


async def events_relayed(conn: asyncpg.Connection, event_type: str) -> float:
    """Wait until the applied events' domain events (a payment's and a hold's, two each) have
    left the outbox, published; seconds from the first applied event until then."""
    await wait_until(conn, "SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE subject = ANY($1))",
                     ["payments.events.succeeded", "reservations.events.completed"],
                     timeout=600, every=0.1)
    return round(float(await conn.fetchval(
        "SELECT extract(epoch FROM clock_timestamp() - min(processed_at)) FROM webhook_events_log "
        "WHERE event_type = $1 AND processed_at IS NOT NULL", event_type)), 2)


TOP_STATEMENTS = """
SELECT calls, round(total_exec_time::numeric, 1) AS ms, round(total_plan_time::numeric, 1) AS plan_ms,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 140) AS query
FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 25"""


async def apply_round(root: Path, sizes: Sizes, replicas: int = 1, pg_stats: bool = False,
                      sync_always: bool = False) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    pg = Postgres(root / "pg" / "data")
    if pg_stats:  # every statement's time, nested ones (in SQL functions) too
        pg.settings.update({"shared_preload_libraries": "pg_stat_statements",
                            "pg_stat_statements.track": "all",
                            "pg_stat_statements.track_planning": "on"})
    pg.start(create_db="boxoffice")
    nats = NatsServer(root / f"nats-apply{'-sync' if sync_always else ''}",
                      sync_always=sync_always).start()
    procs: list[subprocess.Popen] = []
    try:
        url = pg.url("boxoffice")
        await asyncio.to_thread(migrate.run, url, "up")
        inserts: dict[str, Any] = await plain_inserts(url, sizes.inserts)
        conn = await asyncpg.connect(url)
        try:
            ev = await conn.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'bench', $1,"
                                     " 2500, 'eur', 64)", sizes.apply_events)
            holds = [str(r[0]) for r in await conn.fetch(
                "SELECT (hold_tickets($1, 1, 'bench', 3600)).id FROM generate_series(1, $2)",
                ev, sizes.apply_events)]
        finally:
            await conn.close()
        async with busmod.connect(nats.url, "bench") as bus:
            await bus.declare_streams("STRIPE_EVENTS")
            bodies = [body_for(i, r) for i, r in enumerate(holds)]
            for i in range(0, len(bodies), 1000):
                await asyncio.gather(*(bus.publish("stripe.events.payment_intent.succeeded", b,
                                                   json.loads(b)["id"]) for b in bodies[i:i + 1000]))
        for i in range(replicas):
            port = free_port()
            procs.append(spawn([sys.executable, "-m", "boxoffice.cli", "run", "webhook"],
                               service_env(nats.url, DATABASE_URL=url, HEALTH_PORT=str(port)),
                               root / f"webhook-{i}.log"))
            wait_port(port, 60, procs[-1])  # (its start-up's CPU is not the events')
        assert pg.proc is not None and nats.proc is not None
        pids = {"webhook": [p.pid for p in procs], "postgres": tree(pg.proc.pid),
                "nats": [nats.proc.pid]}
        conn = await asyncpg.connect(url)
        try:
            first = await conn.fetchval("SELECT count(*) FROM webhook_events_log "
                                        "WHERE processed_at IS NOT NULL")
            if pg_stats:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; "
                                   "SELECT pg_stat_statements_reset()")
            before = {name: cpu_seconds(p) for name, p in pids.items()}
            done, span = await applied(conn, "payment_intent.succeeded", sizes.apply_events)
            relayed = await events_relayed(conn, "payment_intent.succeeded")
            top = [dict(r) for r in await conn.fetch(TOP_STATEMENTS)] if pg_stats else None
            pids["postgres"] = tree(pg.proc.pid)  # the backends as they are now
            cpu = {name: round((cpu_seconds(p) - before[name]) * 1000 / max(1, done - first), 3)
                   for name, p in pids.items()}
            # the baseline again, right after: the figure is compared with the mean of the two
            # rounds around it (measured once, it moved by a third between two runs of this
            # bench on a shared machine)
            after = await plain_inserts(url, sizes.inserts, table="bench_rows_after")
            rounds = [inserts["per_second"], after["per_second"]]
            inserts = {"per_second": round(sum(rounds) / 2), "rounds_per_s": rounds,
                       "p50_ms": inserts["p50_ms"], "p99_ms": inserts["p99_ms"]}
            completed = await conn.fetchval("SELECT count(*) FROM reservations "
                                            "WHERE status = 'completed'")
            # the floor of the pipeline: events that are only recorded (no effects). Published
            # with the webhook processes stopped (SIGSTOP), as the applied ones were published
            # before they started: else the figure is the rate of this publishing (with
            # sync_interval always a third of the recording's), not of the recording
            for proc in procs:
                proc.send_signal(signal.SIGSTOP)
            try:
                async with busmod.connect(nats.url, "bench") as bus:
                    other = [body_for(i).replace(b'"payment_intent.succeeded"',
                                                 b'"charge.succeeded"')
                             for i in range(sizes.recorded_events)]
                    await asyncio.gather(*(bus.publish("stripe.events.charge.succeeded", b,
                                                       json.loads(b)["id"]) for b in other))
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGCONT)
            recorded, recorded_span = await applied(conn, "charge.succeeded",
                                                    sizes.recorded_events)
        finally:
            await conn.close()
        return {"webhook_applied": {"event_type": "payment_intent.succeeded", "events": done,
                                    "completed_reservations": completed,
                                    "per_second": round(done / span),
                                    "cpu_ms_per_event": cpu,
                                    # from the first applied to the last of their domain events
                                    # on JetStream (the relay may trail the applying)
                                    "all_events_on_jetstream_s": relayed},
                "webhook_recorded_only": {"event_type": "charge.succeeded", "events": recorded,
                                          "per_second": round(recorded / recorded_span)},
                "plain_insert_transactions_16_connections": inserts,
                "applied_vs_inserts": round(done / span / inserts["per_second"], 2),
                **({"pg_statements_while_applying": top} if top is not None else {})}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        nats.stop()
        pg.stop()


async def main(sizes: Sizes, replicas: int = 1, apply_only: bool = False,
               pg_stats: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        root = Path(tmp)
        out: dict[str, Any] = {"benchmark": "webhooks", "replicas": replicas,
                               "concurrency": CONCURRENCY,
                               "requests_per_run": (sizes.requests - WARM_UP) // 2, "best_of": 2,
                               "machine": {"cpus": os.cpu_count(),
                                           "load_avg_1m_before": round(os.getloadavg()[0], 2)}}
        if not apply_only:
            out["fsync_default"] = await ingress_round(root, False, sizes, replicas)
            out["fsync_always"] = await ingress_round(root, True, sizes, replicas)
        out["apply"] = await apply_round(root / "apply", sizes, replicas, pg_stats)
        out["apply_sync_always"] = await apply_round(root / "apply-sync", sizes, replicas,
                                                     pg_stats, sync_always=True)
        out["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        return out


def plain_server(port: int, nats_url: str | None) -> None:
    """A baseline: one aiohttp process that reads the body and answers JSON; with ``nats_url``,
    it first awaits the JetStream publish of the body (its PubAck), as ingress does."""
    import nats
    import uvloop

    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if nats_url:
            await app[JS].publish("stripe.events.payment_intent.succeeded", body,
                                  headers={"Nats-Msg-Id": uuid.uuid4().hex})
        return web.json_response({"received": True})

    async def bus(app: web.Application) -> Any:
        nc = await nats.connect(nats_url) if nats_url else None
        if nc is not None:
            app[JS] = nc.jetstream()
        yield
        if nc is not None:
            await nc.drain()

    app.cleanup_ctx.append(bus)
    app.router.add_post("/v1/webhooks/stripe", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--plain-server":
        plain_server(int(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else None)
    else:
        parser = argparse.ArgumentParser(prog="bench.webhooks")
        parser.add_argument("--quick", action="store_true", help="about a fifth of the sizes")
        parser.add_argument("--replicas", type=int, default=1, choices=range(1, 9),
                            help="processes of ingress and of the webhook service (default 1)")
        parser.add_argument("--apply-only", action="store_true",
                            help="only the webhook service's round (applied and recorded events)")
        parser.add_argument("--pg-stats", action="store_true",
                            help="load pg_stat_statements and report the statements that took "
                                 "PostgreSQL's time while events were applied (costs some)")
        args = parser.parse_args()
        import uvloop
        print(json.dumps(uvloop.run(main(QUICK if args.quick else Sizes(), args.replicas,
                                         args.apply_only, args.pg_stats)), default=str))
