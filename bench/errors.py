"""Error tracking throughput (a benchmark, not a test): prints one JSON object.

1. sink: N reports (realistic: 40 kinds of error with stack traces, varying messages and
   contexts, some secrets to scrub) are published to ERRORS as ingress publishes clients'
   reports: scrubbed and sealed (``boxoffice.scrub.sealed``, not timed); then real error-sink
   processes (`boxoffice run error_sink`, 1 and then 2 replicas, each time from the first report
   into an empty database) start, and we measure reports persisted per second from the first
   stored row to the last, and the CPU per report of the sinks and PostgreSQL meanwhile. Then
   once more with 1 replica, the stream holding N other reports unsealed, as the services and
   other processes publish theirs: the sink scrubs each. Checked: every report stored exactly
   once. Baseline in the same run: a
   plain COPY of the same rows (already converted to columns, so no decoding, scrubbing or
   grouping) into an identical, empty error_logs, 10,000 rows per COPY, before and after each
   sink run, each run compared with the mean of the two around it (and once 1,000 rows per
   COPY, the sink's batch size until 2 December 2026). Every timed phase starts after a
   CHECKPOINT. And the sink's CPU per report step by step, in this process: decoding, scrubbing,
   grouping, and the whole message-to-row conversion, unsealed and sealed; per Sentry event
   (Python SDK-shaped, 30 breadcrumbs, about 9.5 KB sealed), what ingress spends turning it
   into a sealed report and what the sink spends on that; and, from pg_stat_statements,
   PostgreSQL's execution time per report of the statements that took most during each sink run
   (a COPY's time includes the sink's encoding and sending of its rows; the sum over
   error_groups is the bench's own polling, every 50 ms).
2. ingress: reports accepted per second by `POST /v1/errors` on a real ingress process, 64
   concurrent keep-alive connections, with nats-server's default fsync and then with
   `sync_interval: always` (as `boxoffice up` runs it: each report synced to disk before its 202;
   `bench.bus` measures that ceiling alone); baseline: a bare aiohttp app answering 202 to the
   same requests from the same client.
3. plain JetStream consume, the sink's other baseline: a process of its own (uvloop, the sink's
   lanes, batch size, consumer settings and garbage-collector settings) takes the same sealed
   reports from ERRORS and acks them, doing nothing else, through the same
   ``boxoffice.consumer`` code; per second and CPU per message. What nats-py can hand the sink
   at most: the sink decodes, groups and COPYs on top of it.

    .venv/bin/python -m bench.errors [--reports 150000] [--http-seconds 5] [--replicas 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import asyncpg
import msgspec
import nats
import nats.js.errors

from bench.cpu import cpu_seconds, tree
from boxoffice import migrate, scrub
from boxoffice.embedded import NatsServer, Postgres, free_port, wait_port
from boxoffice.error_sink import grouping, report_rows, store
from boxoffice.error_sink.report_rows import COLUMNS, prepare
from boxoffice.ingress import sentry_envelope
from boxoffice.wire.errors import ErrorReport
from tests.errors_support import publish, publish_messages
from tests.harness import CLIENT_TOKEN, ServiceProcess, base_env

KINDS = 40


def make_reports(n: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    services = ["payment", "webhook", "reaper", "ingress", "checkout-web"]
    kinds = []
    for k in range(KINDS):
        frames = "".join(
            f'  File "/app/services/{services[k % 5]}/mod{k}_{d}.py", line {10 + d}, in step_{d}\n'
            f"    result = await handle_step_{d}(request, attempt)\n" for d in range(8))
        frames += ('  File "/app/.venv/lib/python3.11/site-packages/asyncpg/pool.py", line 12, '
                   "in acquire\n    return await self._acquire()\n")
        kinds.append((services[k % 5], f"Error{k}", frames))
    now = datetime.now(UTC).isoformat()
    out = []
    for i in range(n):
        service, etype, frames = kinds[i % KINDS]
        level = "critical" if i % 997 == 0 else ("warning" if i % 5 == 0 else "error")
        ctx = {"order_id": rnd.randrange(10**9), "attempt": i % 3, "path": f"/v1/orders/{i}"}
        if i % 50 == 0:
            ctx["password"] = "hunter2"
        out.append({"id": str(uuid.uuid4()), "occurred_at": now, "service": service,
                    "level": level, "error_type": etype,
                    "message": f"{etype}: order {rnd.randrange(10**6)} failed after {i % 7} tries",
                    "stacktrace": f"Traceback (most recent call last):\n{frames}{etype}: boom",
                    "context": ctx, "request_id": uuid.uuid4().hex})
    return out


def sentry_events(n: int, seed: int = 11) -> list[dict]:
    """Events as a Python Sentry SDK sends them: an exception of 15 frames with their local
    variables, 30 breadcrumbs, extra, contexts, request, tags; some secrets to scrub."""
    rnd = random.Random(seed)
    now = time.time()
    return [{
        "event_id": uuid.UUID(int=rnd.getrandbits(128)).hex, "level": "error",
        "platform": "python", "timestamp": now, "sdk": {"name": "sentry.python", "version": "2"},
        "exception": {"values": [{"type": "ValueError",
                                  "value": f"bad order {i} card 4242 4242 4242 4242",
                                  "stacktrace": {"frames": [
                                      {"filename": f"app/m{k}.py", "function": f"f{k}",
                                       "lineno": k, "context_line": "x = y",
                                       "vars": {"password": "p", "n": k}} for k in range(15)]}}]},
        "breadcrumbs": {"values": [
            {"type": "http", "category": "httplib", "timestamp": now,
             "message": f"GET /v1/x/{k} token=sk_live_abc{k}",
             "data": {"url": f"https://api/x/{k}", "status_code": 200, "authorization": "x"}}
            for k in range(30)]},
        "extra": {"order": {"id": i, "lines": [{"sku": f"s{j}", "q": j} for j in range(10)]}},
        "contexts": {"trace": {"trace_id": f"{i:032x}", "span_id": "ab"}, "os": {"name": "Linux"}},
        "request": {"url": "https://shop/cart", "method": "POST",
                    "headers": {"Cookie": "a=b", "User-Agent": "x"}},
        "tags": {"service": "shop"}, "user": {"id": 5, "email": "a@b"}} for i in range(n)]


def step_cpu(bodies: list[dict], runs: int = 5) -> dict[str, float]:
    """CPU microseconds per report of each step of the sink's conversion (the least of
    ``runs``, so other processes on the machine count as little as possible)."""
    now = datetime.now(UTC)
    msgs = [SimpleNamespace(subject=f"errors.{b['service']}.{b['level']}", data=json.dumps(b).encode(),
                            headers=None) for b in bodies]
    reports = [report_rows._decoder.decode(m.data) for m in msgs]

    def scrub_all() -> None:
        for r in reports:
            for v in (r.message, r.error_type, r.stacktrace, r.request_id):
                if v:
                    scrub.text(v)
            if r.context:
                scrub.clean(r.context)

    sealed = [SimpleNamespace(subject=subject, data=data, headers=None)
              for subject, data, _ in sealed_messages(bodies)]
    steps = {
        "decode": lambda: [report_rows._decoder.decode(m.data) for m in msgs],
        "scrub": scrub_all,
        "group": lambda: [grouping.group_key(r.service or "", grouping.fingerprint(
            r.error_type, r.stacktrace, r.message or "", None)) for r in reports],
        "prepare_all": lambda: [prepare(m, now) for m in msgs],
        "prepare_all_sealed": lambda: [prepare(m, now) for m in sealed],
    }
    # a Sentry event: what ingress does with it (its report built, scrubbed and sealed), and
    # what the sink then does with that (about 9.5 KB each)
    events = sentry_events(2000)
    sentry = [SimpleNamespace(subject=subject, data=data, headers=None)
              for subject, data in (scrub.sealed(sentry_envelope.to_report(
                  e, project_id="5", fallback_id=None)) for e in events)]
    per_event = {
        "ingress_sentry_event": lambda: [scrub.sealed(sentry_envelope.to_report(
            e, project_id="5", fallback_id=None)) for e in events],
        "prepare_sentry_event_sealed": lambda: [prepare(m, now) for m in sentry],
    }
    out = {}
    for name, step in [*steps.items(), *per_event.items()]:
        best = float("inf")
        for _ in range(runs):
            started = time.process_time()
            step()
            best = min(best, time.process_time() - started)
        out[name] = round(best * 1e6 / (len(events) if name in per_event else len(msgs)), 2)
    return out


def sealed_messages(bodies: list[dict]) -> list[tuple[str, bytes, str]]:
    """(subject, body, Nats-Msg-Id) of each report as ingress publishes it: scrubbed, sealed."""
    return [(*scrub.sealed(msgspec.convert(b, ErrorReport, strict=False)), b["id"]) for b in bodies]


async def create_db(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    migrate.run(url, "up")
    return url


async def checkpoint(url: str) -> None:
    """A CHECKPOINT before each timed phase: every phase starts with none of the WAL of the
    phases before it to write back. Without it the checkpoint that the earlier phases' WAL
    triggers (max_wal_size) fell on whichever phase came next: the plain COPY after a sink run
    ran at 62,000-77,000 rows/s, the one before it at 104,000-112,000."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def plain_copy(url: str, bodies: list[dict], rows_per_copy: int) -> float:
    now = datetime.now(UTC)
    rows = [prepare(SimpleNamespace(subject=f"errors.{b['service']}.{b['level']}",
                                    data=json.dumps(b).encode(), headers=None), now).record
            for b in bodies]  # conversion is not timed: the baseline is the COPY alone
    await checkpoint(url)
    conn = await asyncpg.connect(url)
    try:
        await store.binary_json(conn)
        started = time.perf_counter()
        for i in range(0, len(rows), rows_per_copy):
            await conn.copy_records_to_table("error_logs", records=rows[i:i + rows_per_copy],
                                             columns=COLUMNS)
        elapsed = time.perf_counter() - started
        assert await conn.fetchval("SELECT count(*) FROM error_logs") == len(rows)
    finally:
        await conn.close()
    return len(rows) / elapsed


async def sink_rate(env: dict[str, str], url: str, n: int, logdir: Path, replicas: int,
                    pg_pid: int) -> tuple[float, int, int, dict[str, float]]:
    """Reports persisted per second from the first stored row to the last, distinct reports,
    groups, and the CPU milliseconds per report of the sinks and of PostgreSQL meanwhile."""
    procs = [ServiceProcess("error_sink", dict(env, DATABASE_URL=url), logdir / f"error_sink{i}.log")
             for i in range(replicas)]
    conn = await asyncpg.connect(url)
    try:
        for proc in procs:
            proc.start(wait=False)
        t0 = c0 = None
        cpu0: dict[str, float] = {}
        pids: dict[str, list[int]] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # Stored so far: the groups' counts, committed with the rows (every report here
            # counts 1). A count(*) of error_logs every 50 ms scanned the whole growing table and
            # took PostgreSQL more CPU than the sink's own statements, on the sink's two cores.
            c = await conn.fetchval("SELECT coalesce(sum(count), 0)::bigint FROM error_groups")
            now = time.perf_counter()
            if t0 is None and c > 0:
                t0, c0 = now, c
                pids = {"error_sink": [p.proc.pid for p in procs if p.proc],
                        "postgres": tree(pg_pid)}
                cpu0 = {name: cpu_seconds(ps) for name, ps in pids.items()}
            if c >= n:
                break
            await asyncio.sleep(0.05)
        assert t0 is not None and c0 is not None, "the sink stored nothing"
        pids["postgres"] = tree(pg_pid)  # the backends as they are now
        cpu = {name: round((cpu_seconds(ps) - cpu0[name]) * 1000 / max(1, c - c0), 4)
               for name, ps in pids.items()}
        rate = (c - c0) / (now - t0)
        assert await conn.fetchval("SELECT count(*) FROM error_logs") == c, "groups miscounted"
        distinct = await conn.fetchval("SELECT count(DISTINCT id) FROM error_logs")
        groups = await conn.fetchval("SELECT count(*) FROM error_groups")
        return rate, distinct, groups, cpu
    finally:
        await conn.close()
        for proc in procs:
            proc.stop()


async def http_rate(url: str, seconds: float, bodies: list[dict], concurrency: int = 64
                    ) -> tuple[float, int]:
    payloads = [json.dumps(b).encode() for b in bodies]
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"}
    ok = bad = 0
    stop = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal ok, bad
        i = k
        while time.perf_counter() < stop:
            async with session.post(url, data=payloads[i % len(payloads)], headers=headers) as r:
                await r.read()
                ok += r.status == 202
                bad += r.status != 202
            i += concurrency

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        return ok / (time.perf_counter() - started), bad


BARE_APP = """
import sys
from aiohttp import web
async def h(request):
    await request.read()
    return web.json_response({"id": "x"}, status=202)
app = web.Application()
app.router.add_post("/v1/errors", h)
import uvloop; uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


PLAIN_CONSUMER = "bench-plain-consume"


async def plain_consume(nats_url: str, n: int) -> dict[str, float]:
    """Run ``--plain-consume`` in a process of its own, as the sink runs; its figures."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.errors", "--plain-consume", nats_url, str(n),
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, "the plain consumer failed"
    return json.loads(out)


def consume_only(nats_url: str, n: int) -> None:
    """The plain consumer (``--plain-consume``): ``n`` messages from ERRORS taken and acked by
    the sink's lanes, doing nothing else; prints per second (from the lanes' start to the last
    ack) and CPU microseconds per message."""
    import gc

    import uvloop

    from boxoffice import bus as bus_module
    from boxoffice.consumer import ack_all, pull_consumer
    from boxoffice.error_sink import main as sink

    async def run() -> dict[str, float]:
        async with bus_module.connect(nats_url, "bench") as bus:
            await bus.declare_consumer("ERRORS", PLAIN_CONSUMER, ack_wait=sink.ACK_WAIT,
                                       max_ack_pending=sink.MAX_ACK_PENDING)
            done = asyncio.Event()
            got = 0

            async def handle(msgs: list) -> None:
                nonlocal got
                await ack_all(bus, msgs)
                got += len(msgs)
                if got >= n:
                    done.set()

            gc.freeze()
            gc.set_threshold(*sink.GC_THRESHOLD)
            # timed from the lanes' start, their first pull requests included: from the first
            # batch handled, the other lanes' first batches, already read, counted as if read
            # within the time (up to 4,000 messages of 150,000 too many)
            t0, c0 = time.perf_counter(), time.process_time()
            async with pull_consumer(bus, "ERRORS", PLAIN_CONSUMER, handle, lanes=sink.LANES,
                                     batch=sink.BATCH, grace=5):
                await asyncio.wait_for(done.wait(), 300)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            await bus.js.delete_consumer("ERRORS", PLAIN_CONSUMER)
            return {"per_s": round(got / elapsed), "cpu_us_per_message": round(cpu * 1e6 / got, 2)}

    print(json.dumps(uvloop.run(run())))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reports", type=int, default=150_000)
    ap.add_argument("--http-seconds", type=float, default=5.0)
    ap.add_argument("--replicas", default="1,2", help="error-sink process counts to measure")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-errors-"))
    pg = Postgres(tmp / "pg" / "data")
    pg.settings["shared_preload_libraries"] = "pg_stat_statements"  # the sink's SQL, per statement
    pg.start(create_db=None)
    nats_srv = NatsServer(tmp / "nats", sync_always=False).start()
    n = args.reports
    out: dict[str, object] = {"bench": "errors", "reports": n}
    try:
        admin = pg.url("postgres")
        bodies = make_reports(n)
        out["sink_step_cpu_us_per_report"] = step_cpu(bodies[:20_000])
        started = time.perf_counter()
        await publish_messages(nats_srv.url, sealed_messages(bodies))
        out["bus_publish_per_s"] = round(n / (time.perf_counter() - started))
        consumed = await plain_consume(nats_srv.url, n)
        out["plain_consume_per_s"] = consumed["per_s"]
        out["plain_consume_cpu_us_per_message"] = consumed["cpu_us_per_message"]
        # the baseline before and after each sink run, each time into a new database: a run's
        # ratio is to the mean of the two around it (on a shared machine a baseline measured
        # once, minutes before the second run, moved by half between two runs of this bench)
        # A first COPY into a new PostgreSQL creates and zero-fills its WAL segments, which
        # every later phase recycles: it ran at 47,000-48,000 rows a second against
        # 83,000-101,000 for the COPYs after it, and as the first sink run's "before" it made
        # that run's baseline the lowest. Done once here, untimed in the ratios.
        out["plain_copy_warmup_per_s"] = round(
            await plain_copy(await create_db(admin, "warmup"), bodies, 10_000))
        copies = [await plain_copy(await create_db(admin, "copy0"), bodies, 10_000)]
        out["plain_copy_per_s"] = round(copies[0])
        out["plain_copy_1000_rows_per_copy_per_s"] = round(
            await plain_copy(await create_db(admin, "copy1k"), bodies, 1000))
        env = base_env(nats_srv.url, "postgresql://unused@127.0.0.1/unused")
        runs = [(int(r), "") for r in args.replicas.split(",")] + [(1, "_unsealed")]
        for replicas, kind in runs:
            if kind == "_unsealed":  # other reports (other ids), as the services publish theirs
                await purge_errors(nats_srv.url)
                bodies = make_reports(n)
                await publish(nats_srv.url, bodies)
            await forget_consumer(nats_srv.url)  # the sink starts again from the first report
            db = await create_db(admin, f"sink{replicas}{kind}")
            assert pg.proc is not None
            await checkpoint(db)  # (before the statements' reset: not counted as the sink's)
            await statements(admin, reset=True)
            rate, distinct, groups, cpu = await sink_rate(env, db, n, tmp, replicas, pg.proc.pid)
            copies.append(await plain_copy(await create_db(admin, f"copy{len(copies)}"), bodies,
                                           10_000))
            baseline = (copies[-2] + copies[-1]) / 2
            key = f"sink_{replicas}_replica{'s' if replicas > 1 else ''}{kind}"
            if replicas == 1 and not kind:  # what the plain consumer measured: one process, sealed
                out[f"{key}_vs_plain_consume"] = round(rate / consumed["per_s"], 3)
            out.update({f"{key}_persisted_per_s": round(rate), f"{key}_lost": n - distinct,
                        f"{key}_cpu_ms_per_report": cpu,
                        f"{key}_plain_copy_per_s": round(baseline),
                        f"{key}_vs_plain_copy": round(rate / baseline, 3)})
            out["sink_groups"] = groups
            out[f"{key}_sql_us_per_report"] = await statements(
                admin, database=f"sink{replicas}{kind}", reports=n)
        out["plain_copy_rounds_per_s"] = [round(c) for c in copies]
        # accepted over HTTP with each fsync setting: the default (as before), then a
        # nats-server of its own with sync_interval: always, as boxoffice up runs it
        nats_sync = NatsServer(tmp / "nats-sync", sync_always=True).start()
        try:
            for suffix, server in (("", nats_srv), ("_sync_always", nats_sync)):
                ingress = ServiceProcess(
                    "ingress", dict(base_env(server.url, "postgresql://unused@127.0.0.1/unused"),
                                    ERROR_RATE_LIMIT_PER_MINUTE="100000000"),
                    tmp / f"ingress{suffix}.log", port=free_port()).start()
                try:
                    rate, bad = await http_rate(f"{ingress.url}/v1/errors", args.http_seconds,
                                                bodies[:5000])
                    out.update({f"ingress_accepted{suffix}_per_s": round(rate),
                                f"ingress_non_202{suffix}": bad})
                finally:
                    ingress.stop()
        finally:
            nats_sync.kill()
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port)])
        try:
            wait_port(bare_port, 10)
            rate, _ = await http_rate(f"http://127.0.0.1:{bare_port}/v1/errors",
                                      args.http_seconds, bodies[:5000])
            out["bare_aiohttp_per_s"] = round(rate)
        finally:
            bare.terminate()
            bare.wait()
    finally:
        nats_srv.kill()
        pg.stop()
    # Each run leaves gigabytes of PostgreSQL and JetStream files: kept only when it failed (the
    # services' logs are there).
    shutil.rmtree(tmp)
    out["cpus"] = os.cpu_count()
    out["load_avg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    print(json.dumps(out))


async def statements(admin_url: str, *, reset: bool = False, database: str = "",
                     reports: int = 1) -> dict[str, float]:
    """pg_stat_statements: PostgreSQL's execution time per report of the statements that took
    most in ``database`` (the start of each statement's text as its name); or a reset."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reset:
            await conn.execute("SELECT pg_stat_statements_reset()")
            return {}
        rows = await conn.fetch(
            "SELECT query, total_exec_time FROM pg_stat_statements s JOIN pg_database d"
            " ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY total_exec_time DESC LIMIT 6",
            database)
        return {" ".join(r["query"].split())[:60]: round(r["total_exec_time"] * 1000 / reports, 2)
                for r in rows}
    finally:
        await conn.close()


async def purge_errors(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream("ERRORS")
    finally:
        await nc.close()


async def forget_consumer(url: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_consumer("ERRORS", "error-sink")
    finally:
        await nc.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--plain-consume":
        consume_only(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
