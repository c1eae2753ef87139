"""Idempotency keys, shared by ingress (validation, fingerprint) and the payment service.

Semantics follow Stripe and the IETF draft ``draft-ietf-httpapi-idempotency-key-header``:

- the ``Idempotency-Key`` header is 1 to 255 printable ASCII characters;
- keys are scoped to the client (its token), so two clients never collide;
- the same key with the same request replays the stored status and body byte for byte;
- the same key with another request is ``idempotency_key_mismatch`` (422);
- while the first request with a key is still running, ``idempotency_key_in_use`` (409 with
  ``Retry-After``);
- a request rejected by validation is not stored.

The request fingerprint is a SHA-256 over the route and the request re-encoded canonically after
validation, so whitespace or key order in the client's JSON do not make a mismatch.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from boxoffice import errors

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_LENGTH = 255
_VALID = re.compile(r"[\x20-\x7e]{1,255}")

IdempotencyKeyMissing = errors.define("IdempotencyKeyMissing", "idempotency_key_missing", 400,
                                      "Idempotency-Key header is required")
IdempotencyKeyInvalid = errors.define("IdempotencyKeyInvalid", "idempotency_key_invalid", 400,
                                      "Idempotency-Key header is invalid")
IdempotencyKeyMismatch = errors.define("IdempotencyKeyMismatch", "idempotency_key_mismatch", 422,
                                       "Idempotency-Key was used with another request")
IdempotencyKeyInUse = errors.define("IdempotencyKeyInUse", "idempotency_key_in_use", 409,
                                    "A request with this Idempotency-Key is still in progress")

_canonical = msgspec.json.Encoder(order="sorted")


def check_key(value: str | None, *, required: bool) -> str | None:
    """Validate an ``Idempotency-Key`` header value; ``None`` when absent and optional."""
    if value is None:
        if required:
            raise IdempotencyKeyMissing(f"send an {HEADER} header (a unique value per operation, "
                                        f"at most {MAX_LENGTH} characters)")
        return None
    if not _VALID.fullmatch(value):
        raise IdempotencyKeyInvalid(f"{HEADER} must be 1 to {MAX_LENGTH} printable ASCII "
                                    "characters")
    return value


def fingerprint(route: str, request: Any) -> str:
    """A stable digest of what a request asks for (route plus canonical JSON of its body)."""
    digest = hashlib.sha256(route.encode())
    digest.update(b"\n")
    digest.update(_canonical.encode(request))
    return digest.hexdigest()


def stripe_key(client_id: str, key: str, fingerprint: str) -> str:
    """The Idempotency-Key passed on to Stripe, derived from the client's key, its scope and the
    request's fingerprint: every retry of one request (after a crash too) sends Stripe the same
    key, and a key reused for another request once ours has expired never meets the old one."""
    return "bxpi_" + hashlib.sha256(f"{client_id}\x00{key}\x00{fingerprint}".encode()).hexdigest()
