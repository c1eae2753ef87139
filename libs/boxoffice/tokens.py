"""Secrets compared in constant time: bearer tokens, ingest keys, signatures."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TypeVar

S = TypeVar("S", str, bytes)


def match(given: S, allowed: Iterable[S]) -> S | None:
    """The entry of ``allowed`` equal to ``given``, or None. Every entry is compared, each in
    constant time and without an early exit, so the time taken says nothing about which matched
    or how much of one did."""
    given_bytes = given.encode() if isinstance(given, str) else given
    found = None
    for candidate in allowed:
        if hmac.compare_digest(given_bytes,
                               candidate.encode() if isinstance(candidate, str) else candidate):
            found = candidate
    return found
