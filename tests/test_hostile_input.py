"""Bad input of any kind gets a clear 4xx and changes nothing; nothing crashes a service.

Every service runs as a real process. After one event and one hold exist, the test snapshots the
database (row count and a digest of every row of every table), and every JetStream stream, then
throws hostile requests at every route of ingress's real aiohttp router (so a route added later
is covered without editing this file): bad auth, wrong methods, hostile path parameters, broken
and wrongly typed bodies, absurd query parameters, hostile headers, oversized and compressed
bodies. Every answer must be a 4xx problem+json with a stable ``code``; afterwards both snapshots
are unchanged (nothing here legitimately changes with time: the hold lives 900 s, the reaper
writes nothing on idle sweeps, and retention has nothing old enough to purge), no service logged
an error, and every service is still running and ready.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.checkout_support import Api
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, SENTRY_KEY, ServiceProcess, eventually, http_ready
from tests.hostile_support import (
    CODE,
    Case,
    RawResponse,
    Route,
    db_snapshot,
    deep,
    ingress_routes,
    send,
    stream_snapshot,
)
from tests.webhooks_support import sign

SERVICES = ("payment", "webhook", "error_sink", "reaper", "ingress")
PUBLIC = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/asyncapi.json", "/docs",
          "/console", "/console/app.js", "/console/console.css")  # the console's page and files
MAX_BODY = 1 << 20
ENVELOPE = "/api/{project_id}/envelope/"
WEBHOOK = "/v1/webhooks/stripe"

# Query parameters each route reads, with values no sane client sends. Every key must be a route.
ABSURD = ["-1", "0", str(10**12), str(10**40), "1.5", "abc", "", "%00", "%FF%FE", "1%00",
          "x" * 5000, "%27%20OR%201%3D1--", "true%0D%0AX-Injected:%201"]
QUERY = {
    "/v1/admin/payments": {"limit": ABSURD, "reservation_id": ["abc", "%00", "x" * 5000],
                           "idempotency_key": ["%00", "%01", "x" * 256, "%C3%A9"]},
    "/v1/admin/webhooks/events": {"limit": ABSURD, "status": ["bogus", "%00"],
                                  "type": ["a%20b", "a.*", "%00", "x" * 5000]},
    "/v1/admin/errors": {"limit": ABSURD, "since": ["garbage", "%00", "99999-99-99", "-1e400"],
                         "status": ["bogus", "%00"], "level": ["bogus", "%00"],
                         "service": ["x" * 5000, "%00", "a%00b", "a%20b"]},
    "/v1/admin/errors/{group_id}": {"events": ABSURD},
    "/v1/admin/reaper/runs": {"limit": ABSURD, "kind": ["bogus", "%00"],
                              "errors": ["maybe", "%00", "2"]},
}
# A valid body for the routes that read one; every hostile body is derived from it. Fields that
# may be null or left out, routes where an empty body is valid, and free text where any
# character is fine (an error report's message may quote anything; the sink stores it safely).
OPTIONAL = {"/v1/reservations": {"customer_ref"}, "/v1/admin/reservations/cleanup": {"event_id"}}
EMPTY_OK = {"/v1/admin/reservations/cleanup"}
FREE_TEXT = {"/v1/errors": {"message"}}


def valid_bodies(event_id: str, hold_id: str) -> dict[str, dict[str, Any]]:
    return {
        "/v1/admin/events": {"name": "gig", "capacity": 10, "price": 100, "currency": "eur"},
        "/v1/reservations": {"event_id": event_id, "quantity": 1, "customer_ref": "r-1"},
        "/v1/payment_intents": {"reservation_id": hold_id},
        "/v1/errors": {"id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
                       "service": "shop-web", "level": "error", "message": "boom"},
        "/v1/admin/reservations/cleanup": {"event_id": event_id},
    }


def field_mutations(route: str, body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The body with one field made wrong (type, range, size, content), or one field too many.

    (Duplicate keys are not here: JSON leaves them to the parser, and msgspec, like Python's
    json and Stripe, keeps the last one.)"""
    out: list[tuple[str, bytes]] = [("unknown field", json.dumps({**body, "zzz": 1}).encode())]
    if route not in EMPTY_OK:
        out.append(("empty object", b"{}"))
    for key, value in body.items():
        bad: list[Any] = [[], {}, True, 1.5]
        if key not in OPTIONAL.get(route, ()):
            bad.append(None)
        if isinstance(value, str) and key in FREE_TEXT.get(route, ()):
            bad += [12345, "A" * 300_000]
        elif isinstance(value, str):
            bad += [12345, "", "A" * 300_000, "\x00", value + "\x00", value + "\n", "\x1b[31m"]
        else:
            bad += [str(value), -1, 10**30, -10**30]
        for b in bad:
            out.append((f"{key}={str(b)[:20]!r}", json.dumps({**body, key: b}).encode()))
        raw = json.dumps({**body, key: "@@"}).encode()
        out.append((f"{key}=lone surrogate", raw.replace(b'"@@"', b'"\\ud800"')))
        out.append((f"{key}=invalid utf-8", raw.replace(b'"@@"', b'"\xff\xfe\xc3"')))
    return out


def malformed_bodies(route: str, valid: bytes | None) -> list[tuple[str, bytes]]:
    bodies = [] if route in EMPTY_OK else [("empty", b"")]
    bodies += [("open brace", b"{"), ("garbage", b"\x00\x01\x02garbage"),
              ("array", b"[]"), ("number", b"1"), ("null", b"null"), ("string", b'"s"'),
              ("true", b"true"), ("NaN", b"NaN"), ("deep array", deep(1000)),
              ("deep array 100000", deep(100_000)), ("deep object", deep(1000, obj=True)),
              ("invalid utf-8", b'{"\xff\xfe": 1}'), ("NUL after JSON", b'{}\x00'),
              ("BOM", b"\xef\xbb\xbf{}"), ("huge number", b'{"a": 1' + b"0" * 100_000 + b"}"),
              ("huge unknown string", b'{"x": "' + b"A" * 500_000 + b'"}')]
    if valid:
        bodies += [("truncated", valid[:len(valid) // 2]), ("two documents", valid + valid),
                   ("array of it", b"[" + valid + b"]")]
    return bodies


class Hostile:
    """Builds the hostile cases of every route."""

    def __init__(self, routes: list[Route], event_id: str, hold_id: str):
        self.routes = routes
        self.event_id = event_id
        self.hold_id = hold_id
        self.valid = valid_bodies(event_id, hold_id)

    # -- how to make a route's request valid except for one thing ---------------------------
    def value(self, route: Route, p: str, real: bool) -> str:
        """A well-formed value of path parameter ``p``: the real event or hold (used only with
        bad auth or beside one hostile part) or an id that names nothing (a valid request with
        it is a 404)."""
        rx = route.patterns.get(p, "")
        if rx.startswith(r"\d"):
            return "42"
        if "|" in rx:
            return rx.split("|")[0]
        if route.template.startswith("/v1/admin/webhooks"):
            return f"evt_{uuid.uuid4().hex}"
        ids = {"reservation_id": self.hold_id, "event_id": self.event_id} if real else {}
        return ids.get(p, str(uuid.uuid4()))

    def fill(self, route: Route, real: bool, **given: str) -> str:
        path = route.template
        for p in route.params:
            path = path.replace("{" + p + "}", given.get(p) or self.value(route, p, real))
        return path

    def auth(self, route: Route) -> list[tuple[str, bytes]]:
        t = route.template
        if t == ENVELOPE:
            return [("X-Sentry-Auth", f"Sentry sentry_version=7, sentry_key={SENTRY_KEY}".encode())]
        if t == WEBHOOK or t in PUBLIC:
            return []
        token = ADMIN_TOKEN if t.startswith("/v1/admin") else CLIENT_TOKEN
        return [("Authorization", f"Bearer {token}".encode())]

    def extra(self, route: Route) -> list[tuple[str, bytes]]:
        if route.template == "/v1/payment_intents":
            return [("Idempotency-Key", f"hostile-{uuid.uuid4()}".encode())]
        return []

    def signed(self, route: Route, body: bytes) -> list[tuple[str, bytes]]:
        """Webhook bodies are signed with the real secret, so that they reach the parser."""
        return [("Stripe-Signature", sign(body).encode())] if route.template == WEBHOOK else []

    def case(self, what: str, route: Route, *, path: str | None = None, body: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, method: str | None = None,
             chunked: bool = False) -> Case:
        hdrs = self.auth(route) + self.extra(route) if headers is None else headers
        if body is not None:
            hdrs = hdrs + self.signed(route, body) + [("Content-Type", b"application/json")]
        return Case(f"{route.method} {route.template}: {what}", method or route.method,
                    path or self.fill(route, real=False), hdrs, body, chunked)

    # -- the cases ------------------------------------------------------------------------------
    def all(self) -> list[Case]:
        cases: list[Case] = []
        paths: dict[str, set[str]] = {}
        for r in self.routes:
            paths.setdefault(r.template, set()).add(r.method)
            if r.template in PUBLIC or r.method == "OPTIONS":  # CORS preflight: public
                continue
            cases += self.auth_cases(r) + self.path_cases(r) + self.header_cases(r)
            if r.method == "POST":
                cases += self.body_cases(r)
            cases += self.query_cases(r)
        for template, methods in paths.items():
            route = next(r for r in self.routes if r.template == template)
            for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "PROPFIND"):
                if m not in methods and not (m == "GET" and "HEAD" in methods):
                    cases.append(self.case(f"method {m}", route, method=m, body=b"{}"))
        return cases

    def auth_cases(self, r: Route) -> list[Case]:
        t = r.template
        body = json.dumps(self.valid.get(t, {})).encode() if r.method == "POST" else None
        real = self.fill(r, real=True)
        if t == WEBHOOK:
            ev = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "payment_intent.succeeded",
                             "created": int(time.time()), "data": {"object": {"id": "pi_x"}}}).encode()
            now = int(time.time())
            sigs = [b"", b"garbage", b"t=,v1=", sign(ev, "whsec_wrong").encode(),
                    sign(ev, t=now - 3600).encode(), sign(ev, t=now + 3600).encode(),
                    f"t={now}".encode(), f"t={now}," .encode() + b",".join([b"v1=00"] * 5000),
                    sign(ev).encode().replace(b"v1=", b"v0="), f"t={'9' * 40},v1=ab".encode(),
                    sign(ev).encode() + b"\x01", "t=١٢٣,v1=ab".encode()]
            return [Case(f"POST {t}: signature {s[:30]!r}", "POST", t,
                         [("Stripe-Signature", s), ("Content-Type", b"application/json")], ev)
                    for s in sigs] + [Case(f"POST {t}: no signature", "POST", t,
                                           [("Content-Type", b"application/json")], ev)]
        if t == ENVELOPE:
            env = b'{}\n{"type":"event"}\n{"message":"hi"}\n'
            keys = [b"", b"wrong", SENTRY_KEY.upper().encode(), SENTRY_KEY.encode() + b"x",
                    b"\x01" + SENTRY_KEY.encode()]
            out = [Case(f"POST {t}: sentry key {k[:10]!r}", "POST", real,
                        [("X-Sentry-Auth", b"Sentry sentry_key=" + k)], env) for k in keys]
            out.append(Case(f"POST {t}: no key anywhere", "POST", real, [], env))
            out.append(Case(f"POST {t}: wrong key in dsn", "POST", real, [],
                            b'{"dsn":"http://wrong@h/1"}\n{"type":"event"}\n{}\n'))
            out.append(Case(f"POST {t}: wrong sentry_key query", "POST", real + "?sentry_key=nope",
                            [], env))
            return out
        right = ADMIN_TOKEN if t.startswith("/v1/admin") else CLIENT_TOKEN
        other = CLIENT_TOKEN if right == ADMIN_TOKEN else ADMIN_TOKEN
        values = [None, b"Bearer", b"Bearer ", b"Bearer wrong-token-000000000000",
                  b"Basic " + right.encode(), b"bearer" + right.encode(), b"Bearer " + other.encode(),
                  b"Bearer " + right.encode()[:-1], b"Bearer " + right.encode() + b"x",
                  b"Bearer " + right.encode() + b"\x01", b"Bearer \xff\xfe" + right.encode(),
                  b"Bearer " + b"A" * 7000, b"Token " + right.encode()]
        out = []
        for v in values:
            hdrs = [] if v is None else [("Authorization", v)]
            hdrs += self.extra(r)
            out.append(Case(f"{r.method} {t}: Authorization {v[:28] if v else None!r}", r.method,
                            real, hdrs + ([("Content-Type", b"application/json")] if body else []),
                            body))
        return out

    def path_cases(self, r: Route) -> list[Case]:
        out = []
        hostile = ["not-a-uuid", "A" * 4000, "..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e",
                   "%00", "abc%00def", "%ZZ", "%C3%28", "%FF", "%E2%80%AE", "%0D%0AX:%201",
                   "%27%20OR%201%3D1--", str(uuid.uuid4()) + "%00", str(uuid.uuid4()) + "x",
                   "{" + "}", "*", ">", "a.b", "-1", "9" * 40, "%20"]
        for p in r.params:
            for h in hostile:
                out.append(self.case(f"path {p}={h[:20]!r}", r, path=self.fill(r, True, **{p: h}),
                                     body=b"{}" if r.method == "POST" and r.template != ENVELOPE
                                     else None))
        # paths beside the route: traversal and junk after it
        base = self.fill(r, real=True)
        for suffix in ("/..", "/../../../etc/passwd", "%00", "/%00", "//", "/x"):
            out.append(self.case(f"path suffix {suffix!r}", r, path=base + suffix,
                                 body=b"{}" if r.method == "POST" else None))
        return out

    def header_cases(self, r: Route) -> list[Case]:
        out = []
        body = json.dumps(self.valid[r.template]).encode() if r.template in self.valid else None
        path = self.fill(r, real=False)
        if r.template in ("/v1/payment_intents", "/v1/reservations"):
            for key in [b"", b" ", b"\x01abc", b"a\x7fb", b"tab\there", b"A" * 256, b"\xc3\xa9t\xc3\xa9",
                        b"\xff", b"k\x00k"]:
                hdrs = self.auth(r) + [("Idempotency-Key", key),
                                       ("Content-Type", b"application/json")]
                out.append(Case(f"{r.method} {r.template}: Idempotency-Key {key[:20]!r}",
                                r.method, path, hdrs, body))
            out.append(Case(f"{r.method} {r.template}: two Idempotency-Keys", r.method, path,
                            self.auth(r) + [("Idempotency-Key", b"k1"), ("Idempotency-Key", b"k2"),
                                            ("Content-Type", b"application/json")], body))
        if r.template == "/v1/payment_intents":
            out.append(Case(f"POST {r.template}: no Idempotency-Key", "POST", path,
                            self.auth(r) + [("Content-Type", b"application/json")], body))
        # a request id the middleware must not echo back as is
        bad_rid = b"\x01" + b"r" * 100
        out.append(self.case("X-Request-Id with control chars and too long", r,
                             headers=[("X-Request-Id", bad_rid)] + [("Authorization", b"Bearer x")],
                             body=body if r.method == "POST" else None))
        return out

    def body_cases(self, r: Route) -> list[Case]:
        t = r.template
        valid = json.dumps(self.valid[t]).encode() if t in self.valid else None
        out = []
        if t == ENVELOPE:
            return self.envelope_cases(r)
        bodies = malformed_bodies(t, valid)
        if t in self.valid:
            bodies += field_mutations(t, self.valid[t])
        if t == WEBHOOK:
            bodies += self.webhook_bodies()
            deep_ev = json.dumps({"id": "evt_deep", "type": "payment_intent.succeeded",
                                  "created": int(time.time()), "data": {"object": {"x": "@@"}}})
            bodies.append(("webhook object nested 100000 deep",
                           deep_ev.encode().replace(b'"@@"', deep(100_000))))
        for what, body in bodies:
            out.append(self.case(f"body {what}", r, body=body))
        # sizes and encodings
        over = b'{"x": "' + b"A" * (MAX_BODY + 10) + b'"}'
        out.append(self.case("body over the limit", r, body=over))
        out.append(self.case("body over the limit, chunked", r, body=over, chunked=True))
        bomb = gzip.compress(b" " * (200 << 20), 9)
        hdrs = self.auth(r) + self.extra(r) + [("Content-Encoding", b"gzip"),
                                               ("Content-Type", b"application/json")]
        out.append(Case(f"POST {t}: gzip bomb", "POST", self.fill(r, real=False),
                        hdrs + self.signed(r, bomb), bomb))
        for enc, data in (("gzip", b"{}"), ("deflate", b"not deflate"), ("br", b"\x00\x01"),
                          ("zstd", b"{}"), ("gzip, gzip", gzip.compress(b"{}"))):
            h = self.auth(r) + self.extra(r) + [("Content-Encoding", enc.encode()),
                                                ("Content-Type", b"application/json")]
            out.append(Case(f"POST {t}: Content-Encoding {enc}", "POST", self.fill(r, real=False),
                            h + self.signed(r, data), data))
        return out

    def webhook_bodies(self) -> list[tuple[str, bytes]]:
        now = int(time.time())
        ev = {"id": f"evt_{uuid.uuid4().hex}", "type": "payment_intent.succeeded", "created": now,
              "data": {"object": {"id": "pi_x"}}}
        bad = {"id": [1, "", "a b", "A" * 300, "evt\x00", "evt.*", None, "evt_é"],
               "type": [1, "", "A.B", "a b", "a.*", "a.>", "x." * 40, None, "a" * 65],
               "created": [-1, "1", 1.5, 1 << 41, None, []], "data": [[], 1, None, {"object": []}]}
        out = [("webhook: not an event", json.dumps({"object": "event"}).encode())]
        for key, values in bad.items():
            for v in values:
                out.append((f"webhook {key}={str(v)[:15]!r}", json.dumps({**ev, key: v}).encode()))
            out.append((f"webhook without {key}",
                        json.dumps({k: v for k, v in ev.items() if k != key}).encode()))
        return out

    def envelope_cases(self, r: Route) -> list[Case]:
        path = self.fill(r, real=False)
        auth = self.auth(r)
        big_event = b'{}\n{"type":"event"}\n{"message":"' + b"A" * (1 << 20) + b'"}\n'
        bodies = [("empty", b""), ("header not JSON", b"{\n"), ("header an array", b"[]\n"),
                  ("header deep", deep(1000) + b"\n"), ("header deep 100000", deep(100_000)),
                  ("header invalid utf-8", b'{"\xff":1}\n'),
                  ("item header not JSON", b'{}\n{bad\n{}\n'),
                  ("item header an array", b'{}\n[1]\n{}\n'),
                  ("item without type", b'{}\n{"length":2}\n{}\n'),
                  ("item type a number", b'{}\n{"type":1}\n{}\n'),
                  ("length negative", b'{}\n{"type":"event","length":-1}\n{}\n'),
                  ("length past the end", b'{}\n{"type":"event","length":99999}\n{}\n'),
                  ("length a string", b'{}\n{"type":"event","length":"2"}\n{}\n'),
                  ("length true", b'{}\n{"type":"event","length":true}\n{}\n'),
                  ("event not JSON", b'{}\n{"type":"event"}\n{not json\n'),
                  ("event an array", b'{}\n{"type":"event"}\n[1,2]\n'),
                  ("event deep array", b'{}\n{"type":"event"}\n' + deep(100_000) + b"\n"),
                  ("event invalid utf-8", b'{}\n{"type":"event"}\n{"message":"\xff"}\n'),
                  ("event over 1 MiB", big_event)]
        out = [Case(f"POST {r.template}: envelope {w}", "POST", path, auth, b) for w, b in bodies]
        over = b"{}\n" + b"\n" * (21 << 20)
        out.append(Case(f"POST {r.template}: envelope over 20 MiB", "POST", path, auth, over))
        out.append(Case(f"POST {r.template}: envelope over 20 MiB, chunked", "POST", path, auth,
                        over, chunked=True))
        bomb = gzip.compress(b"{}\n" + b" " * (300 << 20), 9)
        out.append(Case(f"POST {r.template}: gzip bomb", "POST", path,
                        auth + [("Content-Encoding", b"gzip")], bomb))
        for enc, data in (("gzip", b"{}\n"), ("deflate", b"xx"), ("br", b"\x00\x01\x02"),
                          ("gzip", gzip.compress(b"{}\n")[:10])):
            out.append(Case(f"POST {r.template}: Content-Encoding {enc} {data[:6]!r}", "POST",
                            path, auth + [("Content-Encoding", enc.encode())], data))
        return out

    def query_cases(self, r: Route) -> list[Case]:
        if r.method != "GET" or r.template not in QUERY:
            return []
        out = []
        path = self.fill(r, real=False)
        params = QUERY[r.template]
        for name, values in params.items():
            for v in values:
                out.append(self.case(f"query {name}={v[:20]!r}", r, path=f"{path}?{name}={v}"))
        out.append(self.case("query unknown parameter", r, path=f"{path}?zzz=1"))
        out.append(self.case("query repeated", r,
                             path=f"{path}?{next(iter(params))}=1&{next(iter(params))}=-1"))
        out.append(self.case("query 5000 parameters", r,
                             path=path + "?" + "&".join(f"p{i}=1" for i in range(5000))))
        return out


def check(case: Case, resp: RawResponse) -> str | None:
    """None when ``resp`` is a proper rejection of ``case``; else what is wrong with it."""
    if not 400 <= resp.status < 500:
        return f"status {resp.status}: {resp.body[:300]!r}"
    if case.parser:  # aiohttp's own plain-text 400, before the app: no problem+json possible
        return None if resp.status == 400 else f"parser answered {resp.status}"
    problem = resp.problem()
    if problem is None:
        return f"not problem+json ({resp.headers.get('content-type')}): {resp.body[:200]!r}"
    code = problem.get("code")
    if not isinstance(code, str) or not CODE.match(code) or problem.get("status") != resp.status:
        return f"no stable code: {problem}"
    rid = resp.headers.get("x-request-id", "")
    if not (rid.isascii() and rid.isprintable() and len(rid) <= 64):
        return f"request id echoed unsafely: {rid!r}"
    return None


@pytest.mark.timeout(180)
async def test_hostile_requests_get_4xx_and_change_nothing(
        start_service, localstripe, nats_url: str, db: asyncpg.Pool) -> None:
    stripe_env = {"STRIPE_API_BASE": localstripe.url}
    procs: dict[str, ServiceProcess] = {}
    for name in SERVICES:
        procs[name] = start_service(name, **(stripe_env if name in ("payment", "webhook") else {}))
    ingress = procs["ingress"]
    async with aiohttp.ClientSession() as session:
        api = Api(session, ingress.url)
        event_id = await api.create_event(capacity=50)
        r = await api.hold(event_id, 2)
        assert r.status == 201, r.body
        hold_id = r.json["id"]

    async def settled() -> bool:
        return await db.fetchval("SELECT count(*) FROM outbox") == 0

    await eventually(settled, what="the outbox relayed the hold")
    hostile_from = await db.fetchval("SELECT clock_timestamp()")  # (the set-up's actions: 2xx)
    before_db = await db_snapshot(db)
    before_streams = await stream_snapshot(nats_url)
    assert before_streams["RESERVATIONS"][0] == 1, before_streams
    log_sizes = {n: p.log.stat().st_size for n, p in procs.items()}

    routes = ingress_routes()
    templates = {r.template for r in routes}
    assert not set(QUERY) - templates, "QUERY names a route ingress does not have"
    assert {"/v1/reservations", WEBHOOK, ENVELOPE, "/v1/admin/events"} <= templates
    cases = Hostile(routes, event_id, hold_id).all()
    assert len(cases) > 500

    limit = asyncio.Semaphore(8)

    async def run(case: Case) -> tuple[Case, RawResponse | BaseException]:
        async with limit:
            try:
                return case, await send(ingress.port, case)
            except (TimeoutError, OSError, ValueError, IndexError) as exc:
                return case, exc

    started = time.monotonic()
    results = await asyncio.gather(*(run(c) for c in cases))
    elapsed = time.monotonic() - started
    failures = []
    for case, resp in results:
        problem = (f"no answer: {resp!r}" if isinstance(resp, BaseException)
                   else check(case, resp))
        if problem:
            failures.append(f"{case.what} -> {problem}")
    seen = Counter((r.status, (r.problem() or {}).get("code")) for _, r in results
                   if isinstance(r, RawResponse))
    print(f"{len(cases)} hostile requests in {elapsed:.1f}s:", dict(seen.most_common()))
    assert not failures, f"{len(failures)} of {len(cases)} answers wrong:\n" + "\n".join(failures[:200])

    # nothing changed. Error reports are published at once (the first of a burst is not folded),
    # so a second of quiet after the last answer is enough for one to have reached the stream.
    await asyncio.sleep(1.0)
    # nothing changed but the operators' action log: an operate route records every attempt,
    # refused ones included (with their status), before anything is done
    after_db, after_streams = await db_snapshot(db), await stream_snapshot(nats_url)
    assert {t: v for t, v in after_db.items() if t != "admin_actions"} == {
        t: v for t, v in before_db.items() if t != "admin_actions"}
    assert {s: v for s, v in after_streams.items() if s != "AUDIT"} == {
        s: v for s, v in before_streams.items() if s != "AUDIT"}
    assert await db.fetchval("SELECT count(*) FROM admin_actions WHERE status < 400 AND at >= $1",
                             hostile_from) == 0
    for name, proc in procs.items():
        assert proc.running, f"{name} died:\n{proc.logs()[-3000:]}"
        assert http_ready(f"{proc.url}/readyz"), f"{name} is not ready"
        with open(proc.log, "rb") as f:
            f.seek(log_sizes[name])
            new = f.read().decode(errors="replace").splitlines()
        errors_logged = [line for line in new
                         if '"level":"error"' in line or '"level":"critical"' in line
                         or ("Traceback" in line and '"level"' not in line)]
        assert not errors_logged, f"{name} logged errors:\n" + "\n".join(errors_logged[:10])
    # a bound against a request that costs ingress far more than it should. The requests take
    # about 5 s on this machine; they took 60-100 s while an envelope of 20 MiB of blank lines
    # cost 8 s of ingress's CPU (read line by line), and under load others timed out behind it
    assert elapsed < 60, f"{len(cases)} hostile requests took {elapsed:.1f}s"

    # Free text of an error report may hold anything, NUL included (PostgreSQL text cannot):
    # it is accepted, stored with the NUL replaced, and the sink carries on.
    report = {**valid_bodies(event_id, hold_id)["/v1/errors"], "id": str(uuid.uuid4()),
              "message": "bad\x00byte \u202eevil", "context": {"k\x00": ["v\x00"]}}
    async with aiohttp.ClientSession() as session:
        r = await Api(session, ingress.url).call("POST", "/v1/errors",
                                                 raw=json.dumps(report).encode())
    assert r.status == 202, r.body

    async def stored() -> str | None:
        return await db.fetchval("SELECT error_message FROM error_logs WHERE id = $1",
                                 uuid.UUID(report["id"]))

    message = await eventually(stored, what="the report with a NUL stored")
    assert "\x00" not in message and message.startswith("bad")
    assert procs["error_sink"].running and http_ready(f"{procs['error_sink'].url}/readyz")
