"""trisocks.tunnel.tokens: the token table and what logs may show of a token."""

from __future__ import annotations

import hashlib

import pytest

from trisocks.tunnel.tokens import (
    CONNECTOR,
    FORWARD,
    RESERVED,
    REVERSE,
    TokenInfo,
    TokenTable,
    digest,
    generate,
    redact,
)


def test_lookup_by_token_and_by_sha256_digest():
    table = TokenTable()
    info = table.add_forward("s3cret-token")
    assert table.get("s3cret-token") is info
    hexd = hashlib.sha256(b"s3cret-token").hexdigest()
    assert digest("s3cret-token") == hexd
    assert table.get_by_digest(hexd) is info
    assert table.get_by_digest(hexd.upper()) is info
    assert table.get("s3cret-tokeN") is None
    assert table.get_by_digest(digest("other")) is None


def test_add_refuses_reserved_empty_and_too_long_tokens():
    table = TokenTable()
    for bad in (RESERVED, "", "x" * 256, "é" * 128):
        with pytest.raises(ValueError):
            table.add_forward(bad)
    table.add_forward("x" * 255)
    assert len(table) == 1


def test_a_token_cannot_change_kind_but_can_be_replaced_in_kind():
    table = TokenTable()
    table.add(TokenInfo("tok", REVERSE, port=1080))
    with pytest.raises(ValueError, match="reverse"):
        table.add_forward("tok")
    table.add(TokenInfo("tok", REVERSE, port=1081))
    assert table.get("tok").port == 1081


def test_remove():
    table = TokenTable()
    table.add_forward("a-token")
    assert table.remove("a-token").token == "a-token"
    assert table.remove("a-token") is None
    assert table.get("a-token") is None
    assert len(table) == 0


def test_of_kind_and_connectors_of():
    table = TokenTable()
    table.add_forward("fwd")
    table.add(TokenInfo("rev1", REVERSE))
    table.add(TokenInfo("rev2", REVERSE))
    table.add(TokenInfo("c1", CONNECTOR, reverse_token="rev1"))
    table.add(TokenInfo("c2", CONNECTOR, reverse_token="rev1"))
    table.add(TokenInfo("c3", CONNECTOR, reverse_token="rev2"))
    assert {t.token for t in table.of_kind(REVERSE)} == {"rev1", "rev2"}
    assert {t.token for t in table.of_kind(FORWARD)} == {"fwd"}
    assert {t.token for t in table.connectors_of("rev1")} == {"c1", "c2"}
    assert [t.token for t in table.connectors_of("rev2")] == ["c3"]
    assert table.connectors_of("fwd") == []
    assert {t.token for t in table} == {"fwd", "rev1", "rev2", "c1", "c2", "c3"}


def test_redact_never_shows_the_whole_token():
    assert redact("abcdefghijklmnop") == "abcd...(16 chars)"
    assert redact("short") == "***(5 chars)"
    for token in ("q7", "abcdefghi", "abcdefghij", "x" * 100):
        assert token not in redact(token)


def test_generate_gives_distinct_tokens_that_are_not_flags():
    values = {generate() for _ in range(200)}
    assert len(values) == 200
    assert not any(v.startswith("-") for v in values)
    assert all(len(v) == 22 for v in values)
