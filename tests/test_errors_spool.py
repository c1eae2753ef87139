"""The reporter's spool: reports on disk before anything can lose them, files owned by live
instances (not pids) left alone, one size cap for the whole directory, and the files of a process
that was killed sent once by whoever adopts them (a process that may publish its reports)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nats
import nats.js.errors

from boxoffice import bus as busmod
from boxoffice.report import Reporter
from boxoffice.spool import Spool
from tests.errors_support import count
from tests.harness import eventually


async def _ids_in_stream(nats_url: str) -> list[str]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            n = (await js.stream_info("ERRORS")).state.messages
        except nats.js.errors.NotFoundError:
            return []
        if not n:
            return []
        sub = await js.subscribe("errors.>", ordered_consumer=True)
        ids = [json.loads((await sub.next_msg(timeout=5)).data)["id"] for _ in range(n)]
        await sub.unsubscribe()
        return ids
    finally:
        await nc.close()


async def _at_least(nats_url: str, n: int) -> list[str] | None:
    ids = await _ids_in_stream(nats_url)
    return ids if len(ids) >= n else None


async def _at_least_rows(db, sql: str, n: int) -> bool:
    return await count(db, sql) >= n


async def test_two_reporters_with_one_pid_leave_each_others_live_files_alone(
        nats_url, tmp_path) -> None:
    # in one process, so they share a pid, as two containers' pid-1 services do
    live = Reporter("payment", bus_url=nats_url, spool_dir=str(tmp_path))  # no bus: it keeps all
    other = Reporter("payment", bus_url=nats_url, spool_dir=str(tmp_path))
    kept = [live.report("error", f"still waiting #{i}", fold=False) for i in range(20)]
    live_files = {p: p.read_bytes() for p in tmp_path.rglob("*.spool")}
    assert len(live_files) == 1 and all(live_files.values())
    async with busmod.connect(nats_url, "spool-test") as bus:
        await bus.declare_streams("ERRORS")
        await other.start()
        other.attach(bus)  # its first round adopts what it may, then sends
        mine = [other.report("error", f"sent at once #{i}", fold=False) for i in range(20)]
        assert await other.flush(5)
        # the live reporter's file is intact, and none of its reports were sent for it
        assert sorted(await _ids_in_stream(nats_url)) == sorted(mine)
        assert {p: p.read_bytes() for p in live_files} == live_files
        # the live one goes away (its lock is released, as at any exit): the other adopts its
        # file within a round, sends every report once and removes the file
        await live.close()
        ids = await eventually(lambda: _at_least(nats_url, 40), timeout=10)
        assert sorted(ids) == sorted(mine + kept)
        assert await other.flush(5)
        await eventually(lambda: not any(p.exists() for p in live_files))
        await other.close()


def test_one_size_cap_holds_across_every_file_in_the_directory(tmp_path) -> None:
    cap = 64 << 10
    line = json.dumps({"id": "x", "service": "payment", "level": "error",
                       "message": "m" * 1000}).encode()
    # three instances on one bus, one on another bus (another subdirectory)
    spools = [Spool(tmp_path, "payment", "nats://a:4222", max_bytes=cap) for _ in range(3)]
    spools.append(Spool(tmp_path, "reaper", "nats://b:4222", max_bytes=cap))
    kept = 0
    for _ in range(100):
        for spool in spools:
            kept += spool.write(line)
            on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
            assert on_disk <= cap
    assert kept * (len(line) + 1) == on_disk > cap - 2 * (len(line) + 1)  # the cap is used
    assert sum(s.dropped for s in spools) == 100 * len(spools) - kept
    # room freed by one (sent and acknowledged) is room for another, once it counts again (a
    # full spool counts at most every 50 ms: a flood of reports must not rescan at each one)
    first = spools[0]
    while (chunk := first.unsent()) is not None:
        first.acked(chunk[0], chunk[1])
    deadline = time.monotonic() + 2
    while not spools[3].write(line):
        assert time.monotonic() < deadline
    for spool in spools:
        spool.close()


def test_sent_lines_free_their_files(tmp_path) -> None:
    spool = Spool(tmp_path, "payment", "nats://a:4222", segment_bytes=4 << 10)
    for i in range(20):
        assert spool.write(json.dumps({"n": i, "pad": "p" * 1000}).encode())
    assert len(list(tmp_path.rglob("*.spool"))) >= 3  # sealed past segment_bytes
    sent = []
    while (chunk := spool.unsent(max_lines=3)) is not None:
        sent += [json.loads(line)["n"] for line in chunk[2]]
        spool.acked(chunk[0], chunk[1])
    assert sent == list(range(20)) and not spool.pending()
    # sealed files are gone; the active one, if not full, is kept empty for the next report
    assert [f.stat().st_size for f in tmp_path.rglob("*.spool")] in ([], [0])
    spool.close()
    assert not list(tmp_path.rglob("*"))[1:]  # only the bus's (empty) directory is left


def test_a_dead_writers_torn_last_line_is_handed_over_as_it_is(tmp_path) -> None:
    dead = Spool(tmp_path, "payment", "nats://a:4222")
    assert dead.write(b'{"n": 1}') and dead.write(b'{"n": 2}')
    (path,) = tmp_path.rglob("*.spool")
    with open(path, "ab") as fh:
        fh.write(b'{"n": ')  # it died mid-write
    heir = Spool(tmp_path, "payment", "nats://a:4222")
    assert heir.adopt() == 0  # its writer still holds it
    dead.close()  # (what the kernel does when a process dies: the lock goes)
    assert heir.adopt() == 1
    f, offset, lines = heir.unsent()
    assert lines == [b'{"n": 1}', b'{"n": 2}', b'{"n": ']  # the reporter skips what is torn
    heir.acked(f, offset)
    assert not path.exists() and heir.unsent() is None


def test_a_gone_instance_is_adopted_only_by_whoever_may_publish_its_reports(tmp_path) -> None:
    # its credentials left out, the URL names the same bus for every service's user
    dead = Spool(tmp_path, "reaper", "nats://reaper:pw1@a:4222")
    assert dead.write(b'{"n": 1}')
    dead.close()
    other = Reporter("payment", bus_url="nats://payment:pw2@a:4222", spool_dir=str(tmp_path))
    assert other.spool.dir == dead.dir
    assert other.spool.adopt() == 0  # payment may not publish errors.reaper.*
    heir = Reporter("reaper", bus_url="nats://reaper:pw1@a:4222", spool_dir=str(tmp_path))
    relay = Reporter("ingress", bus_url="nats://ingress:pw3@a:4222", spool_dir=str(tmp_path))
    assert relay.spool.adopt() == 1  # ingress may: it relays every service's reports
    relay.spool.close()
    assert heir.spool.adopt() == 1
    heir.spool.close()
    other.spool.close()


KILLED_SCRIPT = """
import logging, os, signal, sys
from boxoffice import bus as busmod, runtime

async def build(svc):
    bus = await svc.stack.enter_async_context(busmod.connect(svc.config.nats_url, "doomed"))
    await bus.declare_streams("ERRORS")
    runtime.standard_checks(svc, bus=bus)  # the reporter sends through this bus from now on
    log = logging.getLogger("boxoffice.reaper")
    for i in range(int(sys.argv[1])):
        log.error("sweep %d failed", i, extra={"sweep": i})
    os.kill(os.getpid(), signal.SIGKILL)  # before the reporter's task had a turn

sys.exit(runtime.run("reaper", build))
"""


async def test_errors_logged_just_before_a_sigkill_are_stored_once(
        db, service_env, start_service, tmp_path) -> None:
    n = 300
    script = tmp_path / "doomed.py"
    script.write_text(KILLED_SCRIPT)
    spool = tmp_path / "spool"
    env = dict(service_env, ERROR_SPOOL_DIR=str(spool), HEALTH_PORT="0")
    killed = subprocess.run([sys.executable, str(script), str(n)], env=env, capture_output=True,
                            timeout=60)
    assert killed.returncode == -9, killed.stderr[-2000:]
    lines = [line for f in spool.rglob("reaper.*.spool") for line in f.read_bytes().splitlines()]
    assert len(lines) == n  # on disk when the process died
    # its successor (a process of the same service, on the same bus and spool) adopts the dead
    # instance's file; another service may not publish its reports, so leaves it alone
    start_service("error_sink", ERROR_SPOOL_DIR=str(spool))
    start_service("reaper", ERROR_SPOOL_DIR=str(spool))
    stored = "SELECT count(*) FROM error_logs WHERE service = 'reaper'"
    await eventually(lambda: _at_least_rows(db, stored, n), timeout=30)
    await eventually(lambda: not list(spool.rglob("reaper.*.spool")), timeout=30)
    assert await count(db, stored) == n
    messages = {r["error_message"] for r in await db.fetch(
        "SELECT error_message FROM error_logs WHERE service = 'reaper'")}
    assert messages == {f"sweep {i} failed" for i in range(n)}
    assert await db.fetchval("SELECT sum(count) FROM error_groups WHERE service = 'reaper'") == n
