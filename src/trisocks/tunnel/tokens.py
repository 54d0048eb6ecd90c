"""The server's tokens, looked up by SHA-256 so that both auth forms are one dictionary probe.

LinkSocks clients authenticate either with an Auth message carrying the
token, or with ``?token=<sha256 hex>`` in the WebSocket URL. Keying the table
by the digest serves both, and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

FORWARD = "forward"
REVERSE = "reverse"
CONNECTOR = "connector"
RESERVED = "anonymous"  # what LinkSocks clients send when started without a token
# Node-to-node bridge tokens start with this (see nodes.py); "~" is outside the url-safe
# alphabet of generated tokens and keys, and no configured token may start so.
BRIDGE_PREFIX = "~node~"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate(nbytes: int = 16) -> str:
    """A fresh random token or key: ``nbytes`` random bytes as url-safe text (16 bytes: 22
    characters, 128 bits). Never with a leading "-", which a command line such as
    ``trisocks client -t TOKEN`` would read as a flag."""
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value


def redact(token: str) -> str:
    """What logs may show of a token: never the whole of it."""
    if len(token) < 10:
        return f"***({len(token)} chars)"
    return f"{token[:4]}...({len(token)} chars)"


@dataclass
class TokenInfo:
    token: str
    kind: str
    # reverse tokens
    port: int | None = None
    username: str = ""
    password: str = ""
    allow_manage_connector: bool = False
    # connector tokens: the reverse token they reach, and in autonomy mode the
    # instance id of the provider that created them (only it serves them)
    reverse_token: str = ""
    owner: bytes = b""
    # the management plane's user behind this token (its key authenticates the tunnel),
    # whose traffic is metered and limited; None for plain tokens
    account: object = None


def refused_name(token: str, what: str = "token") -> str | None:
    """Why ``token`` cannot be a token (or a user's key, ``what="key"``); None: it can."""
    if token == RESERVED:
        return f"'{RESERVED}' is reserved and cannot be used as a {what}"
    if not token or len(token.encode()) > 255:
        return f"a {what} must be 1 to 255 bytes long"
    if token.startswith(BRIDGE_PREFIX):
        return f"{what}s starting with {BRIDGE_PREFIX!r} are reserved for node bridges"
    return None


class TokenTable:
    def __init__(self) -> None:
        self._by_digest: dict[str, TokenInfo] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def __iter__(self):
        return iter(list(self._by_digest.values()))

    def add(self, info: TokenInfo) -> TokenInfo:
        reason = refused_name(info.token)
        if reason is not None:
            raise ValueError(reason)
        key = digest(info.token)
        existing = self._by_digest.get(key)
        if existing is not None and existing.kind != info.kind:
            raise ValueError(f"token already exists as a {existing.kind} token")
        self._by_digest[key] = info
        return info

    def add_forward(self, token: str) -> TokenInfo:
        return self.add(TokenInfo(token, FORWARD))

    def remove(self, token: str) -> TokenInfo | None:
        return self._by_digest.pop(digest(token), None)

    def get(self, token: str) -> TokenInfo | None:
        info = self._by_digest.get(digest(token))
        if info is not None and hmac.compare_digest(info.token.encode(), token.encode()):
            return info
        return None

    def get_by_digest(self, hexdigest: str) -> TokenInfo | None:
        return self._by_digest.get(hexdigest.lower())

    def of_kind(self, kind: str) -> list[TokenInfo]:
        return [t for t in self._by_digest.values() if t.kind == kind]

    def connectors_of(self, reverse_token: str) -> list[TokenInfo]:
        return [t for t in self._by_digest.values()
                if t.kind == CONNECTOR and t.reverse_token == reverse_token]
