"""PostgreSQL failover: a primary and a synchronous streaming standby (``PostgresPair``), the
services on a multi-host ``DATABASE_URL`` with ``target_session_attrs=read-write``. The primary's
postmaster is SIGKILLed in the middle of holds, PaymentIntents (at localstripe), webhook ingest
and error reports; the standby is promoted.

Checked: the services carry on (each kind of work acknowledged again after the promotion, no
service died), and nothing they acknowledged is lost: every webhook answered 200 applied once,
every hold answered 201 in the promoted database (those acknowledged before the kill too) and,
once due, expired with one event on the stream, every PaymentIntent answered 201 logged with its
key and at Stripe (one per key), every report answered 202 stored once, the inventory consistent
with the holds (the fault run's invariants, ``fault_checks``). Nothing is paid here: a payment's
webhooks and refunds are the fault run's.

Also: a commit waits for the standby; a pair started again after a failover keeps the promoted
primary; a server that never answers does not keep the pools from the next; ``boxoffice up``
with ``BOXOFFICE_PG_STANDBY=1`` restarts a dead standby and promotes it when the primary dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from boxoffice import config, migrate
from boxoffice import db as dbmod
from boxoffice import stack as stack_mod
from boxoffice.embedded import LocalStripe, Postgres, PostgresPair, free_port
from boxoffice.stack import Stack, read_env
from tests.checkout_support import Api
from tests.cluster_support import Accepted, all_services, workload
from tests.conftest import PgRefusals
from tests.fault_checks import (
    answers_well_formed,
    errors_stored,
    expiry_announced,
    gather_evidence,
    no_event_oversold,
    one_intent_per_key,
    promises_kept,
)
from tests.fault_stripe import StripeBuyer
from tests.fault_workload import Ledger, code_of
from tests.harness import CLIENT_TOKEN, ServiceProcess, base_env, eventually, process_alive
from tests.stack_support import read_until, start_stack, stop_stack
from tests.stripe_keys_proxy import StripeKeysProxy

pytestmark = pytest.mark.timeout(150)

TTL = 2  # seconds a hold lives: holds made before the kill expire on the promoted primary


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[PostgresPair]:
    # not under pytest's basetemp: a pytest session starting meanwhile makes pytest-of-<user>
    # private again (0700), and the servers' own user could no longer reach their data
    root = Path(tempfile.mkdtemp(prefix="boxoffice-test-pgha-"))
    p = PostgresPair(root / "pg").start(create_db="boxoffice")
    refusals = [PgRefusals(n.log) for n in p.nodes.values()]
    try:
        migrate.run(p.url("boxoffice"), "up")
        yield p
    finally:
        p.kill()
        # whatever the test did, neither server refused a service anything for want of a grant
        refused = [line for r in refusals for line in r.take()]
        for name, node in p.nodes.items():  # kept with the test's other logs
            shutil.copy(node.log, tmp_path / f"postgres-{name}.log")
        shutil.rmtree(root, ignore_errors=True)
    assert not refused, "PostgreSQL refused:\n" + "\n".join(refused[:20])


@pytest_asyncio.fixture
async def stripe_keys(localstripe: LocalStripe) -> AsyncIterator[StripeKeysProxy]:
    """Stripe's idempotency keys in front of localstripe (which ignores them): a PaymentIntent
    created by a call whose commit died with the primary is replayed to the retry, as Stripe
    does, not made twice."""
    proxy = await StripeKeysProxy(localstripe.url).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest_asyncio.fixture
async def services(pair: PostgresPair, nats_url: str, stripe_keys: StripeKeysProxy,
                   tmp_path: Path) -> AsyncIterator[dict[str, ServiceProcess]]:
    env = base_env(nats_url, pair.url("boxoffice"), stripe_keys.url)
    env.update(LOG_LEVEL="WARNING")
    async with all_services(env, TTL, tmp_path) as procs:
        yield procs


class OurIntents:
    """Stripe's lists for ``gather_evidence``: the PaymentIntents of this test's reservations
    (the session's localstripe has other tests' too); no events (nothing is paid here)."""

    def __init__(self, stripe: StripeBuyer, reservations: set[str]):
        self.stripe = stripe
        self.reservations = reservations

    async def list_all(self, path: str) -> list[dict[str, Any]]:
        if path != "/v1/payment_intents":
            return []
        return [pi for pi in await self.stripe.list_all(path)
                if pi.get("metadata", {}).get("reservation_id") in self.reservations]


async def payer(base: str, event_id: str, ledger: Ledger, stop: asyncio.Event, n: int) -> None:
    """Holds a ticket and asks for its PaymentIntent, with the same key again while the answer
    is transient, as a good client does (no answer, 429, 5xx, 409 ``idempotency_key_in_use``:
    a key whose worker died with the primary stays leased for a few seconds); records each 201.
    A key in hand when ``stop`` is set is still seen through (a key left half-way would leave
    its PaymentIntent unknown until reconciliation)."""
    async with aiohttp.ClientSession() as http:
        api, tries = Api(http, base), 0
        while not stop.is_set():
            tries += 1
            try:
                r = await api.call("POST", "/v1/reservations",
                                   body={"event_id": event_id, "quantity": 1}, timeout=15)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
                continue
            ledger.answer("hold", r)
            if r.status != 201:
                await asyncio.sleep(0.1)
                continue
            rid, key = r.json["id"], f"failover-{n}-{tries}"
            ledger.hold_made(CLIENT_TOKEN, None, rid, 1)
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:
                try:
                    r = await api.call("POST", "/v1/payment_intents", key=key,
                                       body={"reservation_id": rid}, timeout=15)
                except (TimeoutError, aiohttp.ClientError):
                    await asyncio.sleep(0.2)
                    continue
                ledger.answer("payment_intent", r)
                if r.status == 201:
                    ledger.intent_made(CLIENT_TOKEN, key, r.json["id"], rid)
                if r.status < 500 and r.status != 429 and code_of(r) != "idempotency_key_in_use":
                    break
                await asyncio.sleep(min(float(r.headers.get("Retry-After", 1)), 1.0))
            else:
                raise AssertionError(f"key {key} had no final answer in 60 s")


async def test_a_promoted_standby_has_everything_acknowledged(
        services: dict[str, ServiceProcess], pair: PostgresPair, nats_url: str,
        localstripe: LocalStripe) -> None:
    url = pair.url("boxoffice")
    old_primary, standby = pair.primary, pair.standby
    db = await asyncpg.connect(url)
    event_id = await db.fetchval("SELECT create_ticketed_event(gen_random_uuid(), 'failover', "
                                 "100000, 2500, 'eur', 8)")
    await db.close()
    accepted, stop, ledger = Accepted(), asyncio.Event(), Ledger()
    base = services["ingress"].url
    load = [asyncio.create_task(workload(base, str(event_id), accepted, stop))]
    load += [asyncio.create_task(payer(base, str(event_id), ledger, stop, n)) for n in range(2)]
    try:
        await eventually(lambda: accepted.webhooks and accepted.holds and accepted.reports
                       and ledger.intents, 30, what="the workload to be acknowledged")
        intents_before = len(ledger.intents)
        await asyncio.sleep(2)
        killed = time.monotonic()
        old_primary.kill()  # SIGKILL to the postmaster alone: its backends follow it
        await asyncio.sleep(1)  # the time a watcher takes to notice
        await asyncio.to_thread(pair.promote)
        promoted = time.monotonic()
        assert pair.primary is standby
        # the services carry on: each kind of work acknowledged again on the promoted primary
        await eventually(lambda: all(accepted.since(promoted).values()), 45,
                       what="webhooks, holds and reports acknowledged after the promotion")
        intents_promoted = len(ledger.intents)
        await eventually(lambda: len(ledger.intents) > intents_promoted, 45,
                       what="PaymentIntents answered 201 after the promotion")
        await asyncio.sleep(2)
        for name, proc in services.items():
            assert proc.running, f"{name} died:\n{proc.logs()[-2000:]}"
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert intents_before, "no PaymentIntent before the kill"
    before = {kind: sum(1 for at in getattr(accepted, kind).values() if at < killed)
              for kind in ("webhooks", "holds", "reports")}
    assert all(before.values()), before  # acknowledged by the primary that was killed

    db = await asyncpg.connect(url)
    try:
        assert await db.fetchval("SELECT inet_server_port()") == standby.port
        assert await db.fetchval("SELECT pg_is_in_recovery()") is False
        # every acknowledged webhook logged once and applied
        ids = list(accepted.webhooks)
        await eventually(lambda: _count(db, "SELECT count(*) FROM webhook_events_log WHERE "
                                          "event_id = ANY($1::text[]) AND processed_at IS NOT NULL",
                                      ids, len(ids)), 60, what="every accepted webhook applied")
        assert await db.fetchval("SELECT count(*) FROM webhook_events_log WHERE "
                                 "event_id = ANY($1::text[])", ids) == len(ids)
        # every hold kept and, once due, expired; every report stored; nothing left to publish
        mine = await db.fetchval("SELECT count(*) FROM reservations WHERE event_id = $1", event_id)
        assert mine >= len(accepted.holds)
        await eventually(lambda: _count(db, "SELECT count(*) FROM reservations WHERE "
                                          "event_id = $1 AND status = 'expired'", event_id, mine),
                       60, what="every due hold expired")
        await eventually(lambda: _count(db, "SELECT count(*) FROM error_logs WHERE "
                                          "id::text = ANY($1::text[])", list(accepted.reports),
                                      len(accepted.reports)), 60,
                       what="every accepted error report stored")
        await eventually(lambda: _count(db, "SELECT count(*) FROM outbox", None, 0), 60,
                       what="every outbox row published")
    finally:
        await db.close()

    # the fault run's invariants, on the promoted primary, the streams and Stripe
    ledger.holds.update({rid: 1 for rid in accepted.holds})
    ledger.errors_acked.update(accepted.reports)
    db = await asyncpg.connect(url)
    try:
        ours = {str(r) for r in await db.fetchval(
            "SELECT array_agg(id) FROM reservations WHERE event_id = $1", event_id)}
    finally:
        await db.close()
    async with aiohttp.ClientSession() as http:
        evidence = await gather_evidence(
            SimpleNamespace(database_url=url, nats_servers=nats_url.split(",")),  # type: ignore[arg-type]
            OurIntents(StripeBuyer(http, localstripe.url), ours), ledger)  # type: ignore[arg-type]
    invariants = [no_event_oversold(evidence), expiry_announced(evidence),
                  errors_stored(evidence, ledger), promises_kept(evidence, ledger),
                  one_intent_per_key(evidence, ledger),
                  # no relay here: the webhooks went straight to ingress (their answers in
                  # ``accepted``)
                  answers_well_formed(ledger, SimpleNamespace(answers={}, violations=[]))]
    for inv in invariants:
        assert inv.checked, inv.name
    broken = [f"[{i.name}] {v}" for i in invariants for v in i.violations[:10]]
    assert not broken, "\n".join(broken)


async def _count(db: asyncpg.Connection, sql: str, arg: Any, want: int) -> bool:
    n = await (db.fetchval(sql) if arg is None else db.fetchval(sql, arg))
    return n == want


async def test_a_server_that_never_answers_does_not_hide_the_next(pg_admin_url: str) -> None:
    """A primary whose machine is gone does not refuse: it never answers. The pool gives each
    server of the URL its own connection timeout, so it reaches the next one (asyncpg alone
    spends its one timeout on the first and never tries the standby)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does) and never says a word
    try:
        server = urlsplit(pg_admin_url)
        url = (f"postgresql://{server.netloc.rpartition('@')[0]}@127.0.0.1:"
               f"{silent.getsockname()[1]},{server.hostname}:{server.port}/postgres"
               "?target_session_attrs=read-write")
        t0 = time.monotonic()
        async with dbmod.pool(url, min_size=1, max_size=2, check_schema=False) as p:
            assert await p.fetchval("SELECT inet_server_port()") == server.port
            # and a connection made again (the pool's after a failover) goes the same way
            async with p.acquire() as conn:
                await conn.close()
            assert await p.fetchval("SELECT inet_server_port()") == server.port
        assert time.monotonic() - t0 < 20
    finally:
        silent.close()


def test_database_url_may_list_a_primary_and_its_standby() -> None:
    env = {"NATS_URL": "nats://a:1"}
    two = ("postgresql://boxoffice_reaper:pw@10.0.0.1:5432,10.0.0.2:5433/boxoffice"
           "?target_session_attrs=read-write")
    assert config.load("reaper", dict(env, DATABASE_URL=two)).database_url == two
    for bad in ("postgresql://u@h:5432,h2:99999/db", "postgresql://u@h:5432,/db",
                "http://h:1,h:2/db"):
        with pytest.raises(config.ConfigError) as refused:
            config.load("reaper", dict(env, DATABASE_URL=bad))
        assert refused.value.name == "DATABASE_URL"
    assert migrate.hosts(two) == ["10.0.0.1:5432", "10.0.0.2:5433"]
    assert migrate.server_urls(two) == [
        "postgresql://boxoffice_reaper:pw@10.0.0.1:5432/boxoffice?target_session_attrs=read-write",
        "postgresql://boxoffice_reaper:pw@10.0.0.2:5433/boxoffice?target_session_attrs=read-write"]



async def test_a_commit_waits_for_the_standby(pair: PostgresPair) -> None:
    """Synchronous replication: while the standby's WAL receiver is stopped, a commit on the
    primary does not return (nothing is acknowledged that the standby lacks); it returns once
    the standby has the WAL."""
    receiver = int(pair.standby.psql("SELECT pid FROM pg_stat_wal_receiver"))
    conn = await asyncpg.connect(pair.url("boxoffice"))
    try:
        os.kill(receiver, signal.SIGSTOP)
        try:
            insert = asyncio.create_task(conn.execute(
                "SELECT create_ticketed_event(gen_random_uuid(), 'sync', 10, 100, 'eur', 1)"))
            done, _ = await asyncio.wait([insert], timeout=2)
            assert not done, "a commit returned while the standby could not have it"
            waiting = pair.primary.psql("SELECT wait_event FROM pg_stat_activity "
                                        "WHERE backend_type = 'client backend' AND "
                                        "wait_event = 'SyncRep'", database="boxoffice")
            assert waiting == "SyncRep"
        finally:
            os.kill(receiver, signal.SIGCONT)
        await asyncio.wait_for(insert, 10)
    finally:
        await conn.close()
    assert pair.standby.psql("SELECT count(*) FROM ticketed_events WHERE name = 'sync'",
                             database="boxoffice") == "1"


def test_a_pair_started_again_on_other_ports_streams_again(pair: PostgresPair) -> None:
    primary, standby = pair.primary.datadir, pair.standby.datadir
    pair.stop()
    again = PostgresPair(pair.root).start(create_db=None)  # start() waits for it to stream
    try:
        assert (again.primary.datadir, again.standby.datadir) == (primary, standby)
        assert again.standby.psql("SELECT sender_port FROM pg_stat_wal_receiver") == str(
            again.primary.port)
    finally:
        again.kill()


def test_a_pair_started_again_after_a_failover_keeps_the_promoted_primary(
        pair: PostgresPair) -> None:
    old, new = pair.primary, pair.standby
    pair.primary.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)",
                      database="boxoffice")
    old.kill()
    pair.promote()
    pair.primary.psql("INSERT INTO kept VALUES (2)", database="boxoffice")
    pair.stop()
    again = PostgresPair(pair.root)  # on other ports (5432 may be taken by then)
    again.start(create_db=None)
    try:
        assert again.primary.datadir == new.datadir
        # the old primary was made again as the new one's standby, streaming synchronously
        assert (again.standby.datadir / "standby.signal").exists()
        assert again.standby.datadir == old.datadir
        assert again.standby.psql("SELECT array_agg(x ORDER BY x) FROM kept",
                                  database="boxoffice") == "{1,2}"
    finally:
        again.kill()


async def test_a_promoted_primary_runs_alone_until_its_standby_is_rebuilt(
        pair: PostgresPair) -> None:
    """After a failover the promoted primary's commits wait for no one (it has no standby;
    the setting its copy brought from the old primary is dropped); ``start_standby_again`` makes
    the old primary its standby, and from then on its commits wait for that standby again,
    without restarting the primary."""
    old, new = pair.primary, pair.standby
    pair.primary.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)",
                      database="boxoffice")
    old.kill()
    pair.promote()
    assert new.psql("SHOW synchronous_standby_names") == ""
    new.psql("INSERT INTO kept VALUES (2)", database="boxoffice")  # would hang if it waited
    assert new.proc is not None
    new_pid = new.proc.pid
    await asyncio.to_thread(pair.start_standby_again, afresh=True)
    assert pair.primary is new and pair.standby is old and new.proc.pid == new_pid
    assert (old.datadir / "standby.signal").exists()
    assert new.psql("SHOW synchronous_standby_names") == "*"
    assert old.psql("SHOW synchronous_standby_names") == ""
    receiver = int(old.psql("SELECT pid FROM pg_stat_wal_receiver"))
    conn = await asyncpg.connect(pair.url("boxoffice"))
    try:
        os.kill(receiver, signal.SIGSTOP)
        try:
            insert = asyncio.create_task(conn.execute("INSERT INTO kept VALUES (3)"))
            done, _ = await asyncio.wait([insert], timeout=2)
            assert not done, "a commit returned while the rebuilt standby could not have it"
        finally:
            os.kill(receiver, signal.SIGCONT)
        await asyncio.wait_for(insert, 10)
    finally:
        await conn.close()
    assert old.psql("SELECT array_agg(x ORDER BY x) FROM kept", database="boxoffice") == "{1,2,3}"


def test_the_supervisor_never_promotes_a_standby_that_may_lack_commits(
        pair: PostgresPair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``boxoffice up``'s failover step, outcome by outcome: the standby dies (started again,
    the primary synchronous on it); the primary dies (the standby promoted); the old primary is
    made the standby afresh; and when the promoted primary dies before that new standby has
    caught up (it streams, but the primary never waited for it), the primary is started again
    on its own data rather than the standby promoted."""
    stack = Stack(tmp_path, pg_pair=pair)
    a, b = pair.primary, pair.standby
    b.kill()
    stack_mod._fail_over(stack)
    assert b.running and pair.synchronous and "exited; starting it again" in capsys.readouterr().out
    a.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)", database="boxoffice")
    a.kill()
    stack_mod._fail_over(stack)
    assert pair.primary is b and not pair.synchronous
    assert "promoting the standby" in capsys.readouterr().out
    b.psql("INSERT INTO kept VALUES (2)", database="boxoffice")  # acknowledged by b alone
    stack_mod._fail_over(stack)
    assert "making the old primary" in capsys.readouterr().out
    assert pair.standby is a and a.running and pair.synchronous
    assert a.psql("SELECT array_agg(x ORDER BY x) FROM kept", database="boxoffice") == "{1,2}"
    # a standby that has not caught up: a promoted, running alone; b made its copy and
    # streaming, but a's commits never waited for it; then a dies
    b.kill()
    pair.promote()
    assert pair.primary is a and not pair.synchronous
    a.psql("INSERT INTO kept VALUES (3)", database="boxoffice")  # acknowledged by a alone
    pair._base_backup(a, b)
    pair._start_standby_server()
    assert b.psql("SELECT pg_is_in_recovery()") == "t" and not pair.synchronous
    a.kill()
    assert pair.next_step() == pair.RESTART_PRIMARY
    stack_mod._fail_over(stack)
    said = capsys.readouterr().out
    assert "starting the primary again on its data" in said and "promoting" not in said
    assert pair.primary is a and a.running and a.psql("SELECT pg_is_in_recovery()") == "f"
    assert b.psql("SELECT pg_is_in_recovery()") == "t"  # still a standby, not promoted
    assert a.psql("SELECT array_agg(x ORDER BY x) FROM kept", database="boxoffice") == "{1,2,3}"
    # both run, but a's commits do not wait for b (a's setting was dropped when it was
    # promoted): the next step makes them wait, and only then may b be promoted
    assert a.psql("SHOW synchronous_standby_names") == ""
    assert pair.next_step() == pair.MAKE_SYNCHRONOUS
    stack_mod._fail_over(stack)
    assert "making the primary wait for it" in capsys.readouterr().out
    assert pair.synchronous and pair.next_step() is None and b.running
    assert a.psql("SHOW synchronous_standby_names") == "*"
    a.psql("INSERT INTO kept VALUES (4)", database="boxoffice")
    a.kill()
    assert pair.next_step() == pair.PROMOTE
    stack_mod._fail_over(stack)
    assert pair.primary is b
    assert b.psql("SELECT array_agg(x ORDER BY x) FROM kept", database="boxoffice") == "{1,2,3,4}"


class _LateDeath:
    """A dead server's process whose exit ``poll`` does not see until someone waits for it: a
    SIGKILLed postmaster's port refuses (its clients fail) before the kernel reports its exit,
    here for as long as nobody waits, so the old check failed every time, not by a timing."""

    def __init__(self, proc: subprocess.Popen):
        self._proc, self._waited, self.pid = proc, False, proc.pid

    def poll(self) -> int | None:
        return self._proc.poll() if self._waited else None

    def wait(self, timeout: float | None = None) -> int:
        self._waited = True
        return self._proc.wait(timeout)

    def kill(self) -> None:
        self._proc.kill()


def test_a_primary_killed_while_its_standby_is_started_again_leaves_the_standby_to_promote(
        pair: PostgresPair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary dies while ``boxoffice up`` starts its dead standby again: the standby
    streams and a commit has been acknowledged, and the step, still waiting for it to catch up,
    fails on the primary's refused port before the kernel reports the primary dead. The
    standby has every acknowledged commit: it is left running and promoted. (It was killed as a
    standby that failed beside a live primary, and the primary started again on its data
    instead: CI saw it once, and a loaded machine once in 14 runs.)"""
    stack = Stack(tmp_path, pg_pair=pair)
    a, b = pair.primary, pair.standby
    b.kill()
    make_synchronous = pair._make_synchronous

    def primary_dies(timeout: float) -> None:
        a.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)", database="boxoffice")
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        monkeypatch.setattr(a, "proc", _LateDeath(a.proc))
        make_synchronous(timeout)

    monkeypatch.setattr(pair, "_make_synchronous", primary_dies)
    stack_mod._fail_over(stack)
    said = capsys.readouterr().out
    assert "exited; starting it again" in said and "failover step failed" in said, said
    assert b.running, "the standby, which has every acknowledged commit, was killed"
    assert pair.next_step() == pair.PROMOTE
    stack_mod._fail_over(stack)
    assert "primary now on" in capsys.readouterr().out
    assert pair.primary is b and b.psql("SELECT pg_is_in_recovery()") == "f"
    assert b.psql("SELECT array_agg(x) FROM kept", database="boxoffice") == "{1}"


def test_a_standby_that_fails_beside_a_live_primary_is_stopped_to_be_started_again(
        pair: PostgresPair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the test above: the step fails while the primary lives (here the
    standby never catches up in time), so the standby is stopped, the step tried again later,
    and the primary goes on."""
    stack = Stack(tmp_path, pg_pair=pair)
    a, b = pair.primary, pair.standby
    b.kill()

    def never_caught_up(timeout: float) -> None:
        raise TimeoutError("the standby does not stream")

    monkeypatch.setattr(pair, "_make_synchronous", never_caught_up)
    stack_mod._fail_over(stack)
    assert "failover step failed" in capsys.readouterr().out
    assert a.running and not b.running
    assert stack.pg_retry_at > time.monotonic() and pair.next_step() == pair.START_STANDBY
    monkeypatch.undo()
    stack.pg_retry_at = stack.standby_restart_at = 0.0
    stack_mod._fail_over(stack)
    assert b.running and pair.synchronous and pair.next_step() is None


def test_services_are_restarted_while_a_failover_step_runs(tmp_path: Path) -> None:
    """``boxoffice up``'s supervisor restarts a dead service while a failover step is under
    way (making a standby afresh copies the whole database: minutes for a large one). The step
    here is held until the service has been restarted; a supervisor that took the steps itself
    would wait for it and restart nothing."""
    release, taken = threading.Event(), threading.Event()

    class HeldPair:  # the step a real pair would take, held open
        PROMOTE, RESTART_PRIMARY, START_STANDBY, MAKE_SYNCHRONOUS = (
            PostgresPair.PROMOTE, PostgresPair.RESTART_PRIMARY, PostgresPair.START_STANDBY,
            PostgresPair.MAKE_SYNCHRONOUS)
        primary = SimpleNamespace(port=1, running=True, log=tmp_path / "a.log")
        standby = SimpleNamespace(port=2, running=False, datadir=tmp_path, log=tmp_path / "b.log")

        def next_step(self) -> str | None:
            return None if taken.is_set() else self.START_STANDBY

        def take_step(self, step: str) -> None:
            assert release.wait(30), "the step was never released"
            taken.set()

    class Sleeper(stack_mod.Proc):
        def start(self) -> None:
            self.proc = subprocess.Popen(["sleep", "60"])
            self.started_at = time.monotonic()

    proc = Sleeper("payment", "payment", {}, "http://127.0.0.1:1/readyz", tmp_path / "p.log")
    proc.start()
    stack = Stack(tmp_path, procs=[proc], pg_pair=HeldPair())  # type: ignore[arg-type]
    stop = {"flag": False}
    supervisor = threading.Thread(target=stack_mod._supervise,
                                  args=(stack, stop, "http://127.0.0.1:1", time.monotonic()))
    supervisor.start()
    try:
        time.sleep(0.5)  # the step has begun
        first = proc.proc
        assert first is not None
        first.kill()
        deadline = time.monotonic() + 5
        while proc.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.restarts == 1 and proc.proc is not first and not taken.is_set(), \
            "the dead service waited for the failover step"
        release.set()
        deadline = time.monotonic() + 5
        while not taken.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert taken.is_set()
    finally:
        release.set()
        stop["flag"] = True
        supervisor.join(10)
        stack.stop()  # the service, then the failover thread (``up`` stops the stack so)
    keeper = getattr(stack, "pg_keeper", None)
    assert not supervisor.is_alive() and not (keeper and keeper.is_alive())
    assert proc.proc is not None and proc.proc.poll() is not None


async def test_a_stop_keeps_the_failover_threads_servers_until_the_services_are_gone(
        pair: PostgresPair, tmp_path: Path) -> None:
    """A server the failover thread started (here the standby, started again after it died) is
    that thread's child, and dies with it (``die_with_parent``). Told to stop, the thread waits
    until ``Stack.stop`` has stopped the servers: the standby is still there while the services
    shut down, so the primary's commits, which wait for it, still return. (A thread that ended
    at once took the standby with it, and commits hung until the services were killed.)"""
    stack = Stack(tmp_path, children=[pair], pg_pair=pair)
    stop = {"flag": False}
    pair.standby.kill()
    supervisor = threading.Thread(target=stack_mod._supervise,
                                  args=(stack, stop, "http://127.0.0.1:1", time.monotonic()))
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while not (pair.standby.running and pair.synchronous) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pair.standby.running and pair.synchronous, "the standby was not started again"
        conn = await asyncpg.connect(pair.url("boxoffice"))
        try:
            stop["flag"] = True  # what SIGTERM to ``boxoffice up`` does
            await asyncio.to_thread(supervisor.join, 10)
            await asyncio.sleep(1.5)  # the failover thread has seen the flag
            assert pair.standby.running, "the standby died with the failover thread"
            await asyncio.wait_for(conn.execute("CREATE TABLE after_stop (x int)"), 10)
        finally:
            await conn.close()
        await asyncio.to_thread(stack.stop)
        assert not pair.primary.running and not pair.standby.running
        assert stack.pg_keeper is not None and not stack.pg_keeper.is_alive()
    finally:
        stop["flag"] = True
        stack.servers_stopped.set()
        supervisor.join(10)


def test_a_standby_that_cannot_start_is_left_stopped(pair: PostgresPair) -> None:
    """``start_standby_again`` on failure leaves the standby stopped (so the supervisor tries
    again), never half started, and refuses to start a standby without a running primary."""
    standby = pair.standby
    standby.kill()
    taken = socket.socket()  # its port taken: the server cannot start
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 15
    while True:  # once the killed server's processes have let go of it
        try:
            taken.bind(("127.0.0.1", standby.port))
            break
        except OSError:
            assert time.monotonic() < deadline, "the killed standby's port stays taken"
            time.sleep(0.2)
    taken.listen()
    try:
        with pytest.raises((RuntimeError, TimeoutError)):
            pair.start_standby_again(timeout=10)
        assert not standby.running
    finally:
        taken.close()
    pair.start_standby_again()
    assert standby.running and pair.synchronous
    pair.primary.kill()
    standby.kill()
    with pytest.raises(RuntimeError):
        pair.start_standby_again()


def test_a_copy_cut_short_is_never_taken_for_a_standby(
        pair: PostgresPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pg_basebackup that wrote standby.signal and died leaves no data directory behind it
    (its copy is made beside it), so the next start makes the standby afresh instead of
    starting a copy without its WAL, again and again."""
    standby = pair.standby
    standby.kill()
    fake = Path(tempfile.mkdtemp(prefix="boxoffice-test-fake-"))  # the server's user runs it
    fake.chmod(0o755)
    script = fake / "pg_basebackup"
    script.write_text('#!/bin/sh\nwhile [ "$1" != "-D" ]; do shift; done\n'
                      'touch "$2/standby.signal" "$2/PG_VERSION"\nexit 1\n')
    script.chmod(0o755)
    real = Postgres._bin
    monkeypatch.setattr(Postgres, "_bin", staticmethod(
        lambda name: str(script) if name == "pg_basebackup" else real(name)))
    try:
        with pytest.raises(subprocess.CalledProcessError):
            pair.start_standby_again(afresh=True)
    finally:
        monkeypatch.undo()
        shutil.rmtree(fake, ignore_errors=True)
    assert not standby.running and not (standby.datadir / "standby.signal").exists()
    pair.start_standby_again()  # made afresh, not started on the cut copy
    assert standby.running and pair.synchronous
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    assert not standby.datadir.with_name(standby.datadir.name + ".partial").exists()


@pytest.mark.timeout(600)  # a whole stack started (up to 120 s), each wait bounded below
def test_up_with_a_standby_promotes_it_when_the_primary_dies() -> None:
    # not under pytest's basetemp (see ``pair``)
    home = Path(tempfile.mkdtemp(prefix="boxoffice-test-pgha-up-"))
    proc, lines = start_stack(home, free_port(), BOXOFFICE_PG_STANDBY="1")
    try:
        assert any("synchronous standby on" in line for line in lines), "".join(lines)
        env = read_env(home / "stack.env")
        url = urlsplit(env["DATABASE_URL"])
        assert len(url.netloc.split(",")) == 2 and "target_session_attrs=read-write" in url.query
        primary = (home / "pg" / "primary").read_text().strip()
        standby = "b" if primary == "a" else "a"
        # the standby dies: it is started again, and commits (which wait for it) go on
        os.kill(_postmaster(home, standby), signal.SIGKILL)
        read_until(proc, "PostgreSQL standby on", "exited; starting it again")
        before = _hold(env, 30)
        assert before is not None, "no hold taken once the standby was started again"
        # the primary dies: the standby is promoted, and the services carry on on it
        os.kill(_postmaster(home, primary), signal.SIGKILL)
        said = read_until(proc, "PostgreSQL primary now on")
        assert any("promoting the standby" in line for line in said), said
        assert (home / "pg" / "primary").read_text().strip() != primary
        deadline = time.monotonic() + 45
        while (after := _hold(env)) is None:
            assert time.monotonic() < deadline, "no hold taken after the promotion"
            time.sleep(0.5)

        async def holds() -> int:
            conn = await asyncpg.connect(env["DATABASE_URL"])
            try:
                assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
                return await conn.fetchval("SELECT count(*) FROM reservations "
                                           "WHERE id = ANY($1::uuid[])", [before, after])
            finally:
                await conn.close()

        assert asyncio.run(holds()) == 2
        # the old primary is made the promoted one's standby (not started as a second primary,
        # whose commits nobody would ever see), and the promoted one's commits wait for it
        old, new = _port_of(env, primary), _port_of(env, standby)
        deadline = time.monotonic() + 60
        while (in_recovery := _psql(old, "SELECT pg_is_in_recovery()")) is None:
            assert time.monotonic() < deadline, "the old primary never came back"
            time.sleep(0.5)
        assert in_recovery == "t", "the old primary was started as a second primary"
        while _psql(new, "SELECT sync_state FROM pg_stat_replication") != "sync":
            assert time.monotonic() < deadline, "no synchronous standby after the failover"
            time.sleep(0.5)
        assert _psql(old, f"SELECT count(*) FROM reservations WHERE id = '{after}'") == "1"
        assert _hold(env, 30) is not None
    except BaseException:
        _print_logs(home)  # shown with the failure (the home is removed below)
        raise
    finally:
        stop_stack(proc)
        shutil.rmtree(home, ignore_errors=True)


def _print_logs(home: Path) -> None:
    """The last lines of each PostgreSQL server's log and of each service's."""
    for log in sorted([*home.glob("pg/*/postgres.log"), *home.glob("logs/*.log")]):
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print(f"--- {log.relative_to(home)} ---", *tail, sep="\n")


def _port_of(env: dict[str, str], node: str) -> int:
    """The port of node "a" or "b": the first and second server of ``DATABASE_URL``."""
    return int(migrate.hosts(env["DATABASE_URL"])["ab".index(node)].rsplit(":", 1)[1])


def _psql(port: int, sql: str) -> str | None:
    """``sql``'s answer from the server on ``port``, or None while it does not answer."""
    try:
        return Postgres("/nonexistent", port).psql(sql, database="boxoffice")
    except subprocess.CalledProcessError:
        return None


def _postmaster(home: Path, node: str) -> int:
    return int((home / "pg" / node / "data" / "postmaster.pid").read_text().split()[0])


def _hold(env: dict[str, str], timeout: float = 15) -> str | None:
    """A hold of one demo ticket through ingress: its id, or None when it was not taken."""
    req = urllib.request.Request(
        f"{env['INGRESS_URL']}/v1/reservations", method="POST",
        data=json.dumps({"event_id": env["DEMO_EVENT_ID"], "quantity": 1}).encode(),
        headers={"Authorization": f"Bearer {env['CLIENT_API_TOKEN']}",
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())["id"] if resp.status == 201 else None
    except (urllib.error.URLError, OSError):
        return None


def test_up_refuses_another_standby_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "up"], capture_output=True,
                       text=True, timeout=60,
                       env={**env, "BOXOFFICE_HOME": str(tmp_path), "BOXOFFICE_PG_STANDBY": "2"})
    assert r.returncode == 1
    assert "BOXOFFICE_PG_STANDBY must be 0 or 1" in r.stderr
    assert not (tmp_path / "pg").exists() and not (tmp_path / "nats").exists()


def test_a_primary_is_not_started_again_beside_a_backend_of_its_old_postmaster(
        tmp_path: Path) -> None:
    """The supervisor starts a primary again once its postmaster has exited, and ``start``
    removes a ``postmaster.pid`` whose process is gone. A backend of the old postmaster may
    still run (stopped, or busy before it notices): two sets of processes must never write one
    data directory. PostgreSQL's shared-memory interlock finds the old segment from the data
    directory, not only through the pid file: the start is refused until the backend is gone."""
    pg = Postgres(tmp_path / "data", free_port()).start(create_db=None)
    client = subprocess.Popen([Postgres._bin("psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U",
                               "postgres", "-c", "SELECT pg_sleep(60)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (backend := pg.psql("SELECT pid FROM pg_stat_activity "
                                      "WHERE query LIKE 'SELECT pg_sleep%'")):
            assert time.monotonic() < deadline, "the client's backend never appeared"
            time.sleep(0.1)
        os.kill(int(backend), signal.SIGSTOP)  # it cannot notice its postmaster's death
        assert pg.proc is not None
        os.kill(pg.proc.pid, signal.SIGKILL)
        pg.proc.wait()
        with pytest.raises(RuntimeError, match="exited"):
            pg.start(create_db=None)
        assert "pre-existing shared memory block" in pg.log.read_text()
        os.kill(int(backend), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while process_alive(int(backend)):
            assert time.monotonic() < deadline, "the old backend did not exit"
            time.sleep(0.1)
        pg.start(create_db=None)  # the backend gone: started on its data
        assert pg.psql("SELECT 1") == "1"
    finally:
        client.kill()
        pg.kill()

