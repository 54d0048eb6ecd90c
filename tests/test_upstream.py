"""Upstream proxies: URL parsing, environment selection, and open_via against real proxies.

The proxies here are small Trio servers written for the test (SOCKS5 with or without
RFC 1929 auth, HTTP CONNECT with optional Basic auth, and a scripted one that answers
fixed bytes or nothing). They parse the wire format by hand rather than through
trisocks.wire.socks5, so a mistake there is not mirrored here. All on 127.0.0.1.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trisocks.net.transport import close_socket, sock_recv, sock_sendall
from trisocks.net.upstream import (
    Proxy,
    UpstreamError,
    no_proxy_matches,
    open_via,
    parse_proxy,
    proxy_from_env,
)
from trisocks.wire import socks5

BANNER = b"220 target speaks first\r\n"
TIMEOUT = 5.0  # generous: only the timeout tests rely on a deadline passing


# --- test servers -------------------------------------------------------------------


class Reader:
    """Buffered reads on a Trio stream: exactly n bytes, or up to a separator."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.buf += data

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            await self._more()
        end = self.buf.index(sep) + len(sep)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    async def until_eof(self) -> None:
        try:
            while True:
                await self._more()
        except (EOFError, trio.BrokenResourceError):
            return


async def serve(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def banner_handler(stream: trio.SocketStream) -> None:
    await stream.send_all(BANNER)
    await echo_handler(stream)


async def copy(src: trio.SocketStream, dst: trio.SocketStream, first: bytes = b"") -> None:
    try:
        if first:
            await dst.send_all(first)
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@dataclass
class ProxyBase:
    accepted: int = 0
    relayed: int = 0
    client_closed: trio.Event = field(default_factory=trio.Event)

    async def refuse(self, reader: Reader) -> None:
        """After a failure answer: wait for the client to hang up, and note that it did."""
        await reader.until_eof()
        self.client_closed.set()

    async def relay(
        self,
        client: trio.SocketStream,
        reader: Reader,
        host: str,
        port: int,
        head: bytes,
        early: bool,
    ) -> None:
        # "localhost" is recorded as asked but dialed as 127.0.0.1: tests stay on IPv4.
        target = await trio.open_tcp_stream("127.0.0.1" if host == "localhost" else host, port)
        async with target:
            if early:  # the target's first bytes in the same write as the proxy's answer
                head += await Reader(target).exactly(len(BANNER))
            await client.send_all(head)
            self.relayed += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, client, target, bytes(reader.buf))
                nursery.start_soon(copy, target, client)
        self.client_closed.set()


@dataclass
class Socks5Proxy(ProxyBase):
    users: dict[str, str] | None = None  # None: no authentication
    fail: int = 0  # a SOCKS5 reply code to answer every CONNECT with
    early: bool = False
    logins: list[tuple[str, str]] = field(default_factory=list)
    requests: list[tuple[int, str, int]] = field(default_factory=list)  # (atyp, host, port)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        r = Reader(stream)
        async with stream:
            ver, n = await r.exactly(2)
            assert ver == 5
            methods = await r.exactly(n)
            want = 0 if self.users is None else 2
            if want not in methods:
                await stream.send_all(b"\x05\xff")
                return await self.refuse(r)
            await stream.send_all(bytes((5, want)))
            if want == 2:
                ver, ulen = await r.exactly(2)
                user = (await r.exactly(ulen)).decode()
                (plen,) = await r.exactly(1)
                password = (await r.exactly(plen)).decode()
                self.logins.append((user, password))
                assert self.users is not None
                ok = self.users.get(user) == password
                await stream.send_all(b"\x01\x00" if ok else b"\x01\x01")
                if not ok:
                    return await self.refuse(r)
            ver, cmd, _rsv, atyp = await r.exactly(4)
            assert (ver, cmd) == (5, 1)
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, await r.exactly(4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, await r.exactly(16))
            else:
                (length,) = await r.exactly(1)
                host = (await r.exactly(length)).decode()
            port = int.from_bytes(await r.exactly(2), "big")
            self.requests.append((atyp, host, port))
            reply = bytes((5, self.fail, 0, 1, 127, 0, 0, 1, 0, 0))
            if self.fail:
                await stream.send_all(reply)
                return await self.refuse(r)
            await self.relay(stream, r, host, port, reply, self.early)


@dataclass
class HttpProxy(ProxyBase):
    auth: tuple[str, str] | None = None  # demand these Basic credentials (else 407)
    status: int = 200  # anything else: answer it instead of connecting
    early: bool = False
    interim: bool = False  # send a "100 Continue" head before the real one
    targets: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        r = Reader(stream)
        async with stream:
            head = (await r.until(b"\r\n\r\n")).decode()
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ")
            assert (method, version) == ("CONNECT", "HTTP/1.1")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in header_lines if line)
            }
            assert headers["host"] == target
            self.targets.append(target)
            self.authorizations.append(headers.get("proxy-authorization"))
            if self.auth is not None:
                token = base64.b64encode(":".join(self.auth).encode()).decode()
                if headers.get("proxy-authorization") != f"Basic {token}":
                    await stream.send_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                    )
                    return await self.refuse(r)
            if self.status != 200:
                await stream.send_all(
                    f"HTTP/1.1 {self.status} Nope\r\nContent-Length: 4\r\n\r\nnope".encode()
                )
                return await self.refuse(r)
            host, _, port = target.rpartition(":")
            answer = b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\n"
            if self.interim:
                answer = b"HTTP/1.1 100 Continue\r\n\r\n" + answer
            await self.relay(stream, r, host.strip("[]"), int(port), answer, self.early)


@dataclass
class ScriptedProxy(ProxyBase):
    """Reads the client's first message (unless silent), answers ``answer``, then either
    hangs up (``hang_up``) or waits for the client to."""

    answer: bytes = b""
    hang_up: bool = False
    got_connection: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.got_connection.set()
        r = Reader(stream)
        async with stream:
            if self.answer:
                await r.exactly(1)
                await stream.send_all(self.answer)
            if not self.hang_up:
                await self.refuse(r)


async def start(nursery: trio.Nursery, server: ProxyBase) -> int:
    return await serve(nursery, server.handle)  # type: ignore[attr-defined]


@pytest.fixture
async def echo_port(nursery):
    return await serve(nursery, echo_handler)


@pytest.fixture
async def banner_port(nursery):
    return await serve(nursery, banner_handler)


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections: bound by us, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while reading the echo back, concurrently (no buffer deadlock)."""
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(payload):
            data = await sock_recv(sock, 65536)
            if not data:
                break
            got.extend(data)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await sock_sendall(sock, payload)
    return bytes(got)


async def fails_with(proxy: Proxy, host: str, port: int, timeout: float = TIMEOUT) -> OSError:
    with pytest.raises(OSError) as info:
        await open_via(proxy, host, port, timeout=timeout)
    return info.value


async def saw_close(server: ProxyBase) -> None:
    """The proxy saw us hang up: open_via closed its socket."""
    with trio.fail_after(TIMEOUT):
        await server.client_closed.wait()


PAYLOAD = os.urandom(200_000)  # several reads each way


# --- open_via through SOCKS5 ----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
@pytest.mark.parametrize("target, atyp", [("localhost", 3), ("127.0.0.1", 1)], ids=["name", "ipv4"])
async def test_socks5_connects_and_relays(nursery, echo_port, scheme, target, atyp):
    server = Socks5Proxy()
    proxy = Proxy(scheme, "127.0.0.1", await start(nursery, server))
    sock, early = await open_via(proxy, target, echo_port, timeout=TIMEOUT)
    try:
        assert early == b""
        assert await round_trip(sock, PAYLOAD) == PAYLOAD
    finally:
        close_socket(sock)
    # one connection, and the name went to the proxy unresolved
    assert (server.accepted, server.relayed) == (1, 1)
    assert server.requests == [(atyp, target, echo_port)]
    assert server.logins == []


async def test_socks5_username_password_from_url(nursery, echo_port):
    server = Socks5Proxy(users={"us@er": "p:ss/wörd"})
    port = await start(nursery, server)
    proxy = parse_proxy(f"socks5h://us%40er:p%3Ass%2Fw%C3%B6rd@127.0.0.1:{port}")
    sock, _ = await open_via(proxy, "localhost", echo_port, timeout=TIMEOUT)
    try:
        assert await round_trip(sock, b"hello") == b"hello"
    finally:
        close_socket(sock)
    assert server.logins == [("us@er", "p:ss/wörd")]
    assert server.requests == [(3, "localhost", echo_port)]


async def test_socks5_wrong_password_is_not_allowed(nursery, echo_port):
    server = Socks5Proxy(users={"alice": "right"})
    proxy = Proxy("socks5", "127.0.0.1", await start(nursery, server), "alice", "wrong")
    exc = await fails_with(proxy, "localhost", echo_port)
    assert isinstance(exc, UpstreamError)
    assert exc.errno == errno.EACCES
    assert socks5.reply_for_exception(exc) == socks5.NOT_ALLOWED
    assert "rejected username 'alice'" in str(exc)
    assert "wrong" not in str(exc)
    assert server.requests == []  # never got as far as CONNECT
    await saw_close(server)


async def test_socks5_auth_required_but_none_given(nursery, echo_port):
    server = Socks5Proxy(users={"alice": "pw"})
    proxy = Proxy("socks5", "127.0.0.1", await start(nursery, server))
    exc = await fails_with(proxy, "localhost", echo_port)
    assert isinstance(exc, UpstreamError) and exc.errno == errno.EACCES
    assert "wants a username and password" in str(exc)
    await saw_close(server)


@pytest.mark.parametrize(
    "code, expected_errno, reply",
    [
        (1, None, socks5.GENERAL_FAILURE),
        (2, errno.EACCES, socks5.NOT_ALLOWED),
        (3, errno.ENETUNREACH, socks5.NETWORK_UNREACHABLE),
        (4, errno.EHOSTUNREACH, socks5.HOST_UNREACHABLE),
        (5, errno.ECONNREFUSED, socks5.CONNECTION_REFUSED),
        (6, errno.ETIMEDOUT, socks5.TTL_EXPIRED),
        (7, None, socks5.GENERAL_FAILURE),
        (8, None, socks5.GENERAL_FAILURE),
    ],
)
async def test_socks5_failure_reply_maps_to_errno(nursery, code, expected_errno, reply):
    server = Socks5Proxy(fail=code)
    proxy = Proxy("socks5", "127.0.0.1", await start(nursery, server))
    exc = await fails_with(proxy, "example.invalid", 443)
    assert isinstance(exc, UpstreamError)
    assert exc.errno == expected_errno
    assert socks5.reply_for_exception(exc) == reply
    text = str(exc)
    assert "example.invalid:443" in text and socks5.error_text(code) in text
    assert proxy.display in text
    assert server.requests == [(3, "example.invalid", 443)]
    await saw_close(server)


async def test_socks5_early_bytes_are_returned(nursery, banner_port):
    server = Socks5Proxy(early=True)
    proxy = Proxy("socks5", "127.0.0.1", await start(nursery, server))
    sock, early = await open_via(proxy, "localhost", banner_port, timeout=TIMEOUT)
    try:
        assert early == BANNER  # arrived with the reply, must not be lost
        assert await round_trip(sock, b"after the banner") == b"after the banner"
    finally:
        close_socket(sock)


# --- open_via through HTTP CONNECT ------------------------------------------------------


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1"])
async def test_http_connects_and_relays(nursery, echo_port, target):
    server = HttpProxy()
    proxy = Proxy("http", "127.0.0.1", await start(nursery, server))
    sock, early = await open_via(proxy, target, echo_port, timeout=TIMEOUT)
    try:
        assert early == b""
        assert await round_trip(sock, PAYLOAD) == PAYLOAD
    finally:
        close_socket(sock)
    assert (server.accepted, server.relayed) == (1, 1)
    assert server.targets == [f"{target}:{echo_port}"]
    assert server.authorizations == [None]


async def test_http_basic_auth(nursery, echo_port):
    server = HttpProxy(auth=("bob", "pä:ss"))
    port = await start(nursery, server)
    proxy = parse_proxy(f"http://bob:p%C3%A4%3Ass@127.0.0.1:{port}")
    sock, _ = await open_via(proxy, "localhost", echo_port, timeout=TIMEOUT)
    close_socket(sock)
    assert server.relayed == 1
    assert server.authorizations == ["Basic Ym9iOnDDpDpzcw=="]  # base64("bob:pä:ss" in UTF-8)


@pytest.mark.parametrize("credentials", [("bob", "wrong"), None], ids=["wrong", "missing"])
async def test_http_407_is_proxy_authentication_required(nursery, echo_port, credentials):
    server = HttpProxy(auth=("bob", "right"))
    port = await start(nursery, server)
    proxy = Proxy("http", "127.0.0.1", port, *(credentials or ()))
    exc = await fails_with(proxy, "localhost", echo_port)
    assert isinstance(exc, UpstreamError)
    assert exc.errno == errno.EACCES
    assert socks5.reply_for_exception(exc) == socks5.NOT_ALLOWED
    assert "proxy authentication required" in str(exc)
    assert server.relayed == 0
    await saw_close(server)


@pytest.mark.parametrize(
    "status, expected_errno, reply",
    [
        (403, errno.EACCES, socks5.NOT_ALLOWED),
        (502, errno.ECONNREFUSED, socks5.CONNECTION_REFUSED),
        (503, errno.ECONNREFUSED, socks5.CONNECTION_REFUSED),
        (504, errno.ETIMEDOUT, socks5.TTL_EXPIRED),
        (500, None, socks5.GENERAL_FAILURE),
    ],
)
async def test_http_error_status_maps_to_errno(nursery, status, expected_errno, reply):
    server = HttpProxy(status=status)
    proxy = Proxy("http", "127.0.0.1", await start(nursery, server))
    exc = await fails_with(proxy, "example.invalid", 443)
    assert isinstance(exc, UpstreamError)
    assert exc.errno == expected_errno
    assert socks5.reply_for_exception(exc) == reply
    assert f"CONNECT example.invalid:443: {status} Nope" in str(exc)
    await saw_close(server)


@pytest.mark.parametrize("interim", [False, True], ids=["200", "100-then-200"])
async def test_http_early_bytes_are_returned(nursery, banner_port, interim):
    server = HttpProxy(early=True, interim=interim)
    proxy = Proxy("http", "127.0.0.1", await start(nursery, server))
    sock, early = await open_via(proxy, "localhost", banner_port, timeout=TIMEOUT)
    try:
        assert early == BANNER
        assert await round_trip(sock, b"after the banner") == b"after the banner"
    finally:
        close_socket(sock)


async def test_http_ipv6_target_is_bracketed(nursery):
    server = HttpProxy(status=403)
    proxy = Proxy("http", "127.0.0.1", await start(nursery, server))
    await fails_with(proxy, "::1", 8443)
    await fails_with(proxy, "[::1]", 8443)
    assert server.targets == ["[::1]:8443", "[::1]:8443"]


# --- failures common to both kinds ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_unreachable_proxy_names_the_proxy(closed_port, scheme):
    proxy = Proxy(scheme, "127.0.0.1", closed_port, "u", "secret")
    exc = await fails_with(proxy, "localhost", 80)
    assert isinstance(exc, ConnectionRefusedError)  # the dial's own error, not UpstreamError
    assert not isinstance(exc, UpstreamError)
    assert f"upstream proxy {scheme}://u:***@127.0.0.1:{closed_port} unreachable" in str(exc)
    assert "secret" not in str(exc)
    assert socks5.reply_for_exception(exc) == socks5.CONNECTION_REFUSED


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_silent_proxy_hits_the_timeout(nursery, scheme):
    server = ScriptedProxy()  # accepts, never says a word
    proxy = Proxy(scheme, "127.0.0.1", await start(nursery, server))
    began = trio.current_time()
    exc = await fails_with(proxy, "localhost", 80, timeout=0.5)
    elapsed = trio.current_time() - began
    assert isinstance(exc, UpstreamError)
    assert exc.errno == errno.ETIMEDOUT
    assert socks5.reply_for_exception(exc) == socks5.TTL_EXPIRED
    assert "did not answer within 0.5 s" in str(exc)
    assert 0.45 <= elapsed < 3
    await saw_close(server)


async def test_cancellation_closes_the_socket(nursery):
    server = ScriptedProxy()
    proxy = Proxy("socks5", "127.0.0.1", await start(nursery, server))
    outcome: list[object] = []

    async def attempt(scope: trio.CancelScope) -> None:
        with scope:
            outcome.append(await open_via(proxy, "localhost", 80, timeout=60))

    scope = trio.CancelScope()
    async with trio.open_nursery() as inner:
        inner.start_soon(attempt, scope)
        with trio.fail_after(TIMEOUT):
            await server.got_connection.wait()
        scope.cancel()
    assert scope.cancelled_caught and outcome == []
    await saw_close(server)


@pytest.mark.parametrize(
    "scheme, answer, hang_up, message",
    [
        # an HTTP proxy answering our SOCKS5 greeting
        ("socks5", b"HTTP/1.1 400 Bad Request\r\n\r\n", False, "does not speak SOCKS5"),
        # a SOCKS5 proxy answering our CONNECT line
        ("http", b"\x05\xff", False, "gave no valid HTTP answer: not an HTTP answer"),
        ("http", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000, False, "longer than 16384 bytes"),
        ("http", b"HTTP/1.1 two hundred\r\n\r\n", False, "malformed status line"),
        ("socks5", b"\x05\x02", False, "chose authentication method 0x02"),
        ("socks5", b"\x05", True, "closed the connection during the handshake"),
        ("http", b"HTTP/1.1 200 Conn", True, "closed the connection during the handshake"),
    ],
)
async def test_malformed_answers(nursery, scheme, answer, hang_up, message):
    server = ScriptedProxy(answer=answer, hang_up=hang_up)
    proxy = Proxy(scheme, "127.0.0.1", await start(nursery, server))
    exc = await fails_with(proxy, "localhost", 80)
    assert isinstance(exc, UpstreamError)
    assert message in str(exc)
    assert socks5.reply_for_exception(exc) == socks5.GENERAL_FAILURE
    if not hang_up:
        await saw_close(server)


@pytest.mark.parametrize(
    "scheme, host", [("http", "evil\r\nX-Injected: 1"), ("http", ""), ("socks5", "a" * 256)]
)
async def test_bad_target_fails_before_dialing(nursery, scheme, host):
    server = ScriptedProxy()
    proxy = Proxy(scheme, "127.0.0.1", await start(nursery, server))
    with pytest.raises(ValueError):
        await open_via(proxy, host, 80, timeout=TIMEOUT)
    # The server task would have counted a connection before anything else.
    assert server.accepted == 0


# --- parse_proxy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("socks5://127.0.0.1:1081", Proxy("socks5", "127.0.0.1", 1081)),
        ("socks5://proxy.example", Proxy("socks5", "proxy.example", 1080)),
        ("socks5h://proxy.example", Proxy("socks5h", "proxy.example", 1080)),
        ("http://proxy.example", Proxy("http", "proxy.example", 8080)),
        ("HTTP://Proxy.Example:3128/", Proxy("http", "Proxy.Example", 3128)),
        ("  socks5://h:1  ", Proxy("socks5", "h", 1)),
        ("socks5://[::1]:1080", Proxy("socks5", "::1", 1080)),
        ("http://[2001:db8::7]", Proxy("http", "2001:db8::7", 8080)),
        ("socks5://user:pass@h:1", Proxy("socks5", "h", 1, "user", "pass")),
        ("socks5://us%40er:p%3A%2F%25w@h", Proxy("socks5", "h", 1080, "us@er", "p:/%w")),
        ("http://user@h", Proxy("http", "h", 8080, "user", "")),
        ("http://:pw@h", Proxy("http", "h", 8080, "", "pw")),
        ("http://u:p@ss@h:1", Proxy("http", "h", 1, "u", "p@ss")),  # last '@' ends userinfo
        ("http://%C3%BCser:pw@h", Proxy("http", "h", 8080, "üser", "pw")),
    ],
)
def test_parse_proxy_accepts(url, expected):
    assert parse_proxy(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "ftp://x",
            "upstream proxy 'ftp://x': unsupported scheme 'ftp' (use socks5://, socks5h:// or http://)",
        ),
        ("socks4://h:1", "unsupported scheme 'socks4'"),
        ("https://h:443", "https:// proxies (TLS to the proxy) are not supported"),
        ("proxy.example:3128", "expected scheme://host:port"),
        ("", "expected scheme://host:port"),
        ("socks5://", "missing host"),
        ("socks5://:1080", "missing host"),
        ("http://user:pw@", "missing host"),
        ("socks5://[]:1", "is not an IPv6 address"),
        ("socks5://h:", "bad port ''"),
        ("socks5://h:0", "bad port '0'"),
        ("socks5://h:65536", "bad port '65536'"),
        ("socks5://h:-1", "bad port '-1'"),
        ("socks5://h:\uff11\uff12", "bad port"),  # fullwidth digits are not a port
        ("socks5://h:80x", "bad port '80x'"),
        ("socks5://::1:1080", "IPv6 addresses must be in brackets"),
        ("socks5://[::1:1080", "missing ']'"),
        ("socks5://[::1]x", "unexpected 'x' after ']'"),
        ("socks5://[10.0.0.1]:1", "'10.0.0.1' is not an IPv6 address"),
        ("socks5://h:1/path", "unexpected '/path' after host:port"),
        ("socks5://h:1?x=1", "unexpected '?x=1'"),
        ("socks5://bad host:1", "invalid host 'bad host'"),
        ("socks5://u:%FF@h", "not valid percent-encoded UTF-8"),
    ],
)
def test_parse_proxy_rejects(url, message):
    with pytest.raises(ValueError) as info:
        parse_proxy(url)
    assert message in str(info.value)


def test_display_and_repr_hide_the_password():
    proxy = parse_proxy("socks5://alice:hunter2@[::1]:1080")
    assert proxy.display == "socks5://alice:***@[::1]:1080"
    assert str(proxy) == proxy.display
    assert "hunter2" not in repr(proxy)
    assert Proxy("http", "h", 1).display == "http://h:1"
    assert Proxy("http", "h", 1, "a@b").display == "http://a%40b@h:1"


def test_errors_mask_the_password():
    with pytest.raises(ValueError) as info:
        parse_proxy("socks5://alice:hunter2@proxy:notaport")
    assert "hunter2" not in str(info.value)
    assert "alice:***@proxy:notaport" in str(info.value)
    with pytest.raises(ValueError) as info:
        parse_proxy("alice:hunter2@proxy:1080")  # scheme forgotten
    assert "hunter2" not in str(info.value)


@given(st.sampled_from(["", "socks5://", "socks5h://", "http://", "https://"]), st.text())
def test_parse_proxy_only_raises_value_error(prefix, rest):
    try:
        proxy = parse_proxy(prefix + rest)
    except ValueError:
        return
    assert proxy.scheme in ("socks5", "socks5h", "http")
    assert 0 < proxy.port < 65536 and proxy.host


@given(
    st.sampled_from(["socks5", "socks5h", "http"]),
    st.text(max_size=20),
    st.text(max_size=20),
    st.sampled_from(["proxy.example", "10.1.2.3", "[fd00::1]", "p-1_x.internal"]),
    st.integers(1, 65535),
)
def test_parse_proxy_round_trips_quoted_credentials(scheme, user, password, host, port):
    from urllib.parse import quote

    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user or password else ""
    proxy = parse_proxy(f"{scheme}://{auth}{host}:{port}")
    assert proxy == Proxy(scheme, host.strip("[]"), port, user, password)


@given(st.from_regex(r"[0-9]{6,12}", fullmatch=True), st.text())
def test_parse_errors_never_quote_the_password(digits, tail):
    secret = f"S3CR{digits}"
    try:
        parse_proxy(f"socks5://user:{secret}@{tail}")
    except ValueError as exc:
        assert secret not in str(exc)


# --- proxy_from_env ----------------------------------------------------------------------

P = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    "env, scheme, expected",
    [
        ({}, "wss", None),
        ({"HTTPS_PROXY": P}, "wss", P),
        ({"HTTPS_PROXY": P}, "ws", None),  # ws:// does not use the HTTPS proxy
        ({"HTTP_PROXY": P}, "ws", P),
        ({"HTTP_PROXY": P}, "wss", None),
        ({"http_proxy": P}, "ws", P),
        ({"https_proxy": "socks5h://s:1"}, "wss", "socks5h://s:1"),
        ({"ALL_PROXY": P}, "wss", P),
        ({"all_proxy": P}, "ws", P),
        ({"ALL_PROXY": "socks5://a:1", "HTTPS_PROXY": P}, "wss", P),  # specific beats ALL
        (
            {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1"},
            "wss",
            "http://lower:1",
        ),
        ({"http_proxy": "http://lower:1", "HTTP_PROXY": "http://upper:1"}, "ws", "http://lower:1"),
        ({"all_proxy": "http://lower:1", "ALL_PROXY": "http://upper:1"}, "ws", "http://lower:1"),
        ({"https_proxy": "", "HTTPS_PROXY": P}, "wss", P),  # empty counts as unset (curl)
        ({"HTTPS_PROXY": "  "}, "wss", None),
        ({"HTTPS_PROXY": "proxy.corp:3128"}, "wss", P),  # no scheme: HTTP proxy, as curl
        ({"HTTPS_PROXY": "u:p%20w@proxy.corp"}, "WSS", "http://u:***@proxy.corp:8080"),
    ],
)
def test_proxy_from_env_variables(env, scheme, expected):
    proxy = proxy_from_env(scheme, "server.example", 443, env)
    if expected is None:
        assert proxy is None
    else:
        assert proxy is not None and proxy.display == parse_proxy(expected).display


def test_proxy_from_env_keeps_credentials():
    proxy = proxy_from_env("wss", "h", 443, {"HTTPS_PROXY": "u:p%20w@proxy.corp"})
    assert proxy == Proxy("http", "proxy.corp", 8080, "u", "p w")


@pytest.mark.parametrize(
    "no_proxy, host, port, excluded",
    [
        ("", "server.example", 443, False),
        ("*", "server.example", 443, True),
        ("*", "10.0.0.1", 80, True),
        ("foo.example, *", "server.example", 443, True),
        (".example.com", "example.com", 443, True),
        (".example.com", "a.b.example.com", 443, True),
        (".example.com", "notexample.com", 443, False),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        ("example.com", "example.com.evil.net", 443, False),
        ("example.com", "example.org", 443, False),
        ("*.example.com", "a.example.com", 443, True),
        ("EXAMPLE.com", "Api.Example.COM", 443, True),
        ("example.com", "example.com.", 443, True),  # trailing dot of a FQDN
        ("foo.test,example.com", "example.com", 443, True),
        ("foo.test example.com", "example.com", 443, True),
        ("foo.test, ,bar.test", "example.com", 443, False),
        ("example.com:443", "example.com", 443, True),
        ("example.com:443", "example.com", 8443, False),
        ("10.0.0.0/8", "10.20.30.40", 443, True),
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("10.0.0.0/8", "10.example", 443, False),
        ("192.168.1.7", "192.168.1.7", 443, True),
        ("192.168.1.7", "192.168.1.8", 443, False),
        ("192.168.1.7:80", "192.168.1.7", 443, False),
        ("::1", "::1", 443, True),
        ("::1", "[::1]", 443, True),
        ("::1", "127.0.0.1", 443, False),
        ("127.0.0.0/8", "::1", 443, False),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("fd00::/8", "fd12:3456::1", 443, True),
        ("fd00::/8", "fe80::1", 443, False),
        # loopback is not special: only what NO_PROXY says (curl)
        ("", "127.0.0.1", 443, False),
        ("", "localhost", 443, False),
        ("localhost", "localhost", 443, True),
        # malformed entries are skipped, not fatal
        ("example.com:http,[::1", "example.com", 443, False),
    ],
)
def test_no_proxy(no_proxy, host, port, excluded):
    assert no_proxy_matches(no_proxy, host, port) is excluded
    env = {"HTTPS_PROXY": P, "NO_PROXY": no_proxy}
    assert (proxy_from_env("wss", host, port, env) is None) is excluded


def test_lowercase_no_proxy_wins():
    env = {"HTTPS_PROXY": P, "no_proxy": "a.test", "NO_PROXY": "b.test"}
    assert proxy_from_env("wss", "a.test", 443, env) is None
    assert proxy_from_env("wss", "b.test", 443, env) is not None


def test_bad_environment_proxy_names_the_variable():
    with pytest.raises(ValueError, match=r"^environment variable https_proxy: .*'ftp'"):
        proxy_from_env("wss", "h", 443, {"https_proxy": "ftp://x"})
    with pytest.raises(ValueError, match=r"environment variable ALL_PROXY: .*bad port"):
        proxy_from_env("ws", "h", 80, {"ALL_PROXY": "socks5://h:99999"})
    # A bad value that NO_PROXY makes irrelevant does not stop anything.
    assert proxy_from_env("wss", "h", 443, {"https_proxy": "ftp://x", "NO_PROXY": "h"}) is None


def test_proxy_from_env_rejects_other_schemes():
    with pytest.raises(ValueError, match="'ws' or 'wss'"):
        proxy_from_env("https", "h", 443, {})
