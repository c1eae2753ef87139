"""The error-sink's message-to-row conversion: what reports of one kind share is computed once
(``report_rows._kind_cached``), and a row made from that memo is the row the uncached path
makes, secrets scrubbed, grouped by service."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from boxoffice import scrub
from boxoffice.error_sink import grouping, report_rows
from boxoffice.error_sink.report_rows import prepare

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TRACE = ('Traceback (most recent call last):\n'
         '  File "/app/services/payment/charge.py", line 10, in charge\n'
         '    await stripe.call("sk_live_abcdefghijkl")\n'
         '  File "/app/.venv/lib/python3.11/site-packages/asyncpg/pool.py", line 12, in acquire\n'
         '    return await self._acquire()\n'
         "ChargeError: boom")


def _row(body: dict[str, Any], subject: str = "errors.payment.error") -> report_rows.Row:
    return prepare(SimpleNamespace(subject=subject, data=json.dumps(body).encode(), headers=None),
                   NOW)


def _uncached(body: dict[str, Any]) -> tuple[Any, ...]:
    """What the row's grouping columns are without the memo."""
    error_type = report_rows._str(body.get("error_type"), 256)
    stacktrace = report_rows._str(body.get("stacktrace"), report_rows.MAX_STACK)
    message = report_rows._str(body.get("message"), report_rows.MAX_MESSAGE) or "(no message)"
    own = [report_rows._str(x, 256) or "" for x in body["fingerprint"]] if body.get("fingerprint") else None
    fp = grouping.fingerprint(error_type, stacktrace, message, own)
    return (error_type, stacktrace, fp, *grouping.group_key(body.get("service") or "payment", fp))


def _grouping(row: report_rows.Row) -> tuple[Any, ...]:
    return (row.error_type, row.stacktrace, row.group_fingerprint, row.fingerprint_hash,
            row.group_id)


def test_rows_of_one_kind_are_the_rows_the_uncached_path_makes() -> None:
    report_rows._kind_cached.cache_clear()
    bodies = [
        {"service": "payment", "error_type": "ChargeError", "stacktrace": TRACE, "message": "m 1"},
        {"service": "payment", "error_type": "ChargeError", "stacktrace": TRACE, "message": "m 2"},
        # no frame in the app: grouped by type and message, per report
        {"service": "payment", "error_type": "PoolError", "message": "pool 7 gone",
         "stacktrace": '  File "/usr/lib/python3.11/asyncio/tasks.py", line 1, in run\n'},
        {"service": "payment", "error_type": "PoolError", "message": "other failure",
         "stacktrace": '  File "/usr/lib/python3.11/asyncio/tasks.py", line 1, in run\n'},
        # the report's own fingerprint wins over the frames of a kind already seen
        {"service": "payment", "error_type": "ChargeError", "stacktrace": TRACE, "message": "m",
         "fingerprint": ["charge", "{{ default }}"]},
        {"service": "payment", "message": "no type, no trace 12"},
        {"service": "payment", "error_type": "", "stacktrace": "", "message": "empty ones"},
    ]
    for _ in range(2):  # the second time every kind comes from the memo
        for body in bodies:
            assert _grouping(_row(body)) == _uncached(body), body
    assert report_rows._kind_cached.cache_info().hits >= len(bodies)


def test_a_secret_in_a_stacktrace_is_scrubbed_on_every_hit() -> None:
    report_rows._kind_cached.cache_clear()
    body = {"service": "payment", "error_type": "ChargeError", "stacktrace": TRACE}
    for _ in range(3):
        row = _row(body)
        assert row.stacktrace is not None and "sk_live_" not in row.stacktrace
        assert "[Filtered]" in row.stacktrace
        assert "sk_live_" not in json.dumps(row.record, default=str)


def test_one_stacktrace_in_two_services_is_two_groups() -> None:
    report_rows._kind_cached.cache_clear()
    a = _row({"service": "payment", "error_type": "ChargeError", "stacktrace": TRACE})
    b = _row({"service": "webhook", "error_type": "ChargeError", "stacktrace": TRACE})
    assert a.group_fingerprint == b.group_fingerprint
    assert a.group_id != b.group_id
    assert (b.fingerprint_hash, b.group_id) == grouping.group_key("webhook", b.group_fingerprint)


def test_a_long_stacktrace_is_converted_but_not_kept() -> None:
    report_rows._kind_cached.cache_clear()
    long_trace = TRACE + "\n" + "x" * (report_rows.MAX_CACHED_STACK + 1)
    body = {"service": "payment", "error_type": "ChargeError", "stacktrace": long_trace}
    row = _row(body)
    assert _grouping(row) == _uncached(body)
    assert "sk_live_" not in (row.stacktrace or "")
    assert report_rows._kind_cached.cache_info().currsize == 0


def test_hex_strings_are_what_the_scrubber_makes_of_them() -> None:
    """Ids of hex digits and dashes skip the scrubber's keyword search: only a card number
    could be in them, and then it is filtered as the scrubber filters it."""
    rnd = random.Random(5)
    samples = ["4242424242424242", "4242-4242-4242-4242", "a4242424242424242f", "DEADBEEF",
               "4242424242424241", "0000000000000", "-" * 20, "abc-" + "4111111111111111",
               *(str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(2000)),
               *("".join(rnd.choice("0123456789abcdefABCDEF-") for _ in range(rnd.randrange(1, 40)))
                 for _ in range(5000)),
               *("".join(rnd.choice("0123456789-") for _ in range(rnd.randrange(13, 30)))
                 for _ in range(2000))]
    for s in samples:
        assert report_rows._id_str(s, 128) == scrub.truncate(scrub.text(s), 128), s
    assert report_rows._id_str("4242-4242-4242-4242", 128) == scrub.FILTERED
    row = _row({"service": "payment", "message": "m", "request_id": "4242424242424242",
                "environment": "4242424242424242", "release": "4242424242424242"})
    assert "4242424242424242" not in json.dumps(row.record, default=str)
