"""boxoffice.tokens: the one constant-time comparison of secrets (bearer tokens, ingest keys,
signatures)."""

from __future__ import annotations

from boxoffice import tokens


def test_match_names_the_entry_that_matched() -> None:
    assert tokens.match("b-token", ("a-token", "b-token", "c-token")) == "b-token"
    assert tokens.match(b"sig2", [b"sig1", b"sig2"]) == b"sig2"


def test_no_match_and_prefixes_are_none() -> None:
    assert tokens.match("b-tok", ("a-token", "b-token")) is None
    assert tokens.match("b-token-and-more", ("b-token",)) is None
    assert tokens.match("", ("a-token",)) is None
    assert tokens.match("a-token", ()) is None
