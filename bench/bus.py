"""The bus's own ceiling (a benchmark, not a test): how many messages a second one JetStream stream
keeps, with each fsync setting boxoffice runs, and what each costs nats-server in CPU.

Plain JetStream, no service: the raw baseline under every figure that publishes. Three setups,
each a fresh nats-server (or cluster) on loopback:

- one node, nats-server's default fsync (data written at once, synced every two minutes);
- one node, ``sync_interval: always``, as ``boxoffice up``, the compose file and
  ``deploy/nats/nats.conf`` run it: nats-server syncs the stream's file after every message
  before it acknowledges it;
- three nodes with the stream replicated three times (``BOXOFFICE_NATS_NODES=3``), each node
  ``sync_interval: always``: a message is acknowledged once a majority has it in its log, and the
  log's appends carry many messages each.

Two ways of publishing, each ``--messages`` messages of a domain event's size (400 bytes, a
``Nats-Msg-Id`` each) into one stream:

- ``batches``: 500 at a time, the next batch once every PubAck of the last is in, each message
  on its own (``bus_batch.publish_each``): plain JetStream;
- ``atomic``: 500 at a time as JetStream atomic batches (one PubAck a batch), into a stream that
  allows them, as the outbox relays publish (``bus_batch.publish_all``);
- ``concurrent``: 64 publishers, each waiting for its PubAck before its next message, as ingress
  publishes a webhook or an error report per request.

Reported: messages a second and nats-server's CPU per message (all nodes together).

    .venv/bin/python -m bench.bus [--messages 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import nats

from bench.cpu import cpu_seconds, tree
from boxoffice import outbox
from boxoffice.bus_batch import publish_atomic, publish_each
from boxoffice.embedded import NatsCluster, NatsServer

PAYLOAD = b'{"event":"' + b"x" * 388 + b'"}'  # 400 bytes, about a domain event's JSON
BATCH = outbox.BATCH  # the outbox relays' batch
CONCURRENCY = 64  # the benchmarks' HTTP clients
SETUPS = (("one_node_default_fsync", 1, False), ("one_node_sync_always", 1, True),
          ("three_nodes_sync_always", 3, True))


async def batches(nc: nats.NATS, n: int, tag: str, subject: str = "bench.batches",
                  payload: bytes = PAYLOAD, batch: int = BATCH) -> None:
    """``n`` messages, ``batch`` at a time, each message on its own, ids ``<tag>-<i>``."""
    bus = SimpleNamespace(nc=nc)  # publish_each needs the connection only
    for start in range(0, n, batch):
        await publish_each(bus, [(subject, payload, f"{tag}-{i}")
                                 for i in range(start, min(n, start + batch))])


async def atomic(nc: nats.NATS, n: int, tag: str) -> None:
    """``n`` messages, ``BATCH`` at a time as atomic batches, as the relays publish them."""
    bus = SimpleNamespace(nc=nc)
    for start in range(0, n, BATCH):
        kept = await publish_atomic(bus, [("bench.atomic", PAYLOAD, f"{tag}-{i}")
                                          for i in range(start, min(n, start + BATCH))])
        assert kept, "an atomic batch was refused"


async def concurrent(nc: nats.NATS, n: int, tag: str) -> None:
    js = nc.jetstream()
    ids = iter(range(n))

    async def publisher() -> None:
        for i in ids:
            await js.publish("bench.concurrent", PAYLOAD, headers={"Nats-Msg-Id": f"{tag}-{i}"})

    await asyncio.gather(*(publisher() for _ in range(CONCURRENCY)))


async def measure(urls: list[str], pids: list[int], replicas: int, n: int) -> dict[str, object]:
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.batches", "bench.concurrent"],
                            num_replicas=replicas)
        await js.add_stream(name="BENCH_ATOMIC", subjects=["bench.atomic"],
                            num_replicas=replicas, allow_atomic=True)
        await batches(nc, min(n, 2 * BATCH), "warm")  # the stream's files and leader settled
        out: dict[str, object] = {}
        for name, publish in (("batches", batches), ("atomic", atomic),
                              ("concurrent", concurrent)):
            cpu = sum(cpu_seconds(tree(p)) for p in pids)
            started = time.perf_counter()
            await publish(nc, n, name)
            seconds = time.perf_counter() - started
            used = sum(cpu_seconds(tree(p)) for p in pids) - cpu
            out[name] = {"per_s": round(n / seconds),
                         "nats_cpu_us_per_message": round(used / n * 1e6, 1)}
        return out
    finally:
        await nc.close()


async def run(n: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, nodes, sync in SETUPS:
        with tempfile.TemporaryDirectory(prefix="bench-bus-") as tmp:
            if nodes == 1:
                server = NatsServer(Path(tmp) / "nats", sync_always=sync).start()
                assert server.proc is not None
                urls, pids = [server.url], [server.proc.pid]
                stop = server.kill
            else:
                cluster = NatsCluster(Path(tmp) / "nats", nodes, sync_always=sync).start()
                urls = cluster.url.split(",")
                pids = [node.proc.pid for node in cluster.nodes if node.proc is not None]
                stop = cluster.kill
            try:
                out[name] = await measure(urls, pids, nodes, n)
            finally:
                stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.bus", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000,
                        help="messages per setup and way of publishing (default 20,000)")
    parser.add_argument("--quick", action="store_true", help="2,000 messages")
    args = parser.parse_args()
    n = 2_000 if args.quick else args.messages
    load_before = round(os.getloadavg()[0], 2)
    figures = asyncio.run(run(n))
    print(json.dumps({"bench": "bus", "messages": n, "payload_bytes": len(PAYLOAD),
                      "batch": BATCH, "concurrency": CONCURRENCY, **figures,
                      "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                                  "load_avg_1m_after": round(os.getloadavg()[0], 2)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
