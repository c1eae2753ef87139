"""The error-sink as a real process: every report the bus accepted is stored once, grouped and
scrubbed, whatever is stopped or killed meanwhile."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import asyncpg
import nats

from boxoffice import migrate, wire
from boxoffice.embedded import Postgres
from boxoffice.error_sink import store
from boxoffice.error_sink.report_rows import prepare
from tests.errors_support import count, publish, publish_raw, report
from tests.harness import eventually

N = 10_000


async def _true(value, n: int) -> bool:
    return (await value) == n


# The tests' reports, not the sink's own: a sink that loses its database mid-transaction may log
# errors (asyncpg's "Resetting connection with an active transaction", an unretrieved future of
# the lost connection), which it reports like any other and stores once the database is back.
PUBLISHED = "SELECT count(*) FROM error_logs WHERE service <> 'error_sink'"


async def _stored(db, n: int) -> bool:
    return await count(db, PUBLISHED) >= n


async def _check_all_once(db, bodies: list[dict]) -> None:
    await asyncio.sleep(0.5)  # nothing more may arrive
    assert await count(db, PUBLISHED) == len(bodies)
    ids = {r["id"] for r in await db.fetch("SELECT id::text FROM error_logs "
                                           "WHERE service <> 'error_sink'")}
    assert ids == {b["id"] for b in bodies}
    # the group counts agree with the rows: a redelivered report was counted once
    assert await db.fetchval("SELECT sum(count) FROM error_groups "
                             "WHERE service <> 'error_sink'") == len(bodies)
    assert await db.fetchval("SELECT sum(occurrences) FROM error_logs "
                             "WHERE service <> 'error_sink'") == len(bodies)


async def test_reports_published_while_sink_stopped_are_all_stored_once(
        db, nats_url, start_service) -> None:
    bodies = [report(i) for i in range(N)]
    await publish(nats_url, bodies)
    start_service("error_sink")
    await eventually(lambda: _stored(db, N), timeout=60)
    await _check_all_once(db, bodies)
    group = await db.fetchrow("SELECT count, status, title, level FROM error_groups")
    assert group["count"] == N and group["status"] == "unresolved" and group["level"] == "error"
    assert group["title"].startswith("ChargeFailed: order")
    # the original runbook query runs unchanged
    rows = await db.fetch("SELECT severity, function_name, error_message, timestamp FROM error_logs "
                          "WHERE resolved = FALSE ORDER BY timestamp DESC LIMIT 20;")
    assert len(rows) == 20 and rows[0]["severity"] == "error" and rows[0]["function_name"] == "payment"


async def test_sink_killed_mid_batch_loses_and_doubles_nothing(db, nats_url, start_service) -> None:
    bodies = [report(i) for i in range(N)]
    await publish(nats_url, bodies)
    sink = start_service("error_sink")
    await eventually(lambda: _stored(db, 1), timeout=30, interval=0.005)
    sink.kill()  # SIGKILL with batches in flight (fetched, maybe written, not acked)
    at_kill = await count(db, PUBLISHED)
    assert 0 < at_kill < N, at_kill
    sink.start()
    await eventually(lambda: _stored(db, N), timeout=60)
    await _check_all_once(db, bodies)


async def test_postgres_stopped_mid_ingest_loses_and_doubles_nothing(
        nats_url, start_service, service_env, tmp_path) -> None:
    pg = Postgres(tmp_path / "pg" / "data").start(create_db="errors")
    try:
        url = pg.url("errors")
        migrate.run(url, "up")
        start_service("error_sink", env=dict(service_env, DATABASE_URL=url))
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        bodies = [report(i) for i in range(N)]
        publishing = asyncio.create_task(publish(nats_url, bodies, concurrency=64))
        await eventually(lambda: _stored(pool, 1), timeout=30, interval=0.01)
        await pool.close()
        pg.stop()  # fast shutdown: transactions in flight are aborted
        await publishing  # the bus keeps accepting reports while the database is down
        await asyncio.sleep(1.5)
        pg.start(create_db=None)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            assert await count(pool, PUBLISHED) < N
            await eventually(lambda: _stored(pool, N), timeout=60)
            await _check_all_once(pool, bodies)
        finally:
            await pool.close()
    finally:
        pg.stop()


async def test_secrets_never_reach_the_database(db, nats_url, start_service) -> None:
    card, token, password = "4111 1111 1111 1111", "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig", "hunter2-very-secret"
    stripe_key, cookie = "sk_live_51Habcdefghijklmnop", "session=abcdef0123456789"
    bodies = [
        report(1, message=f"charge failed for card {card}",
               stacktrace=f"Traceback (most recent call last):\n  File \"/app/x.py\", line 1, in f\n"
                          f"    call(headers={{'Authorization': 'Bearer {token}'}})\nValueError: x"),
        report(2, message="login failed", context={
            "form": {"user": "bob", "password": password}, "headers": {"Cookie": cookie},
            "note": f"retry with Authorization: Bearer {token}", "api_key": stripe_key,
            "url": "postgres://app:" + password + "@db/boxoffice", "cards": [card.replace(" ", "")]}),
        report(3, message=f"stripe said no to {stripe_key}", fingerprint=[f"card {card}"]),
    ]
    await publish(nats_url, bodies)
    start_service("error_sink")
    await eventually(lambda: _stored(db, 3), timeout=30)
    dump = "\n".join(r["t"] for r in await db.fetch(
        "SELECT row_to_json(e)::text AS t FROM error_logs e UNION ALL "
        "SELECT row_to_json(g)::text FROM error_groups g"))
    for secret in (card, card.replace(" ", ""), token, password, stripe_key, "abcdef0123456789"):
        assert secret not in dump, secret
    assert dump.count("[Filtered]") >= 8
    assert "login failed" in dump and '"user": "bob"' in dump  # what is not secret stays


async def test_any_message_the_bus_accepted_is_kept(db, nats_url, start_service) -> None:
    await publish_raw(nats_url, "errors.legacy.error", b"not json at all", "raw-1")
    await publish_raw(nats_url, "errors.legacy.critical", b"[1, 2, 3]", "raw-2")
    odd = report(3, level="LOUD", count="many", context=["not", "an", "object"], extra="field",
                 message="x" * 100_000)
    await publish_raw(nats_url, "errors.payment.error", json.dumps(odd).encode(), odd["id"])
    start_service("error_sink")
    await eventually(lambda: _stored(db, 3), timeout=30)
    rows = {r["service"] + "/" + r["severity"]: r for r in await db.fetch(
        "SELECT service, severity, error_message, context, id::text FROM error_logs")}
    assert rows["legacy/error"]["error_message"].startswith("[undecodable error report] not json")
    assert rows["legacy/critical"]["error_message"].startswith("[error report is not an object]")
    kept = rows["payment/error"]
    assert kept["id"] == odd["id"]
    assert len(kept["error_message"]) <= 8192 and "[truncated" in kept["error_message"]
    # the same report again, past JetStream's de-duplication (another Nats-Msg-Id): kept once
    await publish_raw(nats_url, "errors.payment.error", json.dumps(odd).encode(), "a-replay")
    await asyncio.sleep(1.5)
    assert await count(db) == 3


async def test_a_report_id_is_stored_once_whatever_its_batch_holds(db, database_url) -> None:
    a, b, c = report(1), report(2), report(3)

    def rows(*bodies: dict) -> list:
        return [prepare(SimpleNamespace(subject="errors.payment.error", data=json.dumps(x).encode(),
                                        headers={"Nats-Msg-Id": x["id"]}), wire.now())
                for x in bodies]

    async with store.writer_pool(database_url, 1) as pool:
        async with pool.acquire() as conn, conn.transaction():
            assert (await store.write_batch(conn, rows(a), store.AlertPolicy())).stored == 1
        # a replayed after JetStream's duplicate window (its id spelled in capitals), in one
        # batch with a new report, and another new one delivered twice in the same batch
        replay = dict(a, id=a["id"].upper())
        async with pool.acquire() as conn, conn.transaction():
            out = await store.write_batch(conn, rows(replay, b, c, c), store.AlertPolicy())
    assert out.stored == 2
    ids = sorted(r["id"] for r in await db.fetch("SELECT id::text FROM error_logs"))
    assert ids == sorted([a["id"], b["id"], c["id"]])
    assert await db.fetchval("SELECT sum(count) FROM error_groups") == 3


async def test_alerts_decided_once_per_window_and_published(db, nats_url, start_service,
                                                            alert_endpoint) -> None:
    alert_endpoint.fail_with.append(500)  # the first post fails
    posted = alert_endpoint.posted
    sink = start_service("error_sink", ALERT_WINDOW_SECONDS="3", ALERT_RATE_PER_MINUTE="50",
                         ALERT_WEBHOOK_URL=alert_endpoint.url)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe("alerts.>", ordered_consumer=True)
        crit = [report(i, level="critical", error_type="LedgerCorrupt") for i in range(3)]
        for body in crit:  # three batches of the same critical error
            await publish(nats_url, [body])
            await eventually(lambda b=body: count(db, "SELECT count(*) FROM error_logs WHERE id = $1::uuid", b["id"]))
        first = json.loads((await sub.next_msg(timeout=10)).data)
        assert first["level"] == "critical" and first["reason"] == "level" and first["count"] >= 1
        await asyncio.sleep(1)
        assert await count(db, "SELECT count(*) FROM error_alerts") == 1
        # a busy group passes the rate: one alert, however many reports follow
        await publish(nats_url, [report(i, error_type="Flood", message="flood") for i in range(120)])
        rate = json.loads((await sub.next_msg(timeout=10)).data)
        assert rate["reason"] == "rate" and rate["level"] == "error" and rate["window_count"] >= 50
        # after the window, the critical group may alert again
        await asyncio.sleep(3.2)
        await publish(nats_url, [report(9, level="fatal", error_type="LedgerCorrupt")])
        again = json.loads((await sub.next_msg(timeout=10)).data)
        assert again["group_id"] == first["group_id"] and again["level"] == "fatal"
        assert again["id"] != first["id"]
        await eventually(lambda: _true(count(db, "SELECT count(*) FROM error_alerts "
                                                 "WHERE published_at IS NOT NULL"), 3))
        alerts = await db.fetch("SELECT reason FROM error_alerts ORDER BY created_at")
        assert [a["reason"] for a in alerts] == ["level", "rate", "level"]
        # the webhook got each alert once it answered 2xx; the failed post was retried
        await eventually(lambda: _true(count(db, "SELECT count(*) FROM error_alerts "
                                                 "WHERE notified_at IS NOT NULL"), 3), timeout=20)
        assert sorted(p["alert"]["id"] for p in posted) == sorted(
            [first["id"], first["id"], rate["id"], again["id"]])
        assert posted[0]["alert"]["id"] == first["id"]
        assert posted[0]["text"].startswith("[critical] payment: LedgerCorrupt")
        assert await db.fetchval("SELECT attempts FROM error_alerts WHERE id = $1", first["id"]) == 1
        assert sink.running and "secret-token" not in sink.logs()
    finally:
        await nc.close()
