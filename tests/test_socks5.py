"""SOCKS5 sans-IO: incremental parsing, builders, round trips and error mapping."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trisocks.wire import socks5 as s
from trisocks.wire.names import host_error
from trisocks.wire.socks5 import Request, Socks5Error


def feed(parse: Callable[[Any], Any], data: bytes) -> Any:
    """Feed ``data`` byte by byte: ``None`` until complete, then the same result
    whatever follows and whatever the buffer type."""
    for n in range(len(data)):
        assert parse(data[:n]) is None, f"complete after {n} of {len(data)} bytes"
    result = parse(data)
    assert result is not None
    assert result[-1] == len(data)
    assert parse(data + b"\x05\x00 trailing") == result
    assert parse(bytearray(data)) == result
    assert parse(memoryview(data)) == result
    return result


# --- server side parsers ------------------------------------------------------


def test_parse_greeting() -> None:
    assert feed(s.parse_greeting, b"\x05\x02\x00\x02") == (b"\x00\x02", 4)
    assert feed(s.parse_greeting, b"\x05\x01\x00") == (b"\x00", 3)
    methods = bytes(range(255))
    assert feed(s.parse_greeting, b"\x05\xff" + methods) == (methods, 257)


def test_parse_greeting_errors() -> None:
    with pytest.raises(Socks5Error) as info:
        s.parse_greeting(b"\x04")  # SOCKS4: refused as soon as the first byte is in
    assert info.value.reply is None
    with pytest.raises(Socks5Error) as info:
        s.parse_greeting(b"GET / HTTP/1.1\r\n")
    assert info.value.reply is None
    with pytest.raises(Socks5Error) as info:
        s.parse_greeting(b"\x05\x00")
    assert info.value.reply is None


def test_parse_userpass() -> None:
    assert feed(s.parse_userpass, b"\x01\x04user\x06secret") == (b"user", b"secret", 13)
    assert feed(s.parse_userpass, b"\x01\x00\x00") == (b"", b"", 3)
    unicode = "пароль".encode()
    assert feed(s.parse_userpass, b"\x01\x01u" + bytes((len(unicode),)) + unicode) == (
        b"u",
        unicode,
        4 + len(unicode),
    )


def test_parse_userpass_gives_bytes_as_sent() -> None:
    # RFC 1929 credentials are bytes: any byte (0xFF included) is kept, compared as such
    assert s.parse_userpass(b"\x01\x01\xff\x01\xfe") == (b"\xff", b"\xfe", 5)
    assert s.client_userpass(b"\xff", b"\xfe") == b"\x01\x01\xff\x01\xfe"


def test_parse_userpass_bad_version() -> None:
    with pytest.raises(Socks5Error) as info:
        s.parse_userpass(b"\x05\x04user\x04pass")
    assert info.value.reply is None


REQUESTS = [
    (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", Request(s.CMD_CONNECT, "127.0.0.1", 80, 1)),
    (
        b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
        Request(s.CMD_CONNECT, "example.com", 443, s.ATYP_DOMAIN),
    ),
    (
        b"\x05\x03\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\xff\xff",
        Request(s.CMD_UDP_ASSOCIATE, "2001:db8::1", 65535, s.ATYP_IPV6),
    ),
    (
        b"\x05\x02\x00\x04" + bytes(15) + b"\x01\x00\x00",
        Request(s.CMD_BIND, "::1", 0, s.ATYP_IPV6),
    ),
    (
        b"\x05\x01\x00\x03\x09" + "bücher.de".encode()[:9] + b"\x00\x50",
        Request(s.CMD_CONNECT, "bücher.d", 80, s.ATYP_DOMAIN),
    ),
    # RSV is not checked: servers in the wild ignore it.
    (b"\x05\x01\x07\x01\x0a\x00\x00\x01\x1f\x90", Request(s.CMD_CONNECT, "10.0.0.1", 8080, 1)),
]


@pytest.mark.parametrize(("raw", "expected"), REQUESTS)
def test_parse_request(raw: bytes, expected: Request) -> None:
    assert feed(s.parse_request, raw) == (expected, len(raw))


REQUEST_ERRORS = [
    (b"\x04", None),
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01", None),  # SOCKS4 request
    (b"\x05\x00", s.COMMAND_NOT_SUPPORTED),
    (b"\x05\x04\x00\x01\x7f\x00\x00\x01\x00\x50", s.COMMAND_NOT_SUPPORTED),
    (b"\x05\x01\x00\x02", s.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x05\x01\x00\x00\x7f\x00\x00\x01\x00\x50", s.ADDRESS_TYPE_NOT_SUPPORTED),
    # a name nobody could resolve is answered like one that does not resolve
    (b"\x05\x01\x00\x03\x00", s.HOST_UNREACHABLE),  # empty domain
    (b"\x05\x01\x00\x03\x02\xc3\x28\x00\x50", s.HOST_UNREACHABLE),  # not UTF-8
    (b"\x05\x01\x00\x03\x03a\x00b\x00\x50", s.HOST_UNREACHABLE),  # NUL
    (b"\x05\x01\x00\x03\x04a..b\x00\x50", s.HOST_UNREACHABLE),  # empty label
    (b"\x05\x01\x00\x03\x44" + b"x" * 64 + b".com\x00\x50", s.HOST_UNREACHABLE),  # label > 63
    (b"\x05\x01\x00\x03\xff" + b"a." * 127 + b"a\x00\x50", s.HOST_UNREACHABLE),  # name > 253
    (b"\x05\x01\x00\x03\x07\xe2\x98\x83.net\x00\x50", s.HOST_UNREACHABLE),  # not IDNA
]


@pytest.mark.parametrize(("raw", "code"), REQUEST_ERRORS)
def test_parse_request_errors(raw: bytes, code: int | None) -> None:
    with pytest.raises(Socks5Error) as info:
        s.parse_request(raw)
    assert info.value.reply == code


def test_parse_request_errors_fire_as_soon_as_the_bad_byte_arrives() -> None:
    for raw, code in [
        (b"\x05\x09", s.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05", s.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00", s.HOST_UNREACHABLE),
    ]:
        assert s.parse_request(raw[:-1]) is None
        with pytest.raises(Socks5Error) as info:
            s.parse_request(raw)
        assert info.value.reply == code


# --- server side builders -----------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "need_auth", "method"),
    [
        (b"\x00", False, s.NO_AUTH),
        (b"\x00\x02", False, s.NO_AUTH),
        (b"\x02\x00", True, s.USERPASS),
        (b"\x02", False, s.NO_ACCEPTABLE),
        (b"\x00", True, s.NO_ACCEPTABLE),
        (b"\x01", False, s.NO_ACCEPTABLE),
        (b"\x01\x80", True, s.NO_ACCEPTABLE),
    ],
)
def test_choose_method(offered: bytes, need_auth: bool, method: int) -> None:
    assert s.choose_method(offered, need_auth) == method


def test_small_replies() -> None:
    assert s.method_reply(s.NO_AUTH) == b"\x05\x00"
    assert s.method_reply(s.NO_ACCEPTABLE) == b"\x05\xff"
    assert s.userpass_reply(True) == b"\x01\x00"
    assert s.userpass_reply(False) == b"\x01\x01"


@pytest.mark.parametrize(
    ("args", "raw"),
    [
        ((s.SUCCEEDED,), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((s.CONNECTION_REFUSED,), b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((s.SUCCEEDED, "192.168.1.2", 1080), b"\x05\x00\x00\x01\xc0\xa8\x01\x02\x04\x38"),
        ((s.SUCCEEDED, "::1", 443), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"),
        ((s.SUCCEEDED, "proxy.example", 80), b"\x05\x00\x00\x03\x0dproxy.example\x00\x50"),
    ],
)
def test_reply(args: tuple[Any, ...], raw: bytes) -> None:
    assert s.reply(*args) == raw


@pytest.mark.parametrize(
    ("host", "port"), [("", 0), ("x" * 256, 0), ("127.0.0.1", 65536), ("127.0.0.1", -1)]
)
def test_unencodable_addresses(host: str, port: int) -> None:
    for build in (
        lambda: s.reply(s.SUCCEEDED, host, port),
        lambda: s.client_request(s.CMD_CONNECT, host, port),
        lambda: s.udp_header(host, port),
    ):
        with pytest.raises(ValueError):
            build()


# --- client side --------------------------------------------------------------


def test_client_greeting_round_trip() -> None:
    assert s.client_greeting(False) == b"\x05\x01\x00"
    offered, _ = s.parse_greeting(s.client_greeting(True))  # type: ignore[misc]
    assert s.choose_method(offered, need_auth=True) == s.USERPASS
    assert s.choose_method(offered, need_auth=False) == s.NO_AUTH
    offered, _ = s.parse_greeting(s.client_greeting(False))  # type: ignore[misc]
    assert s.choose_method(offered, need_auth=True) == s.NO_ACCEPTABLE


def test_client_userpass_round_trip() -> None:
    raw = s.client_userpass("alice", "s3cr3t☃")
    assert feed(s.parse_userpass, raw) == (b"alice", "s3cr3t☃".encode(), len(raw))
    with pytest.raises(ValueError):
        s.client_userpass("u" * 256, "p")
    with pytest.raises(ValueError):
        s.client_userpass("u", "é" * 128)


def test_parse_method_reply() -> None:
    assert feed(s.parse_method_reply, s.method_reply(s.USERPASS)) == (s.USERPASS, 2)
    assert feed(s.parse_method_reply, b"\x05\xff") == (s.NO_ACCEPTABLE, 2)
    with pytest.raises(Socks5Error):
        s.parse_method_reply(b"\x04\x00")


def test_parse_userpass_reply() -> None:
    assert feed(s.parse_userpass_reply, s.userpass_reply(True)) == (True, 2)
    assert feed(s.parse_userpass_reply, s.userpass_reply(False)) == (False, 2)
    assert s.parse_userpass_reply(b"\x05\x00") == (True, 2)  # a common server quirk
    with pytest.raises(Socks5Error):
        s.parse_userpass_reply(b"\x02\x00")


@pytest.mark.parametrize(
    ("host", "atyp", "canonical"),
    [
        ("127.0.0.1", s.ATYP_IPV4, "127.0.0.1"),
        ("2001:DB8:0:0::1", s.ATYP_IPV6, "2001:db8::1"),
        # IPv4-mapped: whatever text this Python's ipaddress calls canonical
        ("::ffff:1.2.3.4", s.ATYP_IPV6, str(ipaddress.ip_address("::ffff:1.2.3.4"))),
        ("example.com", s.ATYP_DOMAIN, "example.com"),
        ("例え.jp", s.ATYP_DOMAIN, "例え.jp"),
        ("1.2.3", s.ATYP_DOMAIN, "1.2.3"),  # not an IP literal for ipaddress
    ],
)
def test_client_request_round_trip(host: str, atyp: int, canonical: str) -> None:
    raw = s.client_request(s.CMD_CONNECT, host, 8080)
    assert raw[3] == atyp
    assert feed(s.parse_request, raw) == (Request(s.CMD_CONNECT, canonical, 8080, atyp), len(raw))


def test_parse_reply() -> None:
    for code, host, port in [
        (s.SUCCEEDED, "10.1.2.3", 40000),
        (s.HOST_UNREACHABLE, "0.0.0.0", 0),
        (s.SUCCEEDED, "fe80::1", 1),
        (s.SUCCEEDED, "bound.example", 65535),
    ]:
        raw = s.reply(code, host, port)
        assert feed(s.parse_reply, raw) == (code, host, port, len(raw))
    with pytest.raises(Socks5Error):
        s.parse_reply(b"\x04\x5a\x00\x00\x00\x00\x00\x00")
    with pytest.raises(Socks5Error):
        s.parse_reply(b"\x05\x00\x00\x09")


# --- UDP ----------------------------------------------------------------------


def test_udp_header_round_trip() -> None:
    for host in ("8.8.8.8", "2001:4860:4860::8888", "dns.google"):
        header = s.udp_header(host, 53)
        assert header[:3] == b"\x00\x00\x00"
        assert s.parse_udp_header(header + b"payload") == (0, host, 53, len(header))
        assert s.parse_udp_header(bytearray(header)) == (0, host, 53, len(header))


def test_udp_header_golden_and_fragments() -> None:
    raw = b"\x00\x00\x00\x01\x01\x02\x03\x04\x00\x35query"
    assert s.parse_udp_header(raw) == (0, "1.2.3.4", 53, 10)
    assert s.parse_udp_header(b"\x00\x00\x01" + raw[3:])[0] == 1  # caller drops fragments


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x01\x01\x02\x03\x04\x00",
        b"\x00\x00\x00\x03\x05abc",
        b"\x00\x00\x00\x03\x00\x00\x35",
        b"\x00\x00\x00\x02\x01\x02\x03\x04\x00\x35",
    ],
)
def test_udp_header_malformed(raw: bytes) -> None:
    with pytest.raises(Socks5Error) as info:
        s.parse_udp_header(raw)
    assert info.value.reply is None


# --- property tests -----------------------------------------------------------

ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(lambda a: a.compressed)


def _not_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return True
    return False


labels = st.text(alphabet="abcxyz019-_", min_size=1, max_size=63)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(_not_ip)
hosts = ipv4s | ipv6s | domains
# anything a peer may put in a domain field: the parsers refuse what names.check_host refuses
any_domains = st.text(min_size=1, max_size=63).filter(_not_ip)
ports = st.integers(0, 0xFFFF)


@given(st.sampled_from([s.CMD_CONNECT, s.CMD_BIND, s.CMD_UDP_ASSOCIATE]), hosts, ports)
def test_property_request_round_trip(command: int, host: str, port: int) -> None:
    raw = s.client_request(command, host, port)
    request, consumed = s.parse_request(raw)  # type: ignore[misc]
    assert (request.command, request.host, request.port, consumed) == (
        command,
        host,
        port,
        len(raw),
    )


@given(st.sampled_from([s.CMD_CONNECT, s.CMD_UDP_ASSOCIATE]), any_domains, ports)
def test_property_request_names_are_checked(command: int, host: str, port: int) -> None:
    raw = s.client_request(command, host, port)
    try:
        request, _ = s.parse_request(raw)  # type: ignore[misc]
    except Socks5Error as exc:
        assert exc.reply == s.HOST_UNREACHABLE
        assert host_error(host) is not None
    else:
        assert request.host == host and host_error(host) is None


@given(st.integers(0, 255), hosts | any_domains, ports)
def test_property_reply_round_trip(code: int, host: str, port: int) -> None:
    raw = s.reply(code, host, port)
    assert s.parse_reply(raw) == (code, host, port, len(raw))


@given(hosts, ports, st.binary(max_size=64))
def test_property_udp_round_trip(host: str, port: int, payload: bytes) -> None:
    datagram = s.udp_header(host, port) + payload
    frag, got_host, got_port, offset = s.parse_udp_header(datagram)
    assert (frag, got_host, got_port, datagram[offset:]) == (0, host, port, payload)


@given(st.binary(max_size=255), st.binary(max_size=255))
def test_property_userpass_round_trip(user: bytes, password: bytes) -> None:
    raw = s.client_userpass(user, password)
    assert s.parse_userpass(raw) == (user, password, len(raw))


PARSERS = [
    s.parse_greeting,
    s.parse_userpass,
    s.parse_request,
    s.parse_method_reply,
    s.parse_userpass_reply,
    s.parse_reply,
    s.parse_udp_header,
]


@given(
    st.sampled_from(PARSERS), st.sampled_from([b"", b"\x05", b"\x01", b"\x05\x01\x00"]), st.binary()
)
def test_property_random_bytes(parse: Callable[[bytes], Any], prefix: bytes, raw: bytes) -> None:
    try:
        result = parse(prefix + raw)
    except Socks5Error:
        return
    assert result is None or isinstance(result, tuple)


# --- failures -> reply codes --------------------------------------------------


class TooSlowError(Exception):
    """Stands in for trio.TooSlowError: matched by name, not imported."""


def _trio_style_failure(*errors: OSError) -> OSError:
    """What trio.open_tcp_stream raises when every address fails."""
    try:
        raise OSError("all attempts to connect to x:1 failed") from ExceptionGroup("x", errors)
    except OSError as exc:
        return exc


def _cause_loop() -> BaseException:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    return a


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConnectionRefusedError(), s.CONNECTION_REFUSED),
        (OSError(errno.ECONNREFUSED, "Connection refused"), s.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), s.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "No route to host"), s.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), s.HOST_UNREACHABLE),
        (socket.gaierror(), s.HOST_UNREACHABLE),
        (TimeoutError(), s.TTL_EXPIRED),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), s.TTL_EXPIRED),
        (TooSlowError(), s.TTL_EXPIRED),
        (trio.TooSlowError(), s.TTL_EXPIRED),
        (OSError(errno.EACCES, "Permission denied"), s.NOT_ALLOWED),
        (OSError(errno.EPERM, "Operation not permitted"), s.NOT_ALLOWED),
        (PermissionError(), s.NOT_ALLOWED),
        (OSError(errno.ECONNRESET, "reset"), s.GENERAL_FAILURE),
        (OSError("no errno"), s.GENERAL_FAILURE),
        (ValueError("bad"), s.GENERAL_FAILURE),
        (_trio_style_failure(ConnectionRefusedError(), ConnectionRefusedError()), 5),
        (
            _trio_style_failure(
                OSError(errno.ENETUNREACH, "Network is unreachable"),  # no IPv6 route
                ConnectionRefusedError(),
            ),
            s.CONNECTION_REFUSED,
        ),
        (_trio_style_failure(OSError(errno.ENETUNREACH, "x")), s.NETWORK_UNREACHABLE),
        (_trio_style_failure(OSError(errno.ECONNRESET, "x")), s.GENERAL_FAILURE),
        (ExceptionGroup("g", [TimeoutError(), ValueError()]), s.TTL_EXPIRED),
        (_cause_loop(), s.GENERAL_FAILURE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_reply_for_exception(exc: BaseException, code: int) -> None:
    assert s.reply_for_exception(exc) == code


GO_AND_PYTHON_TEXTS = [
    # LinkSocks (Go net errors)
    ("dial tcp 127.0.0.1:1: connect: connection refused", s.CONNECTION_REFUSED),
    ("dial tcp 10.255.255.1:80: i/o timeout", s.TTL_EXPIRED),
    ("dial tcp 192.0.2.1:80: connect: connection timed out", s.TTL_EXPIRED),
    ("dial tcp: lookup nonexistent.invalid: no such host", s.HOST_UNREACHABLE),
    ("dial tcp: lookup nonexistent.invalid on 127.0.0.53:53: no such host", 4),
    ("dial tcp: lookup x on 127.0.0.53:53: read udp: connection refused", 4),
    ("dial tcp: lookup x: i/o timeout", s.HOST_UNREACHABLE),
    ("dial tcp [2001:db8::1]:80: connect: network is unreachable", s.NETWORK_UNREACHABLE),
    ("dial tcp 192.0.2.1:80: connect: no route to host", s.HOST_UNREACHABLE),
    ("dial tcp 192.0.2.1:80: connect: host is down", s.HOST_UNREACHABLE),
    ("dial tcp 127.0.0.1:80: connect: permission denied", s.NOT_ALLOWED),
    ("context deadline exceeded", s.TTL_EXPIRED),
    ("no available reverse clients", s.GENERAL_FAILURE),
    ("invalid port number: 0", s.GENERAL_FAILURE),
    # pywssocks (Python exception texts)
    ("Failed to resolve address: [Errno -2] Name or service not known", s.HOST_UNREACHABLE),
    ("[Errno -3] Temporary failure in name resolution", s.HOST_UNREACHABLE),
    ("[Errno 101] Network is unreachable", s.NETWORK_UNREACHABLE),
    ("[Errno 113] No route to host", s.HOST_UNREACHABLE),
    ("timed out", s.TTL_EXPIRED),
    (
        (
            "[WinError 10061] No connection could be made because the target machine "
            "actively refused it"
        ),
        s.CONNECTION_REFUSED,
    ),
    # case and emptiness
    ("CONNECTION REFUSED", s.CONNECTION_REFUSED),
    ("Network Unreachable", s.NETWORK_UNREACHABLE),
    ("", s.GENERAL_FAILURE),
    ("something else entirely", s.GENERAL_FAILURE),
]


@pytest.mark.parametrize(("text", "code"), GO_AND_PYTHON_TEXTS)
def test_reply_for_error_text(text: str, code: int) -> None:
    assert s.reply_for_error_text(text) == code


def test_reply_for_errno_only_text() -> None:
    # asyncio says "[Errno 111] Connect call failed (...)": only the number tells.
    text = f"[Errno {errno.ECONNREFUSED}] Connect call failed ('127.0.0.1', 1)"
    assert s.reply_for_error_text(text) == s.CONNECTION_REFUSED
    assert s.reply_for_error_text(f"[Errno {errno.EHOSTUNREACH}] x") == s.HOST_UNREACHABLE
    assert s.reply_for_error_text("[Errno 99999] x") == s.GENERAL_FAILURE


FAILURE_CODES = [
    s.GENERAL_FAILURE,
    s.NOT_ALLOWED,
    s.NETWORK_UNREACHABLE,
    s.HOST_UNREACHABLE,
    s.CONNECTION_REFUSED,
    s.TTL_EXPIRED,
    s.COMMAND_NOT_SUPPORTED,
    s.ADDRESS_TYPE_NOT_SUPPORTED,
]


@pytest.mark.parametrize("code", FAILURE_CODES)
def test_error_text_round_trip(code: int) -> None:
    text = s.error_text(code)
    assert text == text.lower() and len(text.encode()) <= 255
    assert s.reply_for_error_text(text) == code


def test_error_text_examples() -> None:
    assert s.error_text(s.CONNECTION_REFUSED) == "connection refused"
    assert s.error_text(s.NETWORK_UNREACHABLE) == "network unreachable"
    assert s.error_text(s.HOST_UNREACHABLE) == "host unreachable"
    assert s.error_text(s.TTL_EXPIRED) == "connection timed out"
    assert s.error_text(s.NOT_ALLOWED) == "not allowed"
    assert s.error_text(s.GENERAL_FAILURE) == "general failure"
    assert s.error_text(200) == "general failure"


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        OSError(errno.ENETUNREACH, "x"),
        OSError(errno.EHOSTUNREACH, "x"),
        socket.gaierror(),
        TimeoutError(),
        PermissionError(),
        RuntimeError(),
    ],
    ids=repr,
)
def test_exception_and_text_agree(exc: BaseException) -> None:
    # Whatever our dial failure maps to survives the trip through a ConnectResponse.
    code = s.reply_for_exception(exc)
    assert s.reply_for_error_text(s.error_text(code)) == code
