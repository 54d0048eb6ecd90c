"""The server's settings, and its TLS context: what every part of the server reads.

Kept apart from :mod:`trisocks.tunnel.server` so that the front door, authentication and
reverse modules can name the settings without importing the server that wires them.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from ..net.session import DEFAULT_WINDOW
from .egress import direct_dialer

PREAUTH_TIMEOUT = 30.0  # TLS handshake + request head + Auth, all together
MAX_UNAUTHENTICATED = 1024  # connections not yet authenticated, in all
MAX_UNAUTHENTICATED_PER_SOURCE = 64  # ... per source address (IPv6: per /64)
MAX_SESSIONS_PER_TOKEN = 64  # concurrent sessions (clients, providers, connectors) of one token


@dataclass
class ServerConfig:
    ws_host: str = "0.0.0.0"
    ws_port: int = 8765
    connect_timeout: float = 10.0  # dialing a target (forward mode)
    auth_timeout: float = 15.0
    max_message: int = 32 << 20
    window: int = DEFAULT_WINDOW  # flow-control credit granted to trisocks peers (0: off)
    ping_interval: float = 30.0
    provider_ping_interval: float = 10.0  # providers are pinged more often: liveness for load balancing
    idle_timeout: float = 90.0
    # reverse mode
    socks_host: str = "127.0.0.1"
    socks_nowait: bool = False  # open a reverse token's SOCKS5 port before any provider is there
    provider_wait: float = 10.0  # a SOCKS5 request waits this long for a provider
    provider_answer: float = 20.0  # ...and this long for the provider's ConnectResponse
    fast_open: bool = False
    dialer: object = field(default=direct_dialer)
    tls_cert: str = ""  # PEM certificate chain; with tls_key the server speaks wss:// itself
    tls_key: str = ""
    preauth_timeout: float = PREAUTH_TIMEOUT
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE
    max_sessions_per_token: int = MAX_SESSIONS_PER_TOKEN
    # reverse proxies (CIDRs) whose X-Forwarded-For names the client
    trusted_proxies: tuple[str, ...] = ()
    # the server's destination rules (--allow/--deny: a trisocks.policy.rules.RuleSet, or None)
    rules: object = None
    # scale-out (docs/scale-out.md): a listener of this node's own where the other nodes
    # reach its providers (workers of one host), and the URL they use for that (--node-url)
    node_listen: tuple[str, int] | None = None
    node_url: str = ""


def _has_private_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(1 << 20)
    except OSError:
        return False


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context, or a ValueError saying what is wrong with the files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for path in (cert, key):
        if path and not os.path.isfile(path):
            raise ValueError(f"TLS: cannot read {path}: no such file")
    try:
        ctx.load_cert_chain(cert, key or None)
    except OSError as exc:  # ssl.SSLError is one too
        if not key and not _has_private_key(cert):
            raise ValueError(f"TLS: {cert} holds no private key; give the key file with --tls-key "
                             "(or put the key in the same PEM file)") from None
        if isinstance(exc, ssl.SSLError):
            raise ValueError(f"TLS: certificate {cert} / key {key}: {exc.reason or exc}") from None
        raise ValueError(f"TLS: cannot read {exc.filename or cert}: {exc.strerror}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

