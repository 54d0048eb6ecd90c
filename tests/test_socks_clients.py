"""Real SOCKS5 clients against a trisocks server + trisocks client pair (both subprocesses).

curl (--socks5-hostname and --socks5), python-socks (trio and sync), httpx, and a raw socket
client where the reply bytes themselves are the point (auth method, RFC 1929 status, REP code).
Targets: the payload server on 127.0.0.1, on [::1], and by the name ``localhost``.
"""

from __future__ import annotations

import hashlib
import json
import socket
from contextlib import contextmanager

import httpx
import pytest
import trio
from python_socks import ProxyError
from python_socks.async_.trio import Proxy as TrioProxy
from python_socks.sync import Proxy as SyncProxy

from .support import (
    curl,
    payload_bytes,
    payload_sha256,
    start_trisocks_client,
    start_trisocks_server,
    write_payload_file,
)
from .support import socks as raw
from .support.procs import ProcessFactory

TOKEN = "socks-clients-token-7c1f0e"
USER, PASSWORD = "alice", "s3cret-pw"
SIZE = 2 << 20  # enough to cross many frames and reads, small enough to stay quick

# SOCKS5 reply codes (RFC 1928 section 6)
SUCCEEDED, HOST_UNREACHABLE, CONNECTION_REFUSED, COMMAND_NOT_SUPPORTED = 0, 4, 5, 7


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    factory = ProcessFactory(tmp_path_factory.mktemp("socks-clients-logs"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def server(module_procs):
    return start_trisocks_server(module_procs, tokens=[TOKEN])


@pytest.fixture(scope="module")
def tunnel(module_procs, server):
    """The SOCKS5 side of a trisocks client (no SOCKS5 authentication)."""
    return start_trisocks_client(module_procs, server.url, TOKEN, name="client-noauth")


@pytest.fixture(scope="module")
def auth_tunnel(module_procs, server):
    """A trisocks client whose SOCKS5 port requires -n alice -w s3cret-pw."""
    return start_trisocks_client(module_procs, server.url, TOKEN, username=USER, password=PASSWORD,
                                 name="client-auth")


@contextmanager
def refused_port():
    """A 127.0.0.1 port that is bound but not listening: connecting to it is refused, and
    nobody else can take it while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def assert_tunnel_works(client, payload_server) -> None:
    result = curl(payload_server.bytes_url(4096, seed=99), socks=client.socks).check()
    assert result.sha256 == payload_sha256(4096, 99)


# -- curl ------------------------------------------------------------------------------------


def test_curl_socks5_hostname_ipv4_target(tunnel, payload_server):
    result = curl(payload_server.bytes_url(SIZE, seed=1), socks=tunnel.socks).check()
    assert result.size == SIZE
    assert result.sha256 == payload_sha256(SIZE, 1)


def test_curl_socks5_local_resolution_ipv4_target(tunnel, payload_server):
    # --socks5: curl resolves the name itself and sends the proxy an IPv4 address (ATYP 1)
    for host in ("127.0.0.1", "localhost"):
        result = curl(payload_server.bytes_url(SIZE, seed=2, host=host), socks=tunnel.socks,
                      remote_dns=False).check()
        assert result.sha256 == payload_sha256(SIZE, 2), host


def test_curl_slow_reader_gets_every_byte(tunnel, payload_server):
    """The target writes far faster than curl reads (6 MB/s): backpressure, not loss."""
    size = 12 << 20
    result = curl(payload_server.bytes_url(size, seed=13), socks=tunnel.socks,
                  extra=["--limit-rate", "6M"]).check()
    assert result.size == size
    assert result.sha256 == payload_sha256(size, 13)


def test_curl_upload_through_tunnel(tunnel, payload_server, tmp_path):
    path = tmp_path / "up.bin"
    expected = write_payload_file(path, SIZE, seed=3)
    result = curl(payload_server.url("/upload"), socks=tunnel.socks, upload=str(path)).check()
    assert result.json() == {"length": SIZE, "sha256": expected}


def test_ipv6_literal_target(tunnel, payload_server_v6):
    """[::1] as the target: curl both ways, and a raw request with ATYP 4 (IPv6 address)."""
    for remote_dns in (True, False):
        result = curl(payload_server_v6.bytes_url(SIZE, seed=4), socks=tunnel.socks,
                      remote_dns=remote_dns).check()
        assert result.sha256 == payload_sha256(SIZE, 4), f"remote_dns={remote_dns}"

    hs = raw.handshake(("127.0.0.1", tunnel.port), "::1", payload_server_v6.port, atyp="ipv6",
                       keep_open=True)
    assert hs.reply == SUCCEEDED, hs
    with hs.sock as sock:
        status, body = raw.http_get(sock, f"[::1]:{payload_server_v6.port}", "/bytes/65536?seed=5")
    assert status == 200
    assert body == payload_bytes(65536, 5)


def test_domain_name_target_localhost(tunnel, payload_server):
    """The server resolves ``localhost`` (ATYP 3) and reaches the IPv4 payload server."""
    url = payload_server.bytes_url(SIZE, seed=6, host="localhost")
    result = curl(url, socks=tunnel.socks).check()
    assert result.sha256 == payload_sha256(SIZE, 6)

    hs = raw.handshake(("127.0.0.1", tunnel.port), "localhost", payload_server.port, atyp="domain",
                       keep_open=True)
    assert hs.reply == SUCCEEDED, hs
    with hs.sock as sock:
        status, body = raw.http_get(sock, f"localhost:{payload_server.port}", "/")
    assert status == 200
    assert body == b"trisocks test payload server\n"


# -- python-socks and httpx ------------------------------------------------------------------


async def test_python_socks_trio(tunnel, payload_server):
    proxy = TrioProxy.from_url(f"socks5://{tunnel.socks}", rdns=True)
    sock = await proxy.connect("127.0.0.1", payload_server.port, timeout=15)
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(f"GET /bytes/{SIZE}?seed=7 HTTP/1.1\r\nHost: x\r\n"
                              "Connection: close\r\n\r\n".encode())
        data = bytearray()
        with trio.fail_after(30):
            while chunk := await stream.receive_some(1 << 20):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) == SIZE
    assert hashlib.sha256(body).hexdigest() == payload_sha256(SIZE, 7)


def test_python_socks_sync_domain(tunnel, payload_server):
    proxy = SyncProxy.from_url(f"socks5://{tunnel.socks}", rdns=True)
    with proxy.connect("localhost", payload_server.port, timeout=15) as sock:
        status, body = raw.http_get(sock, "localhost", f"/bytes/{SIZE}?seed=8")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == payload_sha256(SIZE, 8)


def test_httpx_socks5_download_and_upload(tunnel, payload_server):
    with httpx.Client(proxy=f"socks5://{tunnel.socks}", trust_env=False, timeout=30) as client:
        resp = client.get(payload_server.bytes_url(SIZE, seed=9))
        assert resp.status_code == 200
        assert hashlib.sha256(resp.content).hexdigest() == payload_sha256(SIZE, 9)

        body = payload_bytes(SIZE, seed=10)
        resp = client.post(payload_server.url("/upload"), content=body)
        assert resp.status_code == 200
        assert resp.json() == {"length": SIZE, "sha256": hashlib.sha256(body).hexdigest()}


# -- SOCKS5 username/password (RFC 1929) ------------------------------------------------------


def test_auth_no_credentials_refused(auth_tunnel, payload_server):
    # a client offering only "no authentication" gets "no acceptable methods" (0xFF)
    hs = raw.handshake(("127.0.0.1", auth_tunnel.port), "127.0.0.1", payload_server.port,
                       methods=bytes([raw.NO_AUTH]))
    assert hs.method == raw.NO_ACCEPTABLE, hs
    assert hs.reply is None

    result = curl(payload_server.url("/"), socks=auth_tunnel.socks)
    assert result.returncode != 0 and result.http_code is None, result


def test_auth_wrong_credentials_refused(auth_tunnel, payload_server):
    hs = raw.handshake(("127.0.0.1", auth_tunnel.port), "127.0.0.1", payload_server.port,
                       methods=bytes([raw.NO_AUTH, raw.USERPASS]), username=USER,
                       password="wrong-password")
    assert hs.method == raw.USERPASS, hs
    assert hs.auth_status is not None and hs.auth_status != 0, hs  # RFC 1929: non-zero = failure
    assert hs.reply is None

    hs = raw.handshake(("127.0.0.1", auth_tunnel.port), "127.0.0.1", payload_server.port,
                       methods=bytes([raw.USERPASS]), username="mallory", password=PASSWORD)
    assert hs.auth_status not in (None, 0), hs

    result = curl(payload_server.url("/"), socks=auth_tunnel.socks, proxy_user=f"{USER}:nope")
    assert result.returncode != 0 and result.http_code is None, result
    with pytest.raises(ProxyError):
        SyncProxy.from_url(f"socks5://{USER}:nope@{auth_tunnel.socks}").connect(
            "127.0.0.1", payload_server.port, timeout=15).close()


def test_auth_right_credentials_work(auth_tunnel, payload_server):
    hs = raw.handshake(("127.0.0.1", auth_tunnel.port), "127.0.0.1", payload_server.port,
                       methods=bytes([raw.USERPASS]), username=USER, password=PASSWORD)
    assert (hs.method, hs.auth_status, hs.reply) == (raw.USERPASS, 0, SUCCEEDED), hs

    result = curl(payload_server.bytes_url(SIZE, seed=11), socks=auth_tunnel.socks,
                  proxy_user=f"{USER}:{PASSWORD}").check()
    assert result.sha256 == payload_sha256(SIZE, 11)

    proxy = SyncProxy.from_url(f"socks5://{USER}:{PASSWORD}@{auth_tunnel.socks}")
    with proxy.connect("127.0.0.1", payload_server.port, timeout=15) as sock:
        status, body = raw.http_get(sock, "x", "/")
    assert status == 200 and body == b"trisocks test payload server\n"


# -- failures the SOCKS5 client must be told about --------------------------------------------


def test_connection_refused_is_reply_5(tunnel, payload_server):
    with refused_port() as port:
        result = curl(f"http://127.0.0.1:{port}/", socks=tunnel.socks)
        assert result.returncode == 97, result  # CURLE_PROXY: the proxy handshake failed
        assert "SOCKS5" in result.stderr and "(5)" in result.stderr, result.stderr

        hs = raw.handshake(("127.0.0.1", tunnel.port), "127.0.0.1", port)
        assert hs.reply == CONNECTION_REFUSED, hs

        with pytest.raises(ProxyError) as info:
            SyncProxy.from_url(f"socks5://{tunnel.socks}").connect("127.0.0.1", port, timeout=15)
        assert info.value.error_code == CONNECTION_REFUSED
    assert_tunnel_works(tunnel, payload_server)


def test_unresolvable_name_is_reply_4(tunnel, payload_server):
    hs = raw.handshake(("127.0.0.1", tunnel.port), "nonexistent.invalid", 80, atyp="domain")
    assert hs.reply == HOST_UNREACHABLE, hs

    with pytest.raises(ProxyError) as info:
        SyncProxy.from_url(f"socks5://{tunnel.socks}", rdns=True).connect(
            "nonexistent.invalid", 80, timeout=15)
    assert info.value.error_code == HOST_UNREACHABLE
    assert_tunnel_works(tunnel, payload_server)


def test_bind_is_command_not_supported(tunnel, payload_server):
    hs = raw.handshake(("127.0.0.1", tunnel.port), "127.0.0.1", payload_server.port,
                       command=raw.BIND)
    assert hs.reply == COMMAND_NOT_SUPPORTED, hs
    assert_tunnel_works(tunnel, payload_server)


def test_payload_server_chunked_upload(payload_server):
    """The payload server itself, directly: a chunked upload's digest is that of the bytes sent."""
    body = payload_bytes(100_000, seed=12)
    with httpx.Client(trust_env=False, timeout=10) as client:
        resp = client.put(payload_server.url("/upload"), content=iter([body[:1], body[1:]]))
    assert json.loads(resp.content) == {"length": len(body),
                                        "sha256": hashlib.sha256(body).hexdigest()}
