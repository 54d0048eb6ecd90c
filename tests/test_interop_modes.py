"""Reverse and agent modes against the LinkSocks peers, with curl moving 100 MiB through each
arrangement and sha256 compared end to end."""

from __future__ import annotations

import pytest

from .support import (
    curl,
    payload_sha256,
    start_linksocks_client,
    start_linksocks_provider,
    start_linksocks_reverse_server,
    start_trisocks_connector,
    start_trisocks_provider,
    start_trisocks_reverse_server,
)
from .support.procs import port_open

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REV = "interop-reverse-7c1e90aa"
CONN = "interop-connector-51bd02f3"
SIZE = 100 << 20


def wait_socks(port: int, *procs) -> None:
    """The reverse SOCKS5 port opens once a provider is there."""
    import time

    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        for proc in procs:
            assert proc.alive(), proc.describe()
        assert time.monotonic() < deadline, f"SOCKS5 port {port} never opened"
        time.sleep(0.02)


def download(socks: str, payload_server, seed: int, *procs) -> None:
    result = curl(payload_server.bytes_url(SIZE, seed=seed), socks=socks, timeout=180)
    details = "\n".join(p.describe() for p in procs)
    assert result.returncode == 0 and result.http_code == 200, f"{result.stderr}\n{details}"
    assert result.size == SIZE and result.sha256 == payload_sha256(SIZE, seed), details
    for proc in procs:
        assert proc.alive(), proc.describe()


def test_reverse_trisocks_server_trisocks_provider(procs, payload_server):
    server, socks_port = start_trisocks_reverse_server(procs, REV)
    provider = start_trisocks_provider(procs, server.url, REV)
    wait_socks(socks_port, server.proc, provider)
    download(f"127.0.0.1:{socks_port}", payload_server, 31, server.proc, provider)


def test_reverse_trisocks_server_linksocks_provider(procs, payload_server):
    server, socks_port = start_trisocks_reverse_server(procs, REV)
    provider = start_linksocks_provider(procs, server.url, REV)
    wait_socks(socks_port, server.proc, provider)
    download(f"127.0.0.1:{socks_port}", payload_server, 32, server.proc, provider)


def test_reverse_linksocks_server_trisocks_provider(procs, payload_server):
    server, socks_port = start_linksocks_reverse_server(procs, REV)
    provider = start_trisocks_provider(procs, server.url, REV)
    wait_socks(socks_port, server.proc, provider)
    download(f"127.0.0.1:{socks_port}", payload_server, 33, server.proc, provider)


def test_agent_trisocks_server_linksocks_provider_trisocks_connector(procs, payload_server):
    server, _ = start_trisocks_reverse_server(procs, REV, connector_tokens=[CONN])
    provider = start_linksocks_provider(procs, server.url, REV)
    connector = start_trisocks_connector(procs, server.url, CONN)
    download(connector.socks, payload_server, 34, server.proc, provider, connector.proc)


def test_agent_trisocks_provider_linksocks_connector(procs, payload_server):
    """A LinkSocks connector's traffic leaves through a trisocks provider: first via a trisocks
    server, then via a LinkSocks server."""
    server, _ = start_trisocks_reverse_server(procs, REV, connector_tokens=[CONN])
    provider = start_trisocks_provider(procs, server.url, REV)
    connector = start_linksocks_client(procs, server.url, CONN, command="connector")
    download(connector.socks, payload_server, 35, server.proc, provider, connector.proc)


def test_agent_linksocks_server_trisocks_provider_linksocks_connector(procs, payload_server):
    server, _ = start_linksocks_reverse_server(procs, REV, connector_token=CONN)
    provider = start_trisocks_provider(procs, server.url, REV)
    connector = start_linksocks_client(procs, server.url, CONN, command="connector")
    download(connector.socks, payload_server, 36, server.proc, provider, connector.proc)
