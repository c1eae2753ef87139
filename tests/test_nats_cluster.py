"""A NATS cluster of three nodes with every stream replicated three times: the node that leads
the streams is killed in the middle of webhook ingest, holds, expiries and error reports.

Checked: no acknowledged message is lost (every webhook answered 200 applied once, every hold
answered 201 kept and, once due, expired with its events on the stream once, every report
answered 202 stored once), the services carry on once new leaders are elected, and the node,
started again on its data, catches up (its copy of each stream reaches the others').

The nodes run without ``sync_interval: always``: SIGKILL leaves the page cache, so what this
proves is the replication, not the disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import pytest_asyncio

from boxoffice import bus as busmod
from boxoffice import bus_access, config
from boxoffice.embedded import NatsCluster, NatsServer
from tests.cluster_support import Accepted, all_services, workload
from tests.harness import NATS_PASSWORDS, ServiceProcess, base_env, eventually

pytestmark = pytest.mark.timeout(150)

# the streams the workload writes: webhooks, error reports, holds' and expiries' events
WATCHED = ("STRIPE_EVENTS", "ERRORS", "RESERVATIONS")
TTL = 2  # seconds a hold lives: holds expire while the node is down and after it is back


# a reply refused: "<time> [ERR] ... - "$G/user:payment" - Publish Violation - Subject "_INBOX_..."
REPLY_REFUSED = re.compile(r'^\[\d+\] (?P<at>\S+ \S+) .*"\$G/user:(?P<user>\w+)" - '
                           r'Publish Violation - Subject "_INBOX_(?P<to>\w+)\.')
FAILOVER = timedelta(seconds=15)


@pytest.fixture
def kills() -> list[datetime]:
    """When the test killed a node (local time, as nats-server logs)."""
    return []


def refused_by_failover(line: str, kills: list[datetime]) -> bool:
    """A service's reply to a request it took from the node that died, sent after it moved to
    another node: that node never delivered the request, so it refuses the reply (a permission
    to answer is the delivering server's). The requester saw a timeout: nothing acknowledged."""
    m = REPLY_REFUSED.match(line)
    if m is None or not bus_access.ACCESS.get(m["user"], bus_access.Access()).answers:
        return False
    at = datetime.strptime(m["at"], "%Y/%m/%d %H:%M:%S.%f")
    return m["to"] != m["user"] and any(k <= at <= k + FAILOVER for k in kills)


@pytest.fixture
def cluster(tmp_path: Path, kills: list[datetime]) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats", 3, sync_always=False, passwords=NATS_PASSWORDS).start()
    try:
        yield c
    finally:
        c.kill()
    # whatever the test did, no service was refused anything it tried on any node, but the
    # replies that a node's death stranded
    refused = [line for node in c.nodes
               for line in node.log.read_text(errors="replace").splitlines()
               if "Violation" in line and not refused_by_failover(line, kills)]
    assert not refused, "nats-server refused:\n" + "\n".join(refused[:20])


@pytest_asyncio.fixture
async def services(cluster: NatsCluster, database_url: str, tmp_path: Path
                   ) -> AsyncIterator[dict[str, ServiceProcess]]:
    env = base_env(cluster.url, database_url)
    env.update(NATS_STREAM_REPLICAS="3", LOG_LEVEL="WARNING")
    async with all_services(env, TTL, tmp_path) as procs:
        yield procs


async def leaders(url: str) -> dict[str, str | None]:
    """The node leading each watched stream (None while it has none)."""
    async def quiet(_exc: Exception) -> None:  # the node killed refuses: expected
        pass

    nc = await nats.connect(url.split(","), max_reconnect_attempts=2, error_cb=quiet)
    try:
        js = nc.jetstream(timeout=2)
        out: dict[str, str | None] = {}
        for stream in WATCHED:
            try:
                info = await js.stream_info(stream)
                out[stream] = info.cluster.leader if info.cluster else None
            except (TimeoutError, nats.errors.Error):
                out[stream] = None
        return out
    finally:
        await nc.close()


def local_state(node: NatsServer) -> dict[str, tuple[int, int]]:
    """Each stream's (messages, last sequence) in ``node``'s own copy (its monitoring port)."""
    assert node.cluster is not None
    url = f"http://127.0.0.1:{node.cluster.monitor_port}/jsz?accounts=true&streams=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        jsz = json.load(resp)
    return {s["name"]: (s["state"]["messages"], s["state"]["last_seq"])
            for account in jsz.get("account_details") or []
            for s in account.get("stream_detail") or []}


async def test_streams_are_declared_with_three_replicas(services: dict[str, ServiceProcess],
                                                        cluster: NatsCluster) -> None:
    async with busmod.connect(cluster.url, "test") as bus:
        for stream in ("STRIPE_EVENTS", "ERRORS", "RESERVATIONS", "PAYMENTS", "ALERTS", "AUDIT"):
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and info.cluster.leader in ("n1", "n2", "n3")
            assert sorted(p.name for p in info.cluster.replicas or []) == sorted(
                {"n1", "n2", "n3"} - {info.cluster.leader}), stream


async def test_killing_the_leading_node_loses_nothing(services: dict[str, ServiceProcess],
                                                      cluster: NatsCluster, database_url: str,
                                                      kills: list[datetime]) -> None:
    db = await asyncpg.connect(database_url)
    try:
        event_id = await db.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'cluster', "
                                     "100000, 2500, 'eur', 8)")
        accepted, stop = Accepted(), asyncio.Event()
        load = asyncio.create_task(workload(services["ingress"].url, str(event_id), accepted, stop))
        try:
            await eventually(lambda: _some(accepted), 30, what="the workload to be acknowledged")
            await asyncio.sleep(2)
            before = await leaders(cluster.url)
            assert all(before.values()), before
            name = Counter(before.values()).most_common(1)[0][0]
            victim = next(n for n in cluster.nodes if n.cluster and n.cluster.server_name == name)
            kills.append(datetime.now())
            victim.kill()

            async def new_leaders() -> dict[str, str | None] | None:
                now = await leaders(cluster.url)
                return now if all(v not in (None, name) for v in now.values()) else None

            await eventually(new_leaders, 30, what="new stream leaders")
            # the services carry on: each kind of work acknowledged again after the election
            elected = time.monotonic()
            await eventually(lambda: _all_since(accepted, elected), 30,
                           what="webhooks, holds and reports acknowledged on the new leaders")
            for proc in services.values():
                assert proc.running, proc.logs()[-2000:]
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(victim.wait_healthy, 60)
            await asyncio.sleep(2)  # work while the node catches up
        finally:
            stop.set()
            await load

        # every acknowledged webhook applied exactly once
        ids = list(accepted.webhooks)
        await eventually(lambda: _count(db, "SELECT count(*) FROM webhook_events_log WHERE "
                                          "event_id = ANY($1::text[]) AND processed_at IS NOT NULL",
                                      ids, len(ids)), 60, what="every accepted webhook applied")
        assert await db.fetchval("SELECT count(*) FROM webhook_events_log WHERE "
                                 "event_id = ANY($1::text[])", ids) == len(ids)
        # every accepted report stored exactly once
        reports = list(accepted.reports)
        await eventually(lambda: _count(db, "SELECT count(*) FROM error_logs WHERE "
                                          "id::text = ANY($1::text[])", reports, len(reports)),
                       60, what="every accepted error report stored")
        # every hold kept, and expired once due; the inventory agrees with the holds
        holds = [uuid.UUID(h) for h in accepted.holds]
        assert await db.fetchval("SELECT count(*) FROM reservations WHERE id = ANY($1::uuid[])",
                                 holds) == len(holds)
        # (a hold whose answer was lost with the node is kept too: it expires like the others)
        mine = await db.fetchval("SELECT count(*) FROM reservations WHERE event_id = $1", event_id)
        await eventually(lambda: _count(db, "SELECT count(*) FROM reservations WHERE "
                                          "event_id = $1 AND status = 'expired'",
                                      event_id, mine, exact=True), 60,
                       what="every due hold expired")
        held, sold = await db.fetchrow("SELECT sum(held), sum(sold) FROM inventory_buckets "
                                       "WHERE event_id = $1", event_id)
        assert (held, sold) == (0, 0)
        await eventually(lambda: _count(db, "SELECT count(*) FROM outbox", None, 0, exact=True),
                       60, what="every outbox row published")
        # each hold's held and expired event on the stream once (ids deduplicated by JetStream)
        async with busmod.connect(cluster.url, "test") as bus:
            info = await bus.js.stream_info("RESERVATIONS", subjects_filter="reservations.>")
        counts = info.state.subjects or {}
        assert counts.get("reservations.events.held") == mine, counts
        assert counts.get("reservations.events.expired") == mine, counts
    finally:
        await db.close()

    # the node that came back has every stream as the others have it
    async def caught_up() -> bool:
        states = [await asyncio.to_thread(local_state, node) for node in cluster.nodes]
        return all(stream in states[0] and all(s.get(stream) == states[0][stream] for s in states)
                   for stream in WATCHED)

    await eventually(caught_up, 60, what=f"{name} to catch up")


def _some(accepted: Accepted) -> bool:
    return bool(accepted.webhooks and accepted.holds and accepted.reports)


async def _all_since(accepted: Accepted, t: float) -> bool:
    return all(accepted.since(t).values())


async def _count(db: asyncpg.Connection, sql: str, arg: Any, want: int, exact: bool = False
                 ) -> bool:
    n = await (db.fetchval(sql) if arg is None else db.fetchval(sql, arg))
    return n == want if exact else n >= want


def test_stream_replicas_setting() -> None:
    env = {"NATS_URL": "nats://a:1,nats://b:2,nats://c:3", "DATABASE_URL": "postgresql://x@y/z"}
    assert config.load("reaper", env).nats_stream_replicas == 1
    assert config.load("reaper", dict(env, NATS_STREAM_REPLICAS="3")).nats_stream_replicas == 3
    for bad in ("0", "6", "three"):
        with pytest.raises(config.ConfigError) as refused:
            config.load("reaper", dict(env, NATS_STREAM_REPLICAS=bad))
        assert refused.value.name == "NATS_STREAM_REPLICAS"
    assert busmod.stream_config("ERRORS", 3).num_replicas == 3


def test_nats_url_servers_take_the_first_ones_credentials() -> None:
    env = {"NATS_URL": "nats://reaper:pw-1@nats:4222,nats-2:4222, nats-3:4222",
           "DATABASE_URL": "postgresql://x@y/z"}
    assert config.load("reaper", env).nats_url == (
        "nats://reaper:pw-1@nats:4222,nats://reaper:pw-1@nats-2:4222,"
        "nats://reaper:pw-1@nats-3:4222")
    env["NATS_URL"] = "tls://a:4222,nats://b:4222"  # whole URLs stay as they are
    assert config.load("reaper", env).nats_url == "tls://a:4222,nats://b:4222"
    with pytest.raises(config.ConfigError) as refused:
        config.load("reaper", dict(env, NATS_URL="nats-2:4222"))  # no whole URL first
    assert refused.value.name == "NATS_URL"


def test_only_replies_stranded_by_a_node_death_are_forgiven() -> None:
    kill = datetime(2026, 12, 1, 0, 34, 17)
    line = ('[14732] 2026/12/01 00:34:18.436625 [ERR] 127.0.0.1:49832 - cid:68 - '
            '"v2.16.0:python3:payment" - "$G/user:payment" - Publish Violation - Subject '
            '"_INBOX_ingress.dWVK4BtKy5vONqjM7JD6KD.dWVK4BtKy5vONqjM7JDKg12e14"')
    assert refused_by_failover(line, [kill])
    assert not refused_by_failover(line, [])  # no node died
    assert not refused_by_failover(line, [kill - FAILOVER * 2])  # long after
    assert not refused_by_failover(line.replace("user:payment", "user:reporter"), [kill])
    assert not refused_by_failover(line.replace("_INBOX_ingress", "_INBOX_payment"), [kill])
    assert not refused_by_failover(line.replace('"_INBOX_ingress.', '"stripe.events.'), [kill])
