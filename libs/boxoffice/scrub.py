"""Scrubbing of secrets and personal data from error reports, and truncation of big fields.

Used by the error-sink before anything is stored, and by the reporter's sentry-sdk hook before
anything leaves the process. What becomes ``[Filtered]``:

- any value under a key that names a secret (password, secret, token, api_key, authorization,
  cookie, session, credentials, private key, signature, card number, cvc, ...), whatever its type;
- in any string: card numbers (13-19 digits, spaces or dashes allowed, Luhn-valid), bearer and
  basic credentials, ``key=value`` / ``"key": "value"`` pairs whose key names a secret, Stripe
  secret keys and webhook secrets, and the password of a URL (``scheme://user:pw@host``).

Oversized strings are cut and end with a marker saying how much was dropped.

A publisher that scrubs a whole report with ``report`` (ingress does, for what clients send)
publishes it under ``errors.<service>.<level>.<SEAL>``, and the error-sink then stores it
without scrubbing it again: the work is done where it can be spread over replicas, not twice
in the sink. Only ingress's NATS user may publish such subjects (``boxoffice.bus_access``);
``SEAL`` is the digest of this file, so a report scrubbed by other rules (a deploy under way) is
scrubbed again.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import msgspec

from boxoffice import wire
from boxoffice.wire.errors import ErrorReport
from boxoffice.wire.subjects import error_report

FILTERED = "[Filtered]"
SEAL = "scrubbed-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

# Normalised key (lowercase, without "-", "_", " ") containing one of these is a secret.
_SECRET_PARTS = ("password", "passwd", "secret", "token", "apikey", "accesskey", "authorization",
                 "authentication", "credential", "privatekey", "cookie", "session", "bearer",
                 "signature", "cardnumber", "creditcard", "cvc", "cvv", "iban", "ssn")
_SECRET_KEYS = frozenset({"auth", "pwd", "pass", "pin", "dsn", "databaseurl"})

# Patterns run on the lowercased text (case-sensitive regexes are much faster than (?i) ones);
# group "v" is the part replaced by [Filtered]. Each runs only when its literal hint is present.
# Every unbounded run in a pattern ends where the next match could not start again: a search
# retries from each position, and a run that may cross the next keyword is scanned again from
# there (20 KiB of "password" repeated took 0.6 s, 256 KiB 133 s: the key's suffix was
# [\w-]*). Hence a key's suffix of at most 64 characters, and a URL's scheme of at most 32.
_KV = re.compile(r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth|"
                 r"credentials?|private[_-]?key|cookie|session)[\w-]{0,64}[\"']?\s*[:=]\s*[\"']?"
                 r"(?!\[filtered\]|bearer\s|basic\s)(?P<v>[^\s\"'&,;}\]]+)")
_KV_HINTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "cookie", "session")
_BEARER = re.compile(r"\b(?:bearer|basic)\s+(?P<v>[a-z0-9\-._~+/]{6,}=*)")
_STRIPE = re.compile(r"(?P<v>\b(?:sk|rk)_(?:live|test)_[a-z0-9_]{6,}|\bwhsec_[a-z0-9_]{6,})")
_URL_PW = re.compile(r"\b[a-z][a-z0-9+.-]{0,31}://[^\s:/@]+:(?P<v>[^\s@/]+)@")
_CARD = re.compile(r"(?<![\d.])\d(?:[ -]?\d){12,18}(?![\d.])")
# A card number is a run of 13 or more digits, spaces and dashes: with those bytes mapped to
# "0" and every other to "x", a substring search (in C) rules one out.
_CARD_CHARS = bytes(48 if b in b"0123456789 -" else 120 for b in range(256))
_CARD_RUN = b"0" * 13
_HINT = re.compile(r"bearer|basic|pass|pwd|secret|token|key|auth|credential|cookie|session|"
                   r"k_live_|k_test_|whsec_|://")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@functools.lru_cache(maxsize=4096)
def secret_key(key: str) -> bool:
    """Does this key (of a dict, a header, a form field) name a secret?"""
    k = key.lower().replace("-", "").replace("_", "").replace(" ", "")
    return k in _SECRET_KEYS or any(part in k for part in _SECRET_PARTS)


def _spans(low: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    if len(low) < 5:
        return spans
    if len(low) >= 13 and _may_hold_card(low):
        for m in _CARD.finditer(low):
            if _is_card(m.group(0)):
                spans.append(m.span())
            elif (within := _card_within(m.group(0))) is not None:
                spans.append((m.start() + within[0], m.start() + within[1]))
    if not _HINT.search(low):  # one scan decides for most strings
        return spans
    if "bearer" in low or "basic" in low:
        spans += [m.span("v") for m in _BEARER.finditer(low)]
    if any(h in low for h in _KV_HINTS):
        spans += [m.span("v") for m in _KV.finditer(low)]
    if "k_live_" in low or "k_test_" in low or "whsec_" in low:
        spans += [m.span("v") for m in _STRIPE.finditer(low)]
    if "://" in low and "@" in low:
        spans += [m.span("v") for m in _URL_PW.finditer(low)]
    return spans


def _may_hold_card(low: str) -> bool:
    """False when ``low`` has no run of 13 digits, spaces and dashes, which most strings lack
    (the check is several times cheaper than running ``_CARD``); a non-ASCII string may hold
    other Unicode digits, so it is always searched."""
    return not low.isascii() or _CARD_RUN in low.encode().translate(_CARD_CHARS)


def _is_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


_GROUP = re.compile(r"\d+")


def _card_within(run: str) -> tuple[int, int] | None:
    """A card beside another group of digits ("4242 4242 4242 4242 1", "1 4242 4242 4242 4242"):
    the run ``_CARD`` found fails the Luhn check as a whole, so its whole groups (between spaces
    and dashes) are tried, when it has at most six. A run holds at most 19 digits, so at most
    one card of 13 or more."""
    groups = [g.span() for g in _GROUP.finditer(run)]
    if not 2 <= len(groups) <= 6:
        return None
    last = len(groups) - 1
    for i in range(last + 1):
        for j in range(last, i - 1, -1):
            if (i, j) != (0, last) and _is_card(run[groups[i][0]:groups[j][1]]):
                return groups[i][0], groups[j][1]
    return None


def _scrub_text(text: str) -> str:
    """Scrubbed until a pass changes nothing: a replacement can bare what its neighbour hid (a
    card after "password=1 ", a Stripe key after a card: "[Filtered]sk_live_..." has the word
    boundary that "...4242sk_live_..." lacked), so that scrubbing twice gives what scrubbing
    once does; a publisher's scrub is then the sink's (``SEAL``)."""
    for _ in range(8):  # (a pass that changes something is rare; two are the most seen)
        out = _scrub_once(text)
        if out is text:
            break
        text = out
    return text


def _scrub_once(text: str) -> str:
    low = text.lower()
    if len(low) != len(text):  # a few non-ASCII characters change length when lowercased
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    spans = _spans(low)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if start < pos:  # overlaps a span already filtered
            continue
        out += (text[pos:start], FILTERED)
        pos = end
    out.append(text[pos:])
    return "".join(out)


_cached = functools.lru_cache(maxsize=2048)(_scrub_text)


def text(value: str) -> str:
    """Scrub one string (stacktraces and messages repeat: small ones are cached). NUL, which
    PostgreSQL's text and jsonb cannot hold, becomes U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    n = len(value)
    if n < 5:
        return value
    if 256 <= n <= 16384:  # short strings are cheaper to scrub than to look up
        return _cached(value)
    # Most strings hold neither a keyword nor 13 digits: decided here, without the calls and
    # lists of a scrub (for ASCII text; other text may lowercase to a keyword or hold other
    # digits, and is scrubbed in full).
    if (value.isascii() and not _HINT.search(value.lower())
            and (n < 13 or _CARD_RUN not in value.encode().translate(_CARD_CHARS))):
        return value
    return _scrub_text(value)


def value(obj: Any, *, depth: int = 0) -> Any:
    """Scrub a JSON-like value: dict keys naming secrets, and every string inside."""
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, dict):
        if depth > 12:
            return FILTERED
        return {k: (FILTERED if isinstance(k, str) and secret_key(k) and v not in (None, "")
                    else value(v, depth=depth + 1)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if depth > 12:
            return FILTERED
        return [value(v, depth=depth + 1) for v in obj]
    return obj


def clean(obj: Any, max_string: int = 4096, max_items: int = 100, depth: int = 0) -> Any:
    """Scrub (as ``value``) and bound in one walk: strings cut, lists and dicts cut, deep
    nesting replaced, every cut marked."""
    if isinstance(obj, str):
        return truncate(text(obj), max_string)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if depth > 8 and isinstance(obj, (dict, list, tuple)):
        return "[truncated: nested too deep]"
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(obj.items()):
            if i >= max_items:
                out["_truncated"] = f"{len(obj) - max_items} more keys"
                break
            if not isinstance(k, str):
                k = str(k)
            elif len(k) > 256 or "\x00" in k:
                k = truncate(k, 256).replace("\x00", "\ufffd")
            # strings and scalars inline: most values are, and a call each is half the walk
            if v not in (None, "") and secret_key(k):
                out[k] = FILTERED
            elif isinstance(v, str):
                out[k] = truncate(text(v), max_string)
            elif v is None or isinstance(v, (bool, int, float)):
                out[k] = v
            else:
                out[k] = clean(v, max_string, max_items, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        items = [clean(v, max_string, max_items, depth + 1) for v in obj[:max_items]]
        if len(obj) > max_items:
            items.append(f"[truncated: {len(obj) - max_items} more items]")
        return items
    return truncate(repr(obj), max_string)


def truncate(s: str, limit: int) -> str:
    """``s`` cut to at most ``limit`` characters, ending with a marker when it was cut."""
    if len(s) <= limit:
        return s
    marker = f"...[truncated {len(s) - limit} chars]"
    keep = max(0, limit - len(marker))
    return s[:keep] + marker[: limit - keep] if limit > len(marker) else s[:limit]


def report(r: ErrorReport) -> ErrorReport:
    """``r`` scrubbed as the error-sink scrubs a report that is not sealed: every string, and the
    context scrubbed and bounded by ``clean`` with the sink's bounds."""
    def opt(v: str | None) -> str | None:
        return text(v) if v else v

    return msgspec.structs.replace(
        r, message=text(r.message), error_type=opt(r.error_type), stacktrace=opt(r.stacktrace),
        context=clean(r.context) if r.context else r.context,
        fingerprint=[text(f) for f in r.fingerprint] if r.fingerprint else r.fingerprint,
        environment=opt(r.environment), release=opt(r.release), request_id=opt(r.request_id))


def sealed(r: ErrorReport) -> tuple[str, bytes]:
    """The sealed subject and the body of ``r`` scrubbed (``report``), to publish."""
    return error_report(r.service, r.level, SEAL), wire.encode(report(r))
