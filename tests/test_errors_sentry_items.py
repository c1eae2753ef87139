"""Every item a Sentry SDK sends is handled on purpose: feedback and attachments stored and
linked to their error and group, an oversized attachment dropped with a note while its error is
kept, client reports stored and counted, categories boxoffice does not keep refused through
X-Sentry-Rate-Limits so that the unmodified sentry-sdk stops sending them, and each kept
category limited on its own budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from tests.errors_support import ADMIN, AUTH, ahttp, browser_event, envelope
from tests.harness import ADMIN_TOKEN, SENTRY_KEY, eventually

SCRIPT = r"""
import sys, time, sentry_sdk
from sentry_sdk.envelope import Envelope, Item, PayloadRef

def before_send(event, hint):
    return None if event.get("tags", {}).get("drop") == "yes" else event

sentry_sdk.init(dsn=sys.argv[1], release="shop@3.1.0", environment="production",
                traces_sample_rate=1.0, before_send=before_send)

def pay(order_id):
    raise RuntimeError(f"payment for order {order_id} failed")

with sentry_sdk.new_scope() as scope:
    scope.add_attachment(bytes=b"order-log line 1\norder-log line 2\n", filename="order.log",
                         content_type="text/plain")
    scope.add_attachment(bytes=b"\0" * (5 << 20), filename="core.dump")  # over the 4 MiB limit
    try:
        pay(7)
    except RuntimeError:
        event_id = sentry_sdk.capture_exception()

client = sentry_sdk.get_client()
feedback = {"event_id": "%032x" % 1, "type": "feedback", "timestamp": time.time(),
            "contexts": {"feedback": {"message": "The pay button did nothing", "name": "Ann",
                                      "contact_email": "ann@example.com",
                                      "associated_event_id": event_id}}}
client.transport.capture_envelope(Envelope(items=[Item(payload=PayloadRef(json=feedback), type="feedback")]))
report = {"event_id": event_id, "name": "Bob", "email": "bob@example.com",
          "comments": "Charged but no ticket"}
client.transport.capture_envelope(Envelope(items=[Item(payload=PayloadRef(json=report), type="user_report")]))

sentry_sdk.flush(timeout=10)
for _ in range(4):  # refused by every answer so far: dropped on the client (ratelimit_backoff)
    with sentry_sdk.start_transaction(name="checkout"):
        pass
with sentry_sdk.new_scope() as scope:
    scope.set_tag("drop", "yes")
    sentry_sdk.capture_message("dropped by before_send")
sentry_sdk.flush(timeout=10)
print(event_id)
"""


async def _get(url: str):
    status, headers, body = await ahttp("GET", url, None, ADMIN)
    assert status == 200, (url, status, body[:300])
    return headers, body


async def test_an_unmodified_sdk_s_items_are_kept_linked_and_listed(db, start_service, tmp_path) -> None:
    ingress = start_service("ingress")
    sink = start_service("error_sink")
    (tmp_path / "shop.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "shop.py"),
                          f"http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/1"],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SENTRY")})
    assert out.returncode == 0, out.stderr
    event_id = str(uuid.UUID(out.stdout.strip().splitlines()[-1]))

    # the error is kept although one of its attachments was too big, and says so
    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_logs WHERE id = $1::uuid", event_id))
    assert row["error_type"] == "RuntimeError"
    assert row["context"]["attachments_dropped"] == [
        {"filename": "core.dump", "size": 5 << 20, "reason": "too_large"}]

    # the group carries its feedback (both kinds) and its attachment
    async def detail():
        _, body = await _get(f"{ingress.url}/v1/admin/errors/{row['group_id']}")
        d = json.loads(body)
        return d if len(d["feedback"]) == 2 and d["attachments"] else None
    group = await eventually(detail)
    assert {(f["source"], f["message"], f["name"]) for f in group["feedback"]} == {
        ("feedback", "The pay button did nothing", "Ann"), ("user_report", "Charged but no ticket", "Bob")}
    assert {f["event_id"].replace("-", "") for f in group["feedback"]} == {event_id.replace("-", "")}
    assert {f["email"] for f in group["feedback"]} == {"ann@example.com", "bob@example.com"}
    assert all(f["group_id"] == str(row["group_id"]) for f in group["feedback"])
    [att] = group["attachments"]
    assert (att["filename"], att["content_type"], att["size"]) == ("order.log", "text/plain", 34)
    headers, data = await _get(f"{ingress.url}/v1/admin/attachments/{att['id']}")
    assert data == b"order-log line 1\norder-log line 2\n"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["X-Attachment-Content-Type"] == "text/plain"
    _, body = await _get(f"{ingress.url}/v1/admin/feedback")
    assert {f["message"] for f in json.loads(body)["feedback"]} >= {"The pay button did nothing",
                                                                    "Charged but no ticket"}
    status, _, body = await ahttp("GET", f"{ingress.url}/v1/admin/attachments/{uuid.uuid4()}", None, ADMIN)
    assert status == 404 and json.loads(body)["code"] == "attachment_not_found"

    # what was dropped, by whom: the SDK's own client reports and what ingress left out
    async def dropped():
        _, body = await _get(f"{ingress.url}/v1/admin/errors/dropped")
        got = {(d["origin"], d["reason"], d["category"]): d["quantity"] for d in json.loads(body)["dropped"]}
        want = {("client", "before_send", "error"), ("client", "ratelimit_backoff", "transaction"),
                ("server", "too_large", "attachment")}
        return got if want <= set(got) else None
    got = await eventually(dropped)
    # the first answer (to the error) already refused transactions: the SDK never sent one
    assert got[("client", "ratelimit_backoff", "transaction")] == 4
    assert ("server", "disabled", "transaction") not in got
    _, metrics = await _get(f"{sink.health_url}/metrics")
    assert (b'boxoffice_sentry_discarded_total{category="transaction",origin="client",'
            b'reason="ratelimit_backoff"}') in metrics

    # the same from the CLI
    env = dict(os.environ, INGRESS_URL=ingress.url, ADMIN_API_TOKEN=ADMIN_TOKEN)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "boxoffice.cli", "errors", *args],
                              capture_output=True, text=True, env=env, timeout=30)
    out = cli("feedback", "--limit", "1")
    assert out.returncode == 0 and len(json.loads(out.stdout)["feedback"]) == 1, out.stderr
    out = cli("dropped")
    assert {"before_send", "ratelimit_backoff", "too_large"} <= {
        d["reason"] for d in json.loads(out.stdout)["dropped"]}
    out = cli("attachment", att["id"], "-o", str(tmp_path / "order.log"))
    assert out.returncode == 0 and (tmp_path / "order.log").read_bytes().startswith(b"order-log line 1")
    out = cli("attachment", str(uuid.uuid4()))
    assert out.returncode == 1 and "attachment_not_found" in out.stderr


async def test_each_category_has_its_own_budget(db, start_service) -> None:
    ingress = start_service("ingress", ERROR_RATE_LIMIT_PER_MINUTE="3")
    start_service("error_sink")
    url = f"{ingress.url}/api/1/envelope/"

    def feedback_envelope() -> bytes:
        return envelope(({"type": "user_report"}, json.dumps(
            {"event_id": uuid.uuid4().hex, "name": "N", "email": "n@example.com",
             "comments": "slow"}).encode()))
    answers = [await ahttp("POST", url, feedback_envelope(), AUTH) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 429]
    limits = answers[3][1]["X-Sentry-Rate-Limits"]
    assert limits.split(", ")[0].split(":")[1:] == ["feedback", "key"]
    assert "transaction;" in limits  # never kept: refused on every answer
    # the errors' budget is untouched by the feedback flood
    events = [browser_event() for _ in range(3)]
    for e in events:
        status, headers, _ = await ahttp("POST", url, envelope(({"type": "event"}, json.dumps(e).encode())), AUTH)
        assert status == 200 and ":feedback:" not in headers["X-Sentry-Rate-Limits"]
    status, headers, _ = await ahttp("POST", url, envelope(({"type": "event"}, json.dumps(browser_event()).encode())), AUTH)
    assert status == 429 and headers["X-Sentry-Rate-Limits"].startswith(tuple(f"{n}:error:key" for n in range(1, 61)))
    assert await eventually(lambda: _count(db, "SELECT count(*) FROM error_logs", 3))
    assert await eventually(lambda: _count(db, "SELECT count(*) FROM error_feedback", 3))
    assert await eventually(lambda: _count(
        db, "SELECT sum(quantity) FROM error_discards WHERE reason = 'ratelimit'", 2))
    # an item of a category never kept, sent before the SDK learned: refused and counted
    body = envelope(({"type": "transaction"}, b'{"type": "transaction"}'),
                    ({"type": "replay_recording", "length": 2}, b"{}"), ({"type": "mystery"}, b"{}"))
    status, headers, raw = await ahttp("POST", url, body, AUTH)
    assert (status, json.loads(raw)) == (200, {})
    assert ";replay;" in headers["X-Sentry-Rate-Limits"]
    assert await eventually(lambda: _count(
        db, "SELECT count(*) FROM error_discards WHERE origin = 'server' AND "
            "(reason, category) IN (('disabled', 'transaction'), ('disabled', 'replay'), "
            "('unsupported', 'default'))", 3))


async def test_an_attachment_larger_than_the_envelope_limit_costs_only_itself(db, start_service) -> None:
    ingress = start_service("ingress")
    start_service("error_sink")
    event = browser_event()
    big = b"A" * (25 << 20)  # over the 20 MiB kept per envelope: skipped while read
    kept = bytes(range(256)) * (15 << 10)  # 3.75 MiB, under the 4 MiB limit: kept
    body = envelope(({"type": "event"}, json.dumps(event).encode()),
                    ({"type": "attachment", "length": len(big), "filename": "video.webm"}, big),
                    ({"type": "attachment", "length": len(kept), "filename": "heap.bin"}, kept),
                    ({"type": "attachment", "filename": "log.txt"}, b"L" * (5 << 20)),  # no length
                    header={"event_id": event["event_id"]})
    status, _, raw = await ahttp("POST", f"{ingress.url}/api/1/envelope/", body, AUTH)
    assert status == 200, raw
    row = await eventually(lambda: db.fetchrow(
        "SELECT * FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event["event_id"]))))
    assert [d["filename"] for d in row["context"]["attachments_dropped"]] == ["video.webm", "log.txt"]
    stored = await eventually(lambda: db.fetchrow("SELECT * FROM error_attachments"))
    assert (stored["filename"], bytes(stored["data"])) == ("heap.bin", kept)
    assert str(stored["event_id"]) == str(uuid.UUID(event["event_id"]))
    assert await db.fetchval("SELECT count(*) FROM error_attachments") == 1


async def _count(db, sql: str, n: int):
    return (await db.fetchval(sql) or 0) >= n or None


async def test_the_user_feedback_endpoint(db, start_service) -> None:
    ingress = start_service("ingress", SENTRY_PROJECTS="4=box-office-app", SENTRY_FEEDBACK_EMAIL="filter")
    start_service("error_sink")
    event = browser_event()
    status, _, _ = await ahttp("POST", f"{ingress.url}/api/4/envelope/",
                               envelope(({"type": "event"}, json.dumps(event).encode())), AUTH)
    assert status == 200
    url = f"{ingress.url}/api/0/projects/acme/box-office-app/user-feedback/"
    dsn = {"Authorization": f"DSN http://{SENTRY_KEY}@127.0.0.1:{ingress.port}/4",
           "Content-Type": "application/json"}
    body = {"event_id": event["event_id"], "name": "Cy", "email": "cy@example.com",
            "comments": "It crashed at checkout"}
    status, _, raw = await ahttp("POST", url, json.dumps(body).encode(), dsn)
    assert status == 200, raw
    assert json.loads(raw)["comments"] == "It crashed at checkout"
    bad = dict(dsn, Authorization=f"DSN http://wrongwrongwrong@127.0.0.1:{ingress.port}/4")
    assert (await ahttp("POST", url, json.dumps(body).encode(), bad))[0] == 403
    assert (await ahttp("POST", url, json.dumps({"comments": "no event"}).encode(), dsn))[0] == 422
    row = await eventually(lambda: db.fetchrow("SELECT * FROM error_feedback"))
    assert (row["source"], row["service"], row["name"]) == ("endpoint", "box-office-app", "Cy")
    assert row["email"] == "[Filtered]"  # SENTRY_FEEDBACK_EMAIL=filter
    group_id = await eventually(lambda: db.fetchval(
        "SELECT group_id FROM error_logs WHERE id = $1::uuid", str(uuid.UUID(event["event_id"]))))
    _, raw = await _get(f"{ingress.url}/v1/admin/errors/{group_id}")
    assert [f["message"] for f in json.loads(raw)["feedback"]] == ["It crashed at checkout"]


async def test_retention_purges_old_sentry_items(db, database_url) -> None:
    from boxoffice.reaper import retention
    from tests.reaper_support import as_reaper
    for age in ("91 days", "1 day"):
        at = f"now() - interval '{age}'"
        await db.execute(f"INSERT INTO error_attachments (id, received_at, service, project_id, filename, "
                         f"content_type, attachment_type, size, data) VALUES (gen_random_uuid(), {at}, "
                         f"'s', '1', 'f', 't', 'event.attachment', 1, 'x')")
        await db.execute(f"INSERT INTO error_feedback (id, received_at, occurred_at, service, project_id, "
                         f"source, message) VALUES (gen_random_uuid(), {at}, {at}, 's', '1', 'feedback', 'm')")
        await db.execute(f"INSERT INTO error_discards (report_id, received_at, service, project_id, origin, "
                         f"reason, category, quantity) VALUES (gen_random_uuid(), {at}, 's', '1', 'client', "
                         f"'r', 'error', 1)")
        await db.execute(f"INSERT INTO monitor_checkins (id, service, slug, status, started_at, updated_at) "
                         f"VALUES (gen_random_uuid(), 's', 'm', 'ok', {at}, {at})")
        await db.execute(f"INSERT INTO release_sessions (service, sid, release, environment, started, status, "
                         f"updated_at) VALUES ('s', gen_random_uuid()::text, 'r', 'e', {at}, 'exited', {at})")
        await db.execute(f"INSERT INTO release_session_buckets (message_id, idx, service, release, environment, "
                         f"started, exited) VALUES (gen_random_uuid(), 0, 's', 'r', 'e', {at}, 3)")
    async with as_reaper(database_url) as reaper:
        run = await retention.purge(reaper, retention.Ages(24, 30, 90), batch=1)
    assert run.error is None
    assert {t: run.purged[t] for t in retention.SENTRY_TABLES} == {t: 1 for t in retention.SENTRY_TABLES}
    for table in retention.SENTRY_TABLES:
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1, table
