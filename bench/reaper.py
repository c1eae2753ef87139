"""Reaper benchmark: how late holds are released, and how fast a flash sale's holds expire.

1. Expiry lag over 10,000 holds with spread expiry times: 8 clients take holds through
   ``hold_tickets`` for about 10 s with TTLs of 1 to 10 s while the reaper runs; lag =
   ``released_at - expires_at`` of every hold. Goal p99 <= 1 s (the original pg_cron job ran
   every 5 minutes: lags spread evenly from 0 to 300 s).
2. 100,000 holds expiring at the same instant: time until the last is expired, rows/s, against a
   plain ``UPDATE`` of the same rows in the same run (no tickets returned, no events),
   the time until every expiry event is on JetStream, and the latency of new holds on the same
   event while the reaper works (they must not starve). Goal <= 5 s. Timed from the due instant,
   or from the commit that made the holds due if that came later (committed_s_before_due < 0).
   The events' baseline, in the same run and on the same nats-server: plain JetStream, as many
   messages of an expiry event's size published in batches of the reaper's relay's size
   (``plain_jetstream``), timed from its first batch (the events from the due instant, so their
   time includes the expiry's).

nats-server runs with ``sync_interval: always``, as ``boxoffice up`` and the compose file run it:
it syncs the stream's file after each message, which is what bounds the events' rate
(``bench.bus`` measures that ceiling for each setting).

"Expired" means committed: the hold marked expired, its tickets back in their buckets and its
``reservations.events.expired`` outbox row written, in one transaction (the event is then bound
to be published: the relay's publishing is timed apart, as ``all_events_on_jetstream_s``). The
plain UPDATE is measured on the same rows in the same state (vacuumed, their ``expires_at`` just
rewritten) and committed, as the reaper's batches are (it was rolled back: no WAL flush), the
median of three, each undone afterwards. Each round and the expiry start after a CHECKPOINT, so
that the checkpoint the setup's WAL triggers falls on none of them.

Runs its own PostgreSQL and nats-server; prints one JSON object.
Usage: .venv/bin/python -m bench.reaper [--quick] [--replicas N]
  --quick: 2,000 and 20,000 holds; --replicas N: N reaper processes share the work
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg
import nats

from bench.bus import batches
from bench.cpu import cpu_seconds, tree
from bench.polls import wait_until
from boxoffice import migrate
from boxoffice.embedded import NatsServer, Postgres, die_with_parent, free_port
from boxoffice.reaper import expiry

SPREAD_HOLDS = 10_000
MASS_HOLDS = 100_000
BUCKETS = 16


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 4)


def start_reaper(root: Path, nats_url: str, db_url: str, index: int = 0
                 ) -> tuple[subprocess.Popen, int]:
    """Start one reaper process (``reaper-<index>.log``); returns it once ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_"))}
    env.update(NATS_URL=nats_url, DATABASE_URL=db_url, HEALTH_PORT=str(port), LOG_LEVEL="WARNING")
    path = root / f"reaper-{index}.log"
    with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "boxoffice.cli", "run", "reaper"], env=env,
                                stdout=log, stderr=log, preexec_fn=die_with_parent)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("reaper not ready; see " + str(path))


async def spread_lag(pool: asyncpg.Pool, holds: int) -> dict:
    event = await pool.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'spread', $1, "
                                "100, 'eur', $2)", holds, BUCKETS)
    clients, per_client = 8, holds // 8
    started = time.monotonic()

    async def client(k: int) -> None:
        rnd = random.Random(k)
        for i in range(per_client):
            # paced to spread the holds (and so their expiry times) over about 10 s
            await asyncio.sleep(max(0.0, started + i * 10.0 / per_client - time.monotonic()))
            await pool.execute("SELECT hold_tickets($1, 1, 'bench', $2)", event, rnd.randint(1, 10))

    await asyncio.gather(*(client(k) for k in range(clients)))
    async with pool.acquire() as conn:
        await wait_until(conn, "SELECT NOT EXISTS (SELECT 1 FROM reservations WHERE "
                               "event_id = $1 AND status = 'active')", event)
        lags = [r[0] for r in await conn.fetch(
            "SELECT extract(epoch FROM released_at - expires_at)::float8 FROM reservations "
            "WHERE event_id = $1", event)]
    return {"holds": len(lags), "lag_p50_s": pct(lags, 50), "lag_p90_s": pct(lags, 90),
            "lag_p99_s": pct(lags, 99), "lag_max_s": round(max(lags), 4),
            "lag_mean_s": round(statistics.fmean(lags), 4), "goal_p99_s": 1.0,
            "original_pg_cron_every_5_min": {"lag_p50_s": 150.0, "lag_p99_s": 297.0,
                                             "lag_max_s": 300.0, "note": "computed, not measured"}}


BULK = """
    WITH r AS (
        INSERT INTO reservations (event_id, client_id, quantity, amount, currency, expires_at)
        SELECT $1, 'bench', 1, 100, 'eur', clock_timestamp() + interval '1 hour'
        FROM generate_series(1, $2) RETURNING id),
    n AS (SELECT id, (row_number() OVER () - 1) % $3 AS bucket FROM r),
    a AS (INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
          SELECT id, $1, bucket, 1 FROM n RETURNING bucket)
    UPDATE inventory_buckets b SET held = b.held + c.k
    FROM (SELECT bucket, count(*)::integer AS k FROM a GROUP BY bucket) c
    WHERE b.event_id = $1 AND b.bucket = c.bucket"""


# "every bench hold expired", polled every 50 ms (the figures come from released_at, not from
# this poll): an EXISTS on the due-holds index, a few buffers. This bench first polled a count(*)
# every 20 ms, which PostgreSQL ran as a parallel sequential scan of the table (about 28 ms of
# three processes each time): more CPU than the expiry it was waiting for, on two cores.
ALL_EXPIRED = ("SELECT NOT EXISTS (SELECT 1 FROM reservations WHERE status = 'active' "
               "AND expires_at <= $2 AND event_id = $1 AND client_id = 'bench')")
PLAIN_UPDATE = ("UPDATE reservations SET status = 'expired', released_at = clock_timestamp(), "
                "updated_at = clock_timestamp() WHERE event_id = $1 AND status = 'active'")
BASELINE_RUNS = 3
BUYERS_ROOM = 10_000  # tickets left for the buyers' new holds during the expiry


async def plain_update(conn: asyncpg.Connection, event: str, pg_pid: int) -> tuple[float, float]:
    """One plain UPDATE of the event's holds (no tickets returned, no events), committed like
    the reaper's batches, then undone (untimed), on the table in the state the reaper will find
    it: vacuumed, then every hold's ``expires_at`` just rewritten (100,000 dead row versions and
    their index entries). Returns its seconds and PostgreSQL's CPU seconds."""
    await conn.execute("CHECKPOINT")  # as before the expiry: no earlier WAL to write back
    await conn.execute("UPDATE reservations SET expires_at = expires_at - interval '1 s' "
                       "WHERE event_id = $1", event)
    cpu = cpu_seconds(tree(pg_pid))
    t = time.perf_counter()
    await conn.execute(PLAIN_UPDATE, event)  # its own transaction: the commit is timed too
    seconds = time.perf_counter() - t
    cpu = cpu_seconds(tree(pg_pid)) - cpu
    await conn.execute("UPDATE reservations SET status = 'active', released_at = NULL "
                       "WHERE event_id = $1", event)
    await conn.execute("VACUUM ANALYZE reservations")
    return seconds, cpu


async def plain_jetstream(nats_url: str, n: int) -> dict:
    """Plain JetStream on the bench's nats-server: ``n`` messages of an expiry event's size (the
    last one published, for its size) into a stream of their own, in batches of the reaper's relay's
    size, each batch once the last's PubAcks are in; the seconds it took."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        size = len((await js.get_last_msg("RESERVATIONS", "reservations.events.expired")).data
                   or b"")
        await js.add_stream(name="BENCH_PLAIN", subjects=["bench.plain"])
        started = time.perf_counter()
        await batches(nc, n, "plain", "bench.plain", b"x" * size, expiry.EVENTS_BATCH)
        seconds = time.perf_counter() - started
        await js.delete_stream("BENCH_PLAIN")
    finally:
        await nc.close()
    return {"seconds": round(seconds, 2), "messages": n, "message_bytes": size,
            "batch": expiry.EVENTS_BATCH, "per_s": round(n / seconds)}


async def mass_expiry(pool: asyncpg.Pool, holds: int, procs: dict[str, int],
                      nats_url: str) -> dict:
    event = await pool.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'flash', $1, "
                                "100, 'eur', $2)", holds + BUYERS_ROOM, BUCKETS)
    async with pool.acquire() as conn:
        await conn.execute(BULK, event, holds, BUCKETS)
        await conn.execute("VACUUM ANALYZE reservations")
        await conn.execute("VACUUM ANALYZE reservation_allocations")
        # baseline: a plain UPDATE of the same rows, in the same state, committed and undone;
        # the median of a few (this machine is shared: one figure may be a neighbour's)
        plain_runs = [await plain_update(conn, event, procs["postgres"])
                      for _ in range(BASELINE_RUNS)]
        plain = statistics.median(s for s, _ in plain_runs)
        plain_cpu = statistics.median(c for _, c in plain_runs)
        # every hold now expires at the same instant, set once: a clock_timestamp() in the SET
        # is read per row, and this UPDATE of 100,000 rows takes seconds, so the holds used to
        # expire over the whole UPDATE (some already due when it committed). The instant is
        # far enough ahead for the UPDATE to commit before it (on a loaded machine it may not:
        # see committed_s_before_due). A CHECKPOINT first, as before each baseline round: the
        # checkpoint that the setup's and the baseline's WAL would trigger falls on neither.
        await conn.execute("CHECKPOINT")
        t = time.perf_counter()
        await conn.execute("UPDATE reservations SET expires_at = expires_at - interval '1 s' "
                           "WHERE event_id = $1", event)
        rewrite = time.perf_counter() - t
        at = await conn.fetchval("SELECT date_trunc('second', clock_timestamp()) + "
                                 "make_interval(secs => ceil(2 + 3 * $1))", rewrite)
        await conn.execute("UPDATE reservations SET expires_at = $2 WHERE event_id = $1",
                           event, at)
        committed = await conn.fetchval("SELECT clock_timestamp()")
        ahead = (at - committed).total_seconds()
        due = time.monotonic() + ahead

    hold_latency: list[float] = []
    stop = asyncio.Event()

    async def buyer() -> None:  # new holds on the same event while the reaper works
        while not stop.is_set():
            t0 = time.perf_counter()
            await pool.execute("SELECT hold_tickets($1, 1, 'buyer', 600)", event)
            hold_latency.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)

    async def pids() -> dict[str, list[int]]:
        """The processes, PostgreSQL's split into the reaper's backends and all the others (the
        bench's own: buyers, polls; the server's background processes)."""
        out = {name: [pid] for name, pid in procs.items() if name != "postgres"}
        backends = set(tree(procs["postgres"])) - {procs["postgres"]}
        reapers = {r[0] for r in await pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND application_name IS DISTINCT FROM 'bench'")} & backends
        out["postgres_reaper_connections"] = sorted(reapers)
        out["postgres_others"] = [procs["postgres"], *sorted(backends - reapers)]
        return out

    await asyncio.sleep(max(0.0, due - time.monotonic()))
    cpu0 = {name: cpu_seconds(ps) for name, ps in (await pids()).items()}
    buyers = [asyncio.create_task(buyer()) for _ in range(4)]
    async with pool.acquire() as conn:
        await wait_until(conn, ALL_EXPIRED, event, at)
        cpu1 = {name: cpu_seconds(ps) for name, ps in (await pids()).items()}
        stop.set()
        await asyncio.gather(*buyers)
        # timed from the instant every hold was both due and committed: when the UPDATE above
        # commits after that instant (committed_s_before_due < 0), the reaper could not see the
        # holds before the commit, and the bench's own overrun is not the reaper's time
        row = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(released_at) - "
            "greatest(min(expires_at), $2))::float8 AS span, percentile_cont(0.99) WITHIN GROUP "
            "(ORDER BY extract(epoch FROM released_at - expires_at))::float8 AS p99 "
            "FROM reservations "
            "WHERE event_id = $1 AND client_id = 'bench'", event, committed)
        # every expiry event published (the holds' own events are payment's to publish)
        await wait_until(conn, "SELECT (SELECT id FROM outbox WHERE subject = "
                               "'reservations.events.expired' ORDER BY id LIMIT 1) IS NULL",
                         timeout=900)
        published = time.monotonic() - due
        runs = await conn.fetch("SELECT replica, expired, extract(epoch FROM finished_at - "
                                "started_at)::float8 AS secs FROM reaper_runs WHERE kind = "
                                "'expiry' AND finished_at >= $1 ORDER BY started_at", at)
    ms = [round(pct(hold_latency, p) * 1000, 1) if hold_latency else None for p in (50, 99)]
    plain_js = await plain_jetstream(nats_url, row["n"])
    return {"holds": row["n"], "expire_all_s": round(row["span"], 3),
            "rows_per_s": round(row["n"] / row["span"]), "lag_p99_s": round(row["p99"], 3),
            "all_events_on_jetstream_s": round(published, 2),
            # the events' baseline: as many plain messages, published as the relay does
            "plain_jetstream": plain_js,
            "events_vs_plain_jetstream": round(published / plain_js["seconds"], 2),
            "runs_recorded": [{"replica": r["replica"], "expired": r["expired"],
                               "seconds": round(r["secs"], 3)} for r in runs],
            # CPU from the due instant until every hold was expired, per expired hold (the
            # reaper's backends expire and relay; the others serve the buyers and the polls)
            "cpu_us_per_hold": {name: round((cpu1[name] - cpu0.get(name, 0.0)) / holds * 1e6, 1)
                                for name in cpu1},
            "new_holds_meanwhile": {"count": len(hold_latency), "p50_ms": ms[0], "p99_ms": ms[1]},
            "baseline_plain_update": {"seconds": round(plain, 3),
                                      "runs_s": [round(x, 3) for x, _ in plain_runs],
                                      "cpu_us_per_hold": {"postgres": round(
                                          plain_cpu / holds * 1e6, 1)},
                                      "rows_per_s": round(holds / plain)},
            "reaper_vs_plain_update": round(row["span"] / plain, 2),
            # > 0: all holds due at once; < 0: timed from the commit (expire_all_s, rows_per_s)
            "committed_s_before_due": round(ahead, 2),
            "goal_s": 5.0}


async def run(db_url: str, spread: int, mass: int, procs: dict[str, int], nats_url: str) -> dict:
    async with asyncpg.create_pool(db_url, min_size=2, max_size=12,
                                   server_settings={"application_name": "bench"}) as pool:
        return {"spread": await spread_lag(pool, spread),
                "mass": await mass_expiry(pool, mass, procs, nats_url)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 holds")
    parser.add_argument("--replicas", type=int, default=1, choices=range(1, 9),
                        help="reaper processes sharing the work (default 1)")
    args = parser.parse_args()
    spread, mass = (2_000, 20_000) if args.quick else (SPREAD_HOLDS, MASS_HOLDS)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-reaper-") as tmp:
        root = Path(tmp)
        pg = Postgres(root / "pg" / "data").start(create_db="boxoffice")
        nats = NatsServer(root / "nats", sync_always=True).start()
        reapers: list[subprocess.Popen] = []
        try:
            db_url = pg.url("boxoffice")
            migrate.run(db_url, "up")
            for i in range(args.replicas):
                reapers.append(start_reaper(root, nats.url, db_url, i)[0])
            assert pg.proc is not None
            procs = {f"reaper-{i}" if args.replicas > 1 else "reaper": p.pid
                     for i, p in enumerate(reapers)}
            assert nats.proc is not None
            procs |= {"postgres": pg.proc.pid, "nats": nats.proc.pid,
                      "bench_client": os.getpid()}
            t = time.monotonic()
            figures = asyncio.run(run(db_url, spread, mass, procs, nats.url))
            figures["bench_seconds"] = round(time.monotonic() - t, 1)
            figures["replicas"] = args.replicas
            figures["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                                  "load_avg_1m_after": round(os.getloadavg()[0], 2)}
            figures["nats_fsync"] = "sync_interval: always"
            figures["reaper_batch_size"] = int(os.environ.get("REAPER_BATCH_SIZE", "0")) or "default"
            print(json.dumps({"bench": "reaper", **figures}))
        finally:
            for reaper in reapers:
                reaper.terminate()
            for reaper in reapers:
                try:
                    reaper.wait(15)
                except subprocess.TimeoutExpired:
                    reaper.kill()
            nats.stop()
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
