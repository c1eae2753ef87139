"""Checkout benchmark: PaymentIntent overhead, replays of a stored key, holds on one hot event.

Runs its own PostgreSQL, nats-server (``sync_interval: always``, as ``boxoffice up``), localstripe
and the payment and ingress services as real processes, then measures, each against a raw
baseline taken in the same run:

- PaymentIntent creation through ingress (HTTP -> NATS -> payment -> PostgreSQL -> localstripe)
  vs a direct stripe-python call to localstripe, interleaved one for one: p50/p99, and the p50
  difference (our overhead; goal <= 3 ms), beside a durable single-row commit timed in the same
  loop (two WAL flushes, the claim's and the record's, are the overhead's floor);
- replays of one stored Idempotency-Key through ingress: requests/s and p50 (goal >= 3,000/s);
- checkouts (a hold, then its PaymentIntent) through ingress, 16 buyers at a time, against
  PaymentIntents created directly at localstripe with the same concurrency;
- holds on one hot event, 64 concurrent clients: ``hold_tickets`` over 64 PostgreSQL connections
  vs a plain single-row ``UPDATE ... SET available = available - 1`` (goal >= 1,000 holds/s), the
  same holds end to end through ingress (driven by wrk when it is installed, Debian's ``wrk``;
  else by an aiohttp loop in this process), and a sell-out race that must end with exactly capacity
  tickets held (zero oversell). Each of the two hold figures is measured in three rounds
  alternated with rounds of the plain UPDATE, and compared with the median of those.

    .venv/bin/python -m bench.checkout            # about 60 s
    .venv/bin/python -m bench.checkout --quick    # shorter phases
    .venv/bin/python -m bench.checkout --replicas 2   # two payment and two ingress processes
    .venv/bin/python -m bench.checkout --only-intents --intents 250   # the overhead alone

With ``--replicas N`` the services under test run as N processes each: payment replicas share
its NATS queue group, ingress replicas one port (``INGRESS_REUSE_PORT=1``, SO_REUSEPORT). With
``--nats-nodes 3`` the bus is a cluster of three nats-servers on loopback with every stream
replicated three times (``BOXOFFICE_NATS_NODES=3``), each node's CPU counted apart (``nats-1``..).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import stripe

from bench.cpu import cpu_seconds, tree
from boxoffice import db, migrate
from boxoffice.embedded import LocalStripe, NatsCluster, NatsServer, Postgres, die_with_parent, free_port

CLIENT = "bench-client-token-aaaaaaaaaaaa"
ADMIN = "bench-admin-token-bbbbbbbbbbbbb"
STRIPE_KEY = "sk_test_boxoffice_bench"
CONCURRENCY = 64


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)


class Services:
    def __init__(self, root: Path, nats_url: str, db_url: str, stripe_base: str):
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("NATS_", "DATABASE_", "STRIPE_", "BOXOFFICE_"))}
        self.env.update({"NATS_URL": nats_url, "DATABASE_URL": db_url,
                         "STRIPE_API_KEY": STRIPE_KEY, "STRIPE_API_BASE": stripe_base,
                         "STRIPE_WEBHOOK_SECRET": "whsec_bench_secret", "LOG_LEVEL": "WARNING",
                         "CLIENT_API_TOKENS": CLIENT, "ADMIN_API_TOKENS": ADMIN})
        self.procs: list[subprocess.Popen] = []
        self.ingress_url = ""

    def start(self, service: str, shared_port: int | None = None) -> str:
        """Start one process of ``service``; its URL (ingress: its public one). Ingress given a
        ``shared_port`` listens there beside other ingress processes (SO_REUSEPORT)."""
        port = health = free_port()  # each process is checked on its own port
        env = dict(self.env, HEALTH_PORT=str(health))
        if service == "ingress":
            env.pop("DATABASE_URL")
            env.pop("STRIPE_API_KEY")
            port = shared_port or free_port()
            env["INGRESS_PORT"] = str(port)
            if shared_port is not None:
                env["INGRESS_REUSE_PORT"] = "1"
        with open(self.root / f"{service}-{len(self.procs)}.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "boxoffice.cli", "run", service],
                                    env=env, stdout=out, stderr=out, preexec_fn=die_with_parent)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return f"http://127.0.0.1:{port}"
            except OSError:
                pass
            if proc.poll() is not None:
                log = (self.root / f"{service}-{len(self.procs) - 1}.log").read_text()
                raise RuntimeError(f"{service} exited: {log[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{service} not ready")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.s = session
        self.base = base

    async def post(self, path: str, body: Any, token: str = CLIENT,
                   key: str | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if key:
            headers["Idempotency-Key"] = key
        async with self.s.post(self.base + path, data=json.dumps(body), headers=headers) as r:
            return r.status, await r.read()

    async def event(self, capacity: int, price: int = 2500) -> str:
        status, body = await self.post("/v1/admin/events", {
            "name": "bench", "capacity": capacity, "price": price, "currency": "eur"}, ADMIN)
        assert status == 201, body
        return json.loads(body)["id"]

    async def hold(self, event_id: str, quantity: int = 1) -> tuple[int, bytes]:
        return await self.post("/v1/reservations", {"event_id": event_id, "quantity": quantity})


async def bench_intents(c: Client, stripe_base: str, n: int, db_url: str) -> dict[str, Any]:
    """Each PaymentIntent through ingress, then one made directly with stripe-python, then one
    durable single-row commit on a connection of this client's (the WAL flush each of the claim
    and the record must wait for: two of them are the floor of the overhead, measured in the
    same run as the rest, since another load on the disk moves them most)."""
    event_id = await c.event(capacity=n + 10)
    holds = []
    for _ in range(n):
        status, body = await c.hold(event_id)
        assert status == 201, body
        holds.append(json.loads(body)["id"])
    http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=5))
    sdk = stripe.StripeClient(STRIPE_KEY, http_client=http, base_addresses={"api": stripe_base})
    ours, direct, commits = [], [], []
    conn = await asyncpg.connect(db_url)
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_durable_commit "
                       "(id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")

    def processes() -> dict[str, list[int]]:
        """The processes this run started (this one's children), by what they run: each
        service's replicas together, PostgreSQL with its backends."""
        found: dict[str, list[int]] = {"bench_client": [os.getpid()]}
        for pid in tree(os.getpid())[1:]:
            try:
                argv = [a.decode() for a in
                        Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            except OSError:
                continue
            if not argv:
                continue
            name = argv[-1] if "boxoffice.cli" in argv else Path(argv[0]).name
            found.setdefault(name, []).extend(tree(pid) if name == "postgres" else [pid])
        return found

    procs = processes()
    before = {name: cpu_seconds(pids) for name, pids in procs.items()}
    try:
        for i, rid in enumerate(holds):  # interleaved, so both see the same emulator state
            t = time.perf_counter()
            status, body = await c.post("/v1/payment_intents", {"reservation_id": rid},
                                        key=f"bench-{rid}")
            ours.append(time.perf_counter() - t)
            assert status == 201, body
            t = time.perf_counter()
            await sdk.v1.payment_intents.create_async(
                params={"amount": 2500, "currency": "eur", "metadata": {"reservation_id": rid}},
                options={"idempotency_key": f"direct-{i}-{uuid.uuid4()}"})
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_durable_commit DEFAULT VALUES")
            commits.append(time.perf_counter() - t)
    finally:
        await http.close_async()
        await conn.close()
    after = {name: cpu_seconds(pids) for name, pids in procs.items()}
    return {"requests": n,
            "ingress_p50_ms": pct(ours, 0.5), "ingress_p99_ms": pct(ours, 0.99),
            "ingress_mean_ms": round(sum(ours) / len(ours) * 1000, 3),
            "direct_sdk_p50_ms": pct(direct, 0.5), "direct_sdk_p99_ms": pct(direct, 0.99),
            "overhead_p50_ms": round(pct(ours, 0.5) - pct(direct, 0.5), 3),
            "durable_commit_p50_ms": pct(commits, 0.5),
            # what is left once the claim's and the record's WAL flushes are taken out
            "overhead_beyond_two_commits_p50_ms": round(
                pct(ours, 0.5) - pct(direct, 0.5) - 2 * pct(commits, 0.5), 3),
            # CPU per pair (one through ingress, one direct; localstripe and this client serve
            # both): steadier than the latencies on a shared machine
            "cpu_us_per_pair": {name: round((after[name] - before[name]) / n * 1e6)
                                for name in sorted(before)},
            "key": holds[0]}


async def phase_means(session: aiohttp.ClientSession, payment_url: str) -> dict[str, float]:
    """Mean time per phase inside the payment service (its Prometheus histogram)."""
    async with session.get(payment_url + "/metrics") as r:
        text = await r.text()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"boxoffice_payment_intent_phase_seconds{suffix}{{phase=\""
            if line.startswith(prefix):
                phase = line[len(prefix):].split('"', 1)[0]
                into[phase] = float(line.rsplit(" ", 1)[1])
    return {phase: round(sums[phase] / counts[phase] * 1000, 3) for phase in sums if counts[phase]}


def outside_payment_ms(intents: dict[str, Any]) -> float:
    """The mean time of a PaymentIntent outside payment's phases: HTTP to ingress and back,
    ingress's handling, the NATS request and reply, payment's decoding and encoding (means on
    both sides: payment's histograms give no percentiles, and a p50 against means goes negative
    as soon as a few slow requests lift the means)."""
    return round(intents["ingress_mean_ms"] - sum(intents["payment_service_mean_ms"].values()), 3)


async def closed_loop(fn, seconds: float, workers: int) -> tuple[int, list[float], float]:
    """Run ``fn`` from ``workers`` concurrent loops for ``seconds``; count and latencies."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> int:
        done = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await fn()
            lat.append(time.perf_counter() - t)
            done += 1
        return done

    start = time.perf_counter()
    counts = await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(counts), lat, time.perf_counter() - start


async def bench_checkouts(c: Client, stripe_base: str, seconds: float,
                          workers: int = 16) -> dict[str, Any]:
    """Buyers per second: a hold and its PaymentIntent through ingress, ``workers`` at a time,
    against PaymentIntents created directly at the emulator with the same concurrency (its
    ceiling: no checkout can go faster than its Stripe call)."""
    event_id = await c.event(capacity=5_000_000)

    async def checkout() -> None:
        status, body = await c.hold(event_id)
        assert status == 201, body
        status, body = await c.post("/v1/payment_intents",
                                    {"reservation_id": json.loads(body)["id"]},
                                    key=str(uuid.uuid4()))
        assert status == 201, body

    http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=10))
    sdk = stripe.StripeClient(STRIPE_KEY, http_client=http, base_addresses={"api": stripe_base})

    async def direct() -> None:
        await sdk.v1.payment_intents.create_async(
            params={"amount": 2500, "currency": "eur"},
            options={"idempotency_key": str(uuid.uuid4())})

    try:
        n_direct, lat_direct, t_direct = await closed_loop(direct, seconds, workers)
    finally:
        await http.close_async()
    n, lat, elapsed = await closed_loop(checkout, seconds, workers)
    return {"concurrency": workers, "checkouts": n, "per_s": round(n / elapsed, 1),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "direct_payment_intents_per_s": round(n_direct / t_direct, 1),
            "direct_p50_ms": pct(lat_direct, 0.5)}


async def bench_replays(c: Client, rid: str, seconds: float) -> dict[str, Any]:
    key = f"bench-{rid}"
    status, expected = await c.post("/v1/payment_intents", {"reservation_id": rid}, key=key)
    assert status == 201

    async def replay() -> None:
        s, body = await c.post("/v1/payment_intents", {"reservation_id": rid}, key=key)
        assert s == 201 and body == expected

    n, lat, elapsed = await closed_loop(replay, seconds, 32)
    return {"concurrency": 32, "requests": n, "per_s": round(n / elapsed), "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99)}


PLAIN_TABLE = ("CREATE TABLE IF NOT EXISTS bench_plain_inventory "
               "(id int PRIMARY KEY, available int NOT NULL)")
PLAIN_RESET = ("INSERT INTO bench_plain_inventory VALUES (1, 100000000) "
               "ON CONFLICT (id) DO UPDATE SET available = 100000000")
# with a parameter, so prepared once per connection like the hold's (a bare execute() would be
# parsed and planned on every call)
PLAIN_UPDATE = ("UPDATE bench_plain_inventory SET available = available - 1 "
                "WHERE id = $1 AND available > 0")
ROUNDS = 3  # alternated rounds of a figure and its baseline; the median round of each is reported


class PlainUpdate:
    """The holds' baseline on its own 64 connections, measured in rounds alternated with the
    rounds of the holds through ingress: the plain single-row UPDATE of ``bench_holds_db``, the
    same statement, pool and client loop. A baseline measured minutes apart, in another phase,
    moved by up to a third between the two on a shared machine."""

    def __init__(self, db_url: str):
        self.db_url = db_url
        self.pool: asyncpg.Pool | None = None
        self.idle: list[asyncpg.Connection] = []

    async def __aenter__(self) -> PlainUpdate:
        self.pool = await asyncpg.create_pool(self.db_url, min_size=CONCURRENCY,
                                              max_size=CONCURRENCY, reset=db.reset_nothing)
        await self.pool.execute(PLAIN_TABLE)
        await self.pool.execute(PLAIN_RESET)
        self.idle = [await self.pool.acquire() for _ in range(CONCURRENCY)]
        await closed_loop(self._one, 0.3, CONCURRENCY)  # every connection prepares it, untimed
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.pool is not None
        for conn in self.idle:
            await self.pool.release(conn)
        await self.pool.close()

    async def _one(self) -> None:
        conn = self.idle.pop()
        try:
            await conn.execute(PLAIN_UPDATE, 1)
        finally:
            self.idle.append(conn)

    async def round(self, seconds: float) -> float:
        """One timed round: UPDATEs a second."""
        n, _, elapsed = await closed_loop(self._one, seconds, CONCURRENCY)
        return n / elapsed


async def bench_holds_db(db_url: str, event_id: str, seconds: float,
                         pg_pid: int | None = None) -> dict[str, Any]:
    """hold_tickets vs a plain single-row UPDATE, both over 64 connections, same run, in three
    alternated rounds (the median round of each is reported): the same pool, client loop and
    commit durability (each statement its own transaction, committed with
    the server's synchronous_commit = on). With ``pg_pid`` (the postmaster), PostgreSQL's CPU per
    operation of each. The pool gives connections back as the services' pools do
    (``db.reset_nothing``: no reset round trip after each use, for either loop)."""
    pool = await asyncpg.create_pool(db_url, min_size=CONCURRENCY, max_size=CONCURRENCY,
                                     reset=db.reset_nothing)
    try:
        await pool.execute(PLAIN_TABLE)
        await pool.execute(PLAIN_RESET)
        eid = uuid.UUID(event_id)

        # the 64 connections taken from the pool once, each loop taking an idle one per call:
        # the pool's acquire and release cost the client more CPU than a call's own round trip,
        # and this one Python process drives 64 connections (on a loaded machine it, not either
        # statement, set the rate)
        idle = [await pool.acquire() for _ in range(CONCURRENCY)]

        async def hold() -> None:
            conn = idle.pop()
            try:
                await conn.fetchrow("SELECT id FROM hold_tickets($1, 1, 'bench', 900)", eid)
            finally:
                idle.append(conn)

        async def plain() -> None:
            conn = idle.pop()
            try:
                await conn.execute(PLAIN_UPDATE, 1)
            finally:
                idle.append(conn)

        async def measured(fn: Any) -> tuple[int, list[float], float, float, float]:
            pids = tree(pg_pid) if pg_pid else []
            before, client = cpu_seconds(pids), time.process_time()
            n, lat, elapsed = await closed_loop(fn, seconds / 2, CONCURRENCY)
            return n, lat, elapsed, cpu_seconds(pids) - before, time.process_time() - client

        # alternated, three rounds each: a machine whose load changes during the phase weighs on
        # both alike; each figure is the median round's
        runs: dict[str, list[tuple[int, list[float], float, float, float]]] = {
            "plain": [], "hold": []}
        # untimed first: every connection prepares its statement and, for the hold, compiles the
        # functions it calls (the first calls of a session plan afresh)
        try:
            await closed_loop(plain, 0.3, CONCURRENCY)
            await closed_loop(hold, 0.3, CONCURRENCY)
            for _ in range(ROUNDS):
                runs["plain"].append(await measured(plain))
                runs["hold"].append(await measured(hold))
        finally:
            for conn in idle:
                await pool.release(conn)

        def median(name: str) -> tuple[int, list[float], float, float, float]:
            return sorted(runs[name], key=lambda r: r[0] / r[2])[ROUNDS // 2]

        n_plain, lat_plain, t_plain, cpu_plain, client_plain = median("plain")
        n_hold, lat_hold, t_hold, cpu_hold, client_hold = median("hold")
        out: dict[str, Any] = {
            "concurrency": CONCURRENCY,
            "hold_tickets_per_s": round(n_hold / t_hold), "hold_p50_ms": pct(lat_hold, 0.5),
            "plain_update_per_s": round(n_plain / t_plain), "plain_p50_ms": pct(lat_plain, 0.5),
            "hold_vs_plain": round(n_hold / t_hold / (n_plain / t_plain), 3),
            "rounds_per_s": {name: [round(r[0] / r[2]) for r in rs] for name, rs in runs.items()},
            # the driving process's CPU (asyncpg, 64 connections): on 2 cores, taken from
            # PostgreSQL's
            "client_cpu_us_per_op": {"hold": round(client_hold / n_hold * 1e6),
                                     "plain": round(client_plain / n_plain * 1e6)}}
        if pg_pid:
            out["postgres_cpu_us_per_op"] = {"hold": round(cpu_hold / n_hold * 1e6),
                                             "plain": round(cpu_plain / n_plain * 1e6)}
        return out
    finally:
        await pool.close()


# wrk's Lua: the hold's body and headers on every request, and one JSON line at the end
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_loop(url: str, body: bytes, seconds: float, connections: int,
             root: Path) -> tuple[dict[str, int], float]:
    """POST ``body`` to ``url`` from ``connections`` connections for ``seconds`` with wrk (one
    thread, a C event loop); its summary and the CPU seconds it used (from wait4)."""
    script = root / "hold.lua"
    script.write_text(WRK_SCRIPT)
    env = dict(os.environ, BENCH_BODY=body.decode(), BENCH_TOKEN=CLIENT)
    proc = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                             "--timeout", "10s", "-s", str(script), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}")
    summary = json.loads(out.strip().splitlines()[-1])
    return summary, usage.ru_utime + usage.ru_stime


async def bench_holds_http(c: Client, event_id: str, seconds: float,
                           procs: dict[str, int], root: Path, baseline: PlainUpdate
                           ) -> dict[str, Any]:
    """Holds through ingress from 64 concurrent clients, in ``ROUNDS`` rounds alternated with
    rounds of the ``baseline`` (the plain UPDATE): the median round of each is reported, and the
    ratio of the two medians (``vs_plain_update``). With wrk installed (Debian's ``wrk``) the load
    comes from it: a C client costs a small fraction of the CPU per request the aiohttp loop below
    does (which was about a quarter of the machine's CPU per hold), and on 2 cores whatever the
    client uses is taken from the servers. Without it, the aiohttp loop. Either way the client's
    CPU per hold is reported (``load_generator``), apart from the servers'; the CPU per hold is
    over every round of holds together (the baseline's rounds are not counted)."""
    def pids() -> dict[str, list[int]]:
        return {name: (tree(pid) if name == "postgres" else [pid]) for name, pid in procs.items()}

    generator = "wrk" if shutil.which("wrk") else "aiohttp"
    body = json.dumps({"event_id": event_id, "quantity": 1}).encode()

    async def hold() -> None:
        s, answer = await c.hold(event_id)
        assert s == 201, answer

    async def one_round() -> tuple[int, float, float, float, float]:
        """Holds, seconds, p50 and p99 (ms), the load generator's CPU seconds."""
        if generator == "wrk":
            summary, client_cpu = await asyncio.to_thread(
                wrk_loop, c.base + "/v1/reservations", body, seconds / 2, CONCURRENCY, root)
            if summary["non_2xx"] or summary["errors"]:
                raise RuntimeError(f"holds through ingress failed: {summary}")
            return (summary["requests"], summary["duration_us"] / 1e6,
                    summary["p50_us"] / 1000, summary["p99_us"] / 1000, client_cpu)
        n, lat, elapsed = await closed_loop(hold, seconds / 2, CONCURRENCY)
        # this process's CPU is counted under "bench_client" with the servers'
        return n, elapsed, pct(lat, 0.5), pct(lat, 0.99), 0.0

    rounds: list[tuple[int, float, float, float, float]] = []
    plain: list[float] = []
    used = {name: 0.0 for name in procs}
    for _ in range(ROUNDS):
        plain.append(await baseline.round(seconds / 2))
        before = {name: cpu_seconds(ps) for name, ps in pids().items()}
        rounds.append(await one_round())
        after = {name: cpu_seconds(ps) for name, ps in pids().items()}
        for name in used:
            used[name] += after[name] - before[name]
    n = sum(r[0] for r in rounds)
    cpu = {name: round(seconds_used / n * 1e6) for name, seconds_used in used.items()}
    if generator == "wrk":
        cpu["load_generator"] = round(sum(r[4] for r in rounds) / n * 1e6)
    else:
        cpu["load_generator"] = cpu.pop("bench_client")
    median = sorted(rounds, key=lambda r: r[0] / r[1])[ROUNDS // 2]
    plain_median = sorted(plain)[ROUNDS // 2]
    return {"concurrency": CONCURRENCY, "load_generator": generator, "holds": n,
            "per_s": round(median[0] / median[1]), "p50_ms": round(median[2], 3),
            "p99_ms": round(median[3], 3),
            "plain_update_per_s": round(plain_median),
            "vs_plain_update": round(median[0] / median[1] / plain_median, 3),
            "rounds_per_s": {"holds": [round(r[0] / r[1]) for r in rounds],
                             "plain": [round(x) for x in plain]},
            # where the CPU goes, per hold: on 2 cores the sum bounds the throughput
            "cpu_us_per_hold": cpu}


async def sell_out(c: Client, db_url: str, capacity: int) -> dict[str, Any]:
    """64 clients race for the tickets of one event until it is sold out."""
    event_id = await c.event(capacity=capacity)
    ok = sold_out = other = 0
    done = False

    async def worker() -> None:
        nonlocal ok, sold_out, other, done
        while not done:
            s, body = await c.hold(event_id)
            if s == 201:
                ok += 1
            elif s == 409 and json.loads(body).get("code") == "sold_out":
                sold_out += 1
                done = True
            else:
                other += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - t
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT sum(held) AS held, sum(sold) AS sold, sum(capacity) AS capacity, "
            "bool_and(held + sold <= capacity) AS per_bucket_ok "
            "FROM inventory_buckets WHERE event_id = $1", uuid.UUID(event_id))
    finally:
        await conn.close()
    return {"capacity": capacity, "successful_holds": ok, "sold_out_answers": sold_out,
            "other_answers": other, "held_in_db": row["held"], "seconds": round(elapsed, 2),
            "oversold": max(0, ok - capacity) + max(0, row["held"] + row["sold"] - capacity),
            "exactly_sold_out": ok == capacity == row["held"] and row["per_bucket_ok"]}


def _replica(service: str, index: int) -> str:
    return service if index == 0 else f"{service}-{index + 1}"


async def run_holds_db(args: argparse.Namespace) -> dict[str, Any]:
    """The holds_db phase alone: PostgreSQL and an event made as the payment service makes it
    (its default buckets for the capacity), no services."""
    from boxoffice.payment.ticketed_events import default_buckets

    phase = 3.0 if args.quick else 6.0
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        pg = Postgres(Path(tmp) / "pg" / "data").start(create_db="boxoffice")
        try:
            migrate.run(pg.url("boxoffice"), "up")
            capacity, hot = 5_000_000, uuid.uuid4()
            conn = await asyncpg.connect(pg.url("boxoffice"))
            try:
                await conn.execute("SELECT create_ticketed_event($1, 'bench', $2, 2500, 'eur', $3)",
                                   hot, capacity, default_buckets(capacity))
            finally:
                await conn.close()
            assert pg.proc is not None
            holds_db = await bench_holds_db(pg.url("boxoffice"), str(hot), phase, pg.proc.pid)
        finally:
            pg.stop()
    return {"bench": "checkout", "only": "holds_db",
            "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                        "load_avg_1m_after": round(os.getloadavg()[0], 2)},
            "holds_hot_event_db": holds_db}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.only_holds_db:
        return await run_holds_db(args)
    phase = 3.0 if args.quick else 6.0
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        root = Path(tmp)
        pg = Postgres(root / "pg" / "data").start(create_db="boxoffice")
        nats: NatsServer | NatsCluster
        if args.nats_nodes > 1:
            nats = NatsCluster(root / "nats", args.nats_nodes, sync_always=True).start()
            nats_pids = {f"nats-{i + 1}": n.proc.pid for i, n in enumerate(nats.nodes) if n.proc}
        else:
            nats = NatsServer(root / "nats", sync_always=True).start()
            assert nats.proc is not None
            nats_pids = {"nats": nats.proc.pid}
        ls = LocalStripe(log=root / "localstripe.log").start()
        svcs = Services(root, nats.url, pg.url("boxoffice"), ls.url)
        svcs.env["NATS_STREAM_REPLICAS"] = str(args.nats_nodes)
        try:
            migrate.run(pg.url("boxoffice"), "up")
            payment_url = svcs.start("payment")
            for _ in range(args.replicas - 1):
                svcs.start("payment")
            shared = free_port() if args.replicas > 1 else None
            base = svcs.start("ingress", shared)
            for _ in range(args.replicas - 1):
                svcs.start("ingress", shared)
            connector = aiohttp.TCPConnector(limit=256)
            async with aiohttp.ClientSession(connector=connector) as session:
                c = Client(session, base)
                intents = await bench_intents(
                    c, ls.url, args.intents or (60 if args.quick else 250), pg.url("boxoffice"))
                intents["payment_service_mean_ms"] = await phase_means(session, payment_url)
                intents["outside_payment_ms"] = outside_payment_ms(intents)
                if args.only_intents:
                    intents.pop("key")
                    return {"bench": "checkout", "replicas": args.replicas,
                            "nats_nodes": args.nats_nodes,
                            "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                                        "load_avg_1m_after": round(os.getloadavg()[0], 2)},
                            "payment_intents": intents,
                            "goals": {"overhead_p50_le_3ms": intents["overhead_p50_ms"] <= 3.0}}
                replays = await bench_replays(c, intents.pop("key"), phase)
                checkouts = await bench_checkouts(c, ls.url, phase)
                hot = await c.event(capacity=5_000_000)
                assert pg.proc is not None
                holds_db = await bench_holds_db(pg.url("boxoffice"), hot, phase, pg.proc.pid)
                n = args.replicas
                procs = {_replica("payment", i): p.pid for i, p in enumerate(svcs.procs[:n])}
                procs |= {_replica("ingress", i): p.pid for i, p in enumerate(svcs.procs[n:])}
                procs |= {"postgres": pg.proc.pid, **nats_pids, "bench_client": os.getpid()}
                async with PlainUpdate(pg.url("boxoffice")) as baseline:
                    holds_http = await bench_holds_http(c, hot, phase, procs, root, baseline)
                race = await sell_out(c, pg.url("boxoffice"), 3000)
        finally:
            svcs.stop()
            ls.stop()
            nats.stop()
            pg.stop()
    return {
        "bench": "checkout",
        "replicas": args.replicas,
        "nats_nodes": args.nats_nodes,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                    "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "payment_intents": intents,
        "replays": replays,
        "checkouts": checkouts,
        "holds_hot_event_db": holds_db,
        "holds_hot_event_http": holds_http,
        "sell_out_race": race,
        "goals": {
            "overhead_p50_le_3ms": intents["overhead_p50_ms"] <= 3.0,
            "replays_ge_3000_per_s": replays["per_s"] >= 3000,
            "holds_ge_1000_per_s": holds_http["per_s"] >= 1000,
            "zero_oversell": race["oversold"] == 0 and race["exactly_sold_out"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--replicas", type=int, default=1, choices=range(1, 9),
                        help="processes of payment and of ingress (default 1)")
    parser.add_argument("--nats-nodes", type=int, default=1, choices=(1, 3),
                        help="nats-servers: one, or a cluster of three with streams replicated "
                             "three times (default 1)")
    parser.add_argument("--only-intents", action="store_true",
                        help="only the PaymentIntent overhead phase")
    parser.add_argument("--intents", type=int, default=None,
                        help="PaymentIntents to time (default 250, 60 with --quick)")
    parser.add_argument("--only-holds-db", action="store_true",
                        help="only hold_tickets vs the plain UPDATE in SQL (no services)")
    args = parser.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        print(json.dumps(runner.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
