"""Serving the API (issue 4, point 1): hypercorn on the tunnel's own connections (plain and
TLS), keep-alive and pipelining, /socket upgrades that never reach the app, --api-bind, and
the command line's checks of the API flags."""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest
import trio

from trisocks._version import __version__

from .api_support import KEY, running_api
from .inproc import echo_handler, echo_roundtrip, serve_tcp
from .support.tools import clean_env, trisocks_cmd


async def raw_exchange(port: int, data: bytes, *, expect_responses: int) -> bytes:
    """Send ``data`` on one connection; read until ``expect_responses`` answers are complete."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(10):
            while got.count(b"HTTP/1.1 ") < expect_responses or not _complete(got, expect_responses):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
        return got


def _complete(data: bytes, n: int) -> bool:
    """The last of n responses has its whole body (all our answers carry Content-Length)."""
    parts = data.split(b"HTTP/1.1 ")[1:]
    if len(parts) < n:
        return False
    head, sep, body = parts[n - 1].partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


async def test_front_page_keep_alive_and_pipelining_on_the_tunnel_port():
    async with running_api() as api:
        r = await api.anon.get("/")
        assert (r.status_code, r.text) == (200, f"trisocks {__version__} is running\n")
        assert r.headers["server"] == f"trisocks/{__version__}"
        # two pipelined requests in one packet, the second with its body in the same packet
        body = b'{"name": "piped"}'
        data = (f"GET /api/status HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n"
                f"POST /api/users HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        answer = await raw_exchange(api.port, data, expect_responses=2)
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"HTTP/1.1 201" in answer and b'"name":"piped"' in answer
        # a body that arrives after the head, in pieces
        stream = await trio.open_tcp_stream("127.0.0.1", api.port)
        async with stream:
            body = b'{"name": "slow-body"}'
            await stream.send_all((f"POST /api/users HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                                   f"Content-Length: {len(body)}\r\n\r\n").encode())
            await stream.send_all(body[:5])
            await trio.sleep(0.05)  # not synchronisation: makes the body a separate read
            await stream.send_all(body[5:])
            got = b""
            with trio.fail_after(10):
                while b"slow-body" not in got:
                    got += await stream.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 201")
        # httpx keeps one connection for several requests
        for _ in range(5):
            assert (await api.get("/api/status")).status_code == 200
        assert api.plane._asgi.connections <= 4


async def test_socket_upgrades_never_reach_the_app():
    async with running_api(tokens=["ws-token-0001"]) as api, trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        handed = api.plane._asgi.connections
        socks_port = await api.client(nursery, "ws-token-0001")
        assert await echo_roundtrip(socks_port, echo, b"x" * 100_000)
        assert api.plane._asgi.connections == handed  # the tunnel's WebSocket went elsewhere
        # an upgrade anywhere else is handed to the app, which refuses it
        upgrade = (b"GET /api/status HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        stream = await trio.open_tcp_stream("127.0.0.1", api.port)
        async with stream:
            await stream.send_all(upgrade)
            with trio.fail_after(10):
                answer = await stream.receive_some(4096)
        assert answer and not answer.startswith(b"HTTP/1.1 101")
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    base = tmp_path_factory.mktemp("api-tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    return str(base / "server.pem"), str(base / "ca.pem")


async def test_the_api_over_tls_on_the_tunnel_port(tls_files):
    cert, ca = tls_files
    async with running_api(tokens=["tls-token-0001"], server_cfg={"tls_cert": cert}) as api, \
            trio.open_nursery() as nursery:
        context = ssl.create_default_context(cafile=ca)
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{api.port}", verify=context,
                                     headers={"X-API-Key": KEY}, trust_env=False) as https:
            r = await https.get("/api/status")
            assert r.status_code == 200 and r.json()["tokens"][0]["token"] == "tls-token-0001"
            user = (await https.post("/api/users", json={"name": "tls-user"})).json()
            sub = (await https.get(f"/api/subscribe/{user['key']}")).json()
            assert sub["server"] == f"wss://127.0.0.1:{api.port}"
            assert sub["share_link"] == f"trisocks://{user['key']}@127.0.0.1:{api.port}?tls=1"
            for _ in range(3):  # keep-alive over TLS
                assert (await https.get("/healthz")).status_code == 200
        # and the tunnel itself, on the same port
        echo = await serve_tcp(nursery, echo_handler)
        socks_port = await api.client(nursery, "tls-token-0001", url=f"wss://127.0.0.1:{api.port}",
                                      ca_file=ca)
        assert await echo_roundtrip(socks_port, echo, b"s" * 200_000)
        nursery.cancel_scope.cancel()


async def test_api_bind_moves_the_api_to_its_own_listener():
    async with running_api(tokens=["bind-token-01"], api_bind=("127.0.0.1", 0)) as api, \
            trio.open_nursery() as nursery:
        assert api.plane.api_port and api.plane.api_port != api.port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.plane.api_port}",
                                     headers={"X-API-Key": KEY}, trust_env=False) as bound:
            r = await bound.get("/api/status")
            assert r.status_code == 200 and r.json()["tokens"][0]["token"] == "bind-token-01"
            user = (await bound.post("/api/users", json={"name": "bound-user"})).json()
            sub = (await bound.get(f"/api/subscribe/{user['key']}")).json()
            assert sub["server"] == f"ws://127.0.0.1:{api.port}"  # the tunnel's port, not the API's
        # the tunnel port answers as it does without the API
        r = await api.get("/api/status")
        assert r.status_code == 404 and "application/json" not in r.headers.get("content-type", "")
        assert (await api.anon.get("/")).text == f"trisocks {__version__} is running\n"
        echo = await serve_tcp(nursery, echo_handler)
        socks_port = await api.client(nursery, user["key"])
        assert await echo_roundtrip(socks_port, echo, b"b" * 10_000)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("argv, message", [
    (["--api-bind", "127.0.0.1:0"], "need -k/--api-key"),
    (["--api-allow-remote"], "need -k/--api-key"),
    (["-k", "sha256:1234"], "sha256:<64 hex digits>"),
    (["-k", "long-enough-key-123", "--api-bind", "nonsense"], "expected HOST:PORT"),
    (["-k", "long-enough-key-123", "--public-url", "http://x"], "must start with ws:// or wss://"),
])
def test_the_command_line_checks_the_api_flags(argv, message, tmp_path):
    proc = subprocess.run([*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", "0",
                           "--db", str(tmp_path / "x.db"), *argv],
                          capture_output=True, text=True, timeout=30, env=clean_env(),
                          check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
