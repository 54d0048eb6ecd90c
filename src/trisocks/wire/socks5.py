"""SOCKS5 (RFC 1928) with username/password auth (RFC 1929), sans-IO.

The ``parse_*`` functions read from the front of a bytes-like buffer and return
``None`` while it holds an incomplete message, so a caller can append what it
receives and retry; once complete they return the value and how many bytes it
took. They raise :class:`Socks5Error` as soon as the bytes seen so far are
wrong, carrying the reply code (if any) to answer with before closing. The
builders return bytes. Nothing here does I/O.

The ``reply_for_*`` and :func:`error_text` functions translate connect failures
(our own, as exceptions, or a remote peer's, as LinkSocks error text) into
SOCKS5 reply codes.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from dataclasses import dataclass
from socket import gaierror
from typing import TypeAlias

from .names import BAD_HOST_TEXT, BadHostName, check_host

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "COMMAND_NOT_SUPPORTED",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "GSSAPI",
    "HOST_UNREACHABLE",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "NO_ACCEPTABLE",
    "NO_AUTH",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "USERPASS",
    "VERSION",
    "Request",
    "Socks5Error",
    "choose_method",
    "client_greeting",
    "client_request",
    "client_userpass",
    "error_text",
    "method_reply",
    "parse_greeting",
    "parse_method_reply",
    "parse_reply",
    "parse_request",
    "parse_udp_header",
    "parse_userpass",
    "parse_userpass_reply",
    "reply",
    "reply_for_error_text",
    "reply_for_exception",
    "udp_header",
    "userpass_reply",
]

VERSION = 5
USERPASS_VERSION = 1  # RFC 1929 sub-negotiation

NO_AUTH, GSSAPI, USERPASS, NO_ACCEPTABLE = 0x00, 0x01, 0x02, 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

SUCCEEDED = 0
GENERAL_FAILURE = 1
NOT_ALLOWED = 2
NETWORK_UNREACHABLE = 3
HOST_UNREACHABLE = 4
CONNECTION_REFUSED = 5
TTL_EXPIRED = 6
COMMAND_NOT_SUPPORTED = 7
ADDRESS_TYPE_NOT_SUPPORTED = 8

Buffer: TypeAlias = bytes | bytearray | memoryview


class Socks5Error(Exception):
    """The peer sent something we cannot accept.

    ``reply`` is the reply code to send before closing, or ``None`` to close at
    once (when the peer does not speak SOCKS5 there is nobody to answer).
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Request:
    command: int
    host: str  # canonical IP text for ATYP_IPV4/ATYP_IPV6, else the domain name
    port: int
    atyp: int


# --- addresses ----------------------------------------------------------------


def _parse_address(
    buf: Buffer, pos: int, atyp: int, bad_atyp: int | None, bad_name: int | None,
    check: bool = True,
) -> tuple[str, int, int] | None:
    """ATYP-specific DST/BND address plus port at ``pos``: (host, port, end).

    With ``check`` a domain name must be one a resolver can be asked about
    (:func:`trisocks.wire.names.check_host`): a destination is checked here, once, so that
    nothing downstream meets a NUL, an empty or overlong label or a non-IDNA name.
    """
    if atyp == ATYP_IPV4:
        end = pos + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[pos:end])))
    elif atyp == ATYP_IPV6:
        end = pos + 16
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[pos:end])).compressed
    elif atyp == ATYP_DOMAIN:
        if len(buf) <= pos:
            return None
        if buf[pos] == 0:
            raise Socks5Error("empty domain name", bad_name)
        end = pos + 1 + buf[pos]
        if len(buf) < end + 2:
            return None
        try:
            host = bytes(buf[pos + 1 : end]).decode()
        except UnicodeDecodeError:
            raise Socks5Error("domain name is not valid UTF-8", bad_name) from None
        if check:
            try:
                check_host(host)
            except BadHostName as exc:
                raise Socks5Error(f"{BAD_HOST_TEXT}: {exc}", bad_name) from None
    else:
        raise Socks5Error(f"unknown address type {atyp}", bad_atyp)
    return host, (buf[end] << 8) | buf[end + 1], end + 2


def _address(host: str, port: int) -> bytes:
    """ATYP, address and port for ``host``: IP literals as such, else a domain."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0..65535")
    tail = port.to_bytes(2, "big")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode()
        if not 0 < len(raw) <= 255:
            raise ValueError(f"domain name must be 1..255 bytes, got {len(raw)}") from None
        return bytes((ATYP_DOMAIN, len(raw))) + raw + tail
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + tail


def _check_version(buf: Buffer, expected: int, what: str) -> None:
    if buf[0] != expected:
        raise Socks5Error(f"{what}: version {buf[0]}, expected {expected}")


# --- server side --------------------------------------------------------------


def parse_greeting(buf: Buffer) -> tuple[bytes, int] | None:
    """VER NMETHODS METHODS -> (methods offered, consumed)."""
    if not buf:
        return None
    _check_version(buf, VERSION, "greeting")
    if len(buf) < 2:
        return None
    n = buf[1]
    if n == 0:
        raise Socks5Error("greeting offers no authentication method")
    if len(buf) < 2 + n:
        return None
    return bytes(buf[2 : 2 + n]), 2 + n


def parse_userpass(buf: Buffer) -> tuple[bytes, bytes, int] | None:
    """RFC 1929 VER ULEN UNAME PLEN PASSWD -> (user, password, consumed).

    Credentials are bytes, as RFC 1929 defines them: they are compared as bytes, so any
    byte (0xFF included) is just one more way not to match.
    """
    if not buf:
        return None
    _check_version(buf, USERPASS_VERSION, "username/password")
    if len(buf) < 2:
        return None
    ulen_end = 2 + buf[1]
    if len(buf) <= ulen_end:
        return None
    end = ulen_end + 1 + buf[ulen_end]
    if len(buf) < end:
        return None
    return bytes(buf[2:ulen_end]), bytes(buf[ulen_end + 1 : end]), end


def parse_request(buf: Buffer) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT -> (request, consumed)."""
    if not buf:
        return None
    _check_version(buf, VERSION, "request")
    if len(buf) < 2:
        return None
    command = buf[1]
    if command not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
        raise Socks5Error(f"unknown command {command}", COMMAND_NOT_SUPPORTED)
    if len(buf) < 4:
        return None
    # RSV (buf[2]) must be 0 per RFC 1928; like most servers we do not care.
    atyp = buf[3]
    # A name we cannot use is answered like one that does not resolve, as the far side would.
    parsed = _parse_address(buf, 4, atyp, ADDRESS_TYPE_NOT_SUPPORTED, HOST_UNREACHABLE)
    if parsed is None:
        return None
    host, port, end = parsed
    return Request(command, host, port, atyp), end


def choose_method(offered: bytes, need_auth: bool) -> int:
    """The method to answer a greeting with."""
    method = USERPASS if need_auth else NO_AUTH
    return method if method in offered else NO_ACCEPTABLE


def method_reply(method: int) -> bytes:
    return bytes((VERSION, method))


def userpass_reply(ok: bool) -> bytes:
    return bytes((USERPASS_VERSION, 0 if ok else 1))


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT; ``host`` is an IP literal or a domain."""
    return bytes((VERSION, code, 0)) + _address(host, port)


# --- client side --------------------------------------------------------------


def client_greeting(with_auth: bool) -> bytes:
    # With credentials we still offer NO_AUTH: a server that needs none may pick it.
    if with_auth:
        return bytes((VERSION, 2, NO_AUTH, USERPASS))
    return bytes((VERSION, 1, NO_AUTH))


def client_userpass(user: str | bytes, password: str | bytes) -> bytes:
    u = user if isinstance(user, bytes) else user.encode(errors="surrogateescape")
    p = password if isinstance(password, bytes) else password.encode(errors="surrogateescape")
    if len(u) > 255 or len(p) > 255:
        raise ValueError("username and password are limited to 255 bytes each")
    return bytes((USERPASS_VERSION, len(u))) + u + bytes((len(p),)) + p


def parse_method_reply(buf: Buffer) -> tuple[int, int] | None:
    """VER METHOD -> (method chosen, consumed)."""
    if not buf:
        return None
    _check_version(buf, VERSION, "method reply")
    if len(buf) < 2:
        return None
    return buf[1], 2


def parse_userpass_reply(buf: Buffer) -> tuple[bool, int] | None:
    """VER STATUS -> (accepted, consumed)."""
    if not buf:
        return None
    # Some servers answer the RFC 1929 exchange with version 5; tolerate it.
    if buf[0] not in (USERPASS_VERSION, VERSION):
        raise Socks5Error(f"username/password reply: version {buf[0]}, expected 1")
    if len(buf) < 2:
        return None
    return buf[1] == 0, 2


def client_request(command: int, host: str, port: int) -> bytes:
    return bytes((VERSION, command, 0)) + _address(host, port)


def parse_reply(buf: Buffer) -> tuple[int, str, int, int] | None:
    """VER REP RSV ATYP BND.ADDR BND.PORT -> (code, bound host, bound port, consumed).

    A failure code is returned, not raised: the caller decides what it means.
    """
    if not buf:
        return None
    _check_version(buf, VERSION, "reply")
    if len(buf) < 4:
        return None
    # the bound address is the proxy's business: not checked, never dialed
    parsed = _parse_address(buf, 4, buf[3], None, None, check=False)
    if parsed is None:
        return None
    host, port, end = parsed
    return buf[1], host, port, end


# --- UDP (RFC 1928 section 7) -------------------------------------------------


def parse_udp_header(datagram: Buffer) -> tuple[int, str, int, int]:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT -> (frag, host, port, payload offset).

    A datagram is complete or nothing, so a short one is an error, not ``None``.
    """
    if len(datagram) < 4:
        raise Socks5Error("UDP datagram shorter than its header")
    parsed = _parse_address(datagram, 4, datagram[3], None, None)
    if parsed is None:
        raise Socks5Error("UDP datagram shorter than its header")
    host, port, offset = parsed
    return datagram[2], host, port, offset


def udp_header(host: str, port: int) -> bytes:
    return b"\x00\x00\x00" + _address(host, port)


# --- failures -> reply codes --------------------------------------------------


def _errno_table() -> dict[int, int]:
    table: dict[int, int] = {}
    for name, code in (
        ("ECONNREFUSED", CONNECTION_REFUSED),
        ("ENETUNREACH", NETWORK_UNREACHABLE),
        ("ENETDOWN", NETWORK_UNREACHABLE),
        ("EHOSTUNREACH", HOST_UNREACHABLE),
        ("EHOSTDOWN", HOST_UNREACHABLE),
        ("ETIMEDOUT", TTL_EXPIRED),
        ("EACCES", NOT_ALLOWED),
        ("EPERM", NOT_ALLOWED),
    ):
        number = getattr(errno, name, None)  # not every platform has them all
        if number is not None:
            table[number] = code
    return table


_ERRNO_REPLY = _errno_table()

# When several attempts failed (happy eyeballs over IPv6 and IPv4), the most
# telling one wins; an unreachable network is usually just a missing IPv6 route.
_PRIORITY = (
    CONNECTION_REFUSED,
    TTL_EXPIRED,
    HOST_UNREACHABLE,
    NOT_ALLOWED,
    NETWORK_UNREACHABLE,
)


def _reply_for_one(exc: BaseException) -> int:
    if isinstance(exc, gaierror):  # before OSError: its errno is an EAI_* code
        return HOST_UNREACHABLE
    if isinstance(exc, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(exc, TimeoutError) or any(
        cls.__name__ == "TooSlowError" for cls in type(exc).__mro__
    ):
        return TTL_EXPIRED
    if isinstance(exc, PermissionError):
        return NOT_ALLOWED
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_REPLY.get(exc.errno, GENERAL_FAILURE)
    return GENERAL_FAILURE


def reply_for_exception(exc: BaseException) -> int:
    """The reply code for a failed dial.

    Looks through exception groups and ``__cause__`` chains, since
    ``trio.open_tcp_stream`` raises a bare ``OSError`` caused by a group of the
    per-address errors.
    """
    seen: set[int] = set()
    pending = [exc]
    found: set[int] = set()
    while pending:
        e = pending.pop()
        if id(e) in seen:  # cause chains can loop
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
            continue
        code = _reply_for_one(e)
        if code != GENERAL_FAILURE:
            if e is exc:
                return code
            found.add(code)
        elif e.__cause__ is not None:
            pending.append(e.__cause__)
    return next((c for c in _PRIORITY if c in found), GENERAL_FAILURE)


# Substrings of error texts, tried in order, lower-cased. They cover Go's net
# errors (LinkSocks), Python's OSError texts (pywssocks) and error_text() below.
_TEXT_REPLY: tuple[tuple[int, tuple[str, ...]], ...] = (
    # names.host_error: refused before any lookup (its reasons may say "not allowed")
    (HOST_UNREACHABLE, (BAD_HOST_TEXT,)),
    # Name resolution first: a failed lookup may mention a refused or timed-out resolver.
    (
        HOST_UNREACHABLE,
        (
            "no such host",
            "lookup ",
            "name resolution",
            "name or service not known",
            "nodename nor servname",
            "no address associated with hostname",
            "failed to resolve",
            "getaddrinfo",
        ),
    ),
    (CONNECTION_REFUSED, ("refused",)),
    (NETWORK_UNREACHABLE, ("network is unreachable", "network unreachable", "unreachable network")),
    (
        HOST_UNREACHABLE,
        ("no route to host", "host is unreachable", "host unreachable", "unreachable host"),
    ),
    (HOST_UNREACHABLE, ("host is down",)),
    (NETWORK_UNREACHABLE, ("network is down",)),
    (TTL_EXPIRED, ("timed out", "timeout", "deadline exceeded", "did not properly respond")),
    (NOT_ALLOWED, ("not allowed", "permission denied", "not permitted", "forbidden",
                   # trisocks refusals: a user's limit, status or expiry, a session's channel cap
                   "limit reached", "expired", "disabled", "too many channels")),
    (NETWORK_UNREACHABLE, ("no provider",)),
    (COMMAND_NOT_SUPPORTED, ("command not supported",)),
    (ADDRESS_TYPE_NOT_SUPPORTED, ("address type not supported",)),
)

# Python texts such as "[Errno 111] Connect call failed (...)" name no cause in
# words; the number is read with this platform's errno values (peers are
# nearly always Linux). Negative numbers are getaddrinfo's EAI_* codes.
_ERRNO_TEXT = re.compile(r"\[errno (-?\d+)\]")


def reply_for_error_text(text: str) -> int:
    """The reply code for a failure a remote peer reported as text."""
    lowered = text.lower()
    for code, markers in _TEXT_REPLY:
        if any(m in lowered for m in markers):
            return code
    match = _ERRNO_TEXT.search(lowered)
    if match:
        number = int(match.group(1))
        return HOST_UNREACHABLE if number < 0 else _ERRNO_REPLY.get(number, GENERAL_FAILURE)
    return GENERAL_FAILURE


_ERROR_TEXT = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general failure",
    NOT_ALLOWED: "not allowed",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "connection timed out",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


def error_text(code: int) -> str:
    """The text trisocks puts in a failed ConnectResponse; reply_for_error_text inverts it."""
    return _ERROR_TEXT.get(code, "general failure")
