"""Wire compatibility with the peers: trisocks on one end of the WebSocket, pywssocks (Python)
or LinkSocks (Go) on the other, curl on the SOCKS5 side, the payload server as the target.

Per pair: a 100 MiB download and a 16 MiB upload, each checked by sha256 end to end (the
upload's digest is computed by the payload server from what it received).
"""

from __future__ import annotations

import pytest

from .support import (
    curl,
    payload_sha256,
    start_linksocks_client,
    start_linksocks_server,
    start_pywssocks_client,
    start_pywssocks_server,
    start_trisocks_client,
    start_trisocks_server,
    tools,
    write_payload_file,
)
from .support.procs import ProcessFactory

pytestmark = pytest.mark.interop

TOKEN = "interop-token-5d2a9b41"
DOWNLOAD = 100 << 20
UPLOAD = 16 << 20


def _trisocks_server_pywssocks_client(f):
    server = start_trisocks_server(f, tokens=[TOKEN])
    return server, start_pywssocks_client(f, server.url, TOKEN)


def _pywssocks_server_trisocks_client(f):
    server = start_pywssocks_server(f, TOKEN)
    return server, start_trisocks_client(f, server.url, TOKEN)


def _trisocks_server_linksocks_client(f):
    server = start_trisocks_server(f, tokens=[TOKEN])
    return server, start_linksocks_client(f, server.url, TOKEN)


def _linksocks_server_trisocks_client(f):
    server = start_linksocks_server(f, TOKEN)
    return server, start_trisocks_client(f, server.url, TOKEN)


PAIRS = {
    "trisocks_server-pywssocks_client": _trisocks_server_pywssocks_client,
    "pywssocks_server-trisocks_client": _pywssocks_server_trisocks_client,
    "trisocks_server-linksocks_client": _trisocks_server_linksocks_client,
    "linksocks_server-trisocks_client": _linksocks_server_trisocks_client,
}


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    factory = ProcessFactory(tmp_path_factory.mktemp("interop-logs"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, module_procs):
    """(server, client) of one pairing, started once for its download and upload tests."""
    server, client = PAIRS[request.param](module_procs)
    yield server, client
    server.proc.terminate()
    client.proc.terminate()


def _assert_alive(*peers) -> None:
    for peer in peers:
        assert peer.proc.alive(), f"{peer.kind} died during the transfer\n{peer.proc.describe()}"


# What a reader of a failure should know about a peer's own behaviour.
KNOWN_PEER_ISSUES = {
    "pywssocks-client": (
        "note: the pywssocks 1.5.1 client discards the Data it still has queued for a channel when "
        "the Disconnect arrives (relay.py: disconnect_channel cancels the channel's tasks), and "
        "its queue is unbounded; a server that reads the target faster than the pywssocks client "
        "writes to its SOCKS5 socket makes that backlog large. pywssocks server + pywssocks client "
        "loses data the same way once the SOCKS5 reader is slow (curl --limit-rate 4M)."),
}


def _failure(result, server, client) -> str:
    hint = KNOWN_PEER_ISSUES.get(client.kind, "") if result.http_code == 200 else ""
    return (f"curl exit {result.returncode}, HTTP {result.http_code}, {result.size} bytes: "
            f"{result.stderr}\n{hint}\n{server.proc.describe()}\n{client.proc.describe()}")


@pytest.mark.slow
def test_download_100mib(pair, payload_server):
    server, client = pair
    result = curl(payload_server.bytes_url(DOWNLOAD, seed=21), socks=client.socks, timeout=180)
    assert result.returncode == 0 and result.http_code == 200, _failure(result, server, client)
    assert result.size == DOWNLOAD
    assert result.sha256 == payload_sha256(DOWNLOAD, 21)
    _assert_alive(server, client)


def test_upload_16mib(pair, payload_server, tmp_path):
    server, client = pair
    path = tmp_path / "upload.bin"
    expected = write_payload_file(path, UPLOAD, seed=22)
    result = curl(payload_server.url("/upload"), socks=client.socks, upload=str(path), timeout=180)
    assert result.returncode == 0 and result.http_code == 200, _failure(result, server, client)
    assert result.json() == {"length": UPLOAD, "sha256": expected}
    _assert_alive(server, client)


# -- the rule for missing peers ------------------------------------------------------------


def test_missing_peer_fails_under_ci_and_skips_otherwise(monkeypatch):
    """A missing peer must never turn into a quiet pass in CI."""
    monkeypatch.setitem(tools.PEERS, "nopeer", ("no-such-peer-exe", "no_such_module", "nopeer==0"))
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        tools.require_peer("nopeer")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        tools.require_tool("no-such-tool-9d8e7f")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        tools.require_peer("nopeer")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        tools.require_tool("no-such-tool-9d8e7f")
    # and the real peers are where the interop tests look for them
    assert tools.require_peer("pywssocks").endswith("pywssocks")
    assert tools.require_peer("linksocks").endswith("linksocks")
