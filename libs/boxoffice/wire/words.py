"""A validation error of a wire type said in words for the person who sent the request:
"reservation_id must be a UUID", not the regular expression it failed."""

from __future__ import annotations

import re

import msgspec

from boxoffice.wire import reservations, stripe

# what each pattern of the wire types asks for (msgspec names the pattern it failed)
_PATTERNS: dict[str, str] = {}


def _meta_pattern(annotated: object) -> str | None:
    for meta in getattr(annotated, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.pattern:
            return meta.pattern
    return None


for _type, _words in ((reservations.Uuid, "a UUID"),
                      (reservations.CustomerRef, "text without control characters"),
                      (stripe.EventId, "a Stripe event id (letters, digits, _ and -)"),
                      (stripe.EventType, "a Stripe event type such as payment_intent.succeeded")):
    if (_p := _meta_pattern(_type)) is not None:
        _PATTERNS[_p] = _words
_PATTERNS.update({
    reservations.TEXT: "text without control characters",
    r"^[a-zA-Z]{3}\Z": "a three-letter currency code such as eur",
    r"^[A-Za-z0-9_-]+\Z": "made of letters, digits, _ and -",
    r"^[\x20-\x7e]{1,255}\Z": "1 to 255 printable ASCII characters",
    r"^[0-9a-f]{32}\Z": "32 lowercase hexadecimal digits",
})
_UUIDISH = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?"  # the dashes-optional UUIDs of error reports
_TYPES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
          "object": "an object", "array": "an array", "null": "null"}
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
del _type, _words, _p


def _field(path: str) -> str:
    return path.lstrip(".") or "the body"


def describe(exc: msgspec.ValidationError) -> str:
    """``exc`` in words: what is wrong with which field."""
    text = str(exc)
    m = _AT.search(text)
    where = _field(m.group("path")) if m else "the body"
    what = text[:m.start()] if m else text
    if found := re.fullmatch(r"Object missing required field `(.+)`", what):
        name = found.group(1) if where == "the body" else f"{where}.{found.group(1)}"
        return f"{name} is required"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", what):
        name = found.group(1) if where == "the body" else f"{where}.{found.group(1)}"
        return f"{name} is not a field of this request"
    if found := re.fullmatch(r"Expected `str` matching regex '(.+)'", what):
        pattern = found.group(1).encode().decode("unicode_escape")
        words = _PATTERNS.get(pattern) or ("a UUID" if pattern.startswith(_UUIDISH) else None)
        return f"{where} must be {words}" if words else f"{where} is not in the expected format"
    if found := re.fullmatch(r"Expected `(\w+)` (>=|<=|>|<) (\S+)", what):
        word = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}
        return f"{where} must be {word[found.group(2)]} {found.group(3)}"
    if found := re.fullmatch(r"Expected `(\w+)` of length (>=|<=) (\d+)", what):
        n = int(found.group(3))
        if found.group(2) == ">=":
            return f"{where} must not be empty" if n == 1 else f"{where} needs {n} or more items"
        return f"{where} may hold at most {n} {'characters' if found.group(1) == 'str' else 'items'}"
    if found := re.fullmatch(r"Expected `([\w |]+)`, got `(\w+)`", what):
        wanted = " or ".join(_TYPES.get(t.strip(), t.strip()) for t in found.group(1).split("|"))
        return f"{where} must be {wanted}, not {_TYPES.get(found.group(2), found.group(2))}"
    if re.fullmatch(r"Invalid enum value .*", what):
        return f"{where} is not one of the allowed values"
    if what.startswith("Invalid RFC3339"):
        return f"{where} must be a date and time (RFC 3339, e.g. 2026-12-01T18:00:00Z)"
    return f"{where}: {what}" if m else what
