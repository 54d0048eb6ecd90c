"""Upstream proxies: reach host:port through a SOCKS5 or HTTP CONNECT proxy.

``parse_proxy`` turns a URL from the command line into a :class:`Proxy`;
``proxy_from_env`` picks one from the usual environment variables (curl's rules)
for the client's WebSocket connection; ``open_via`` dials the proxy and asks it
to connect onwards, returning a plain non-blocking socket like ``dial_tcp`` does,
plus any tunnel bytes that arrived together with the proxy's answer.

Failures of the proxy are :class:`UpstreamError` (an ``OSError``) whose errno
is chosen so that ``socks5.reply_for_exception`` gives our own SOCKS5 client the
reply the proxy meant (refused, unreachable, timed out, not allowed).
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import trio

from ..wire import socks5
from ..wire.names import hostport
from .dial import dial_tcp
from .transport import close_socket, recv_parsed, sock_sendall

__all__ = [
    "Proxy",
    "UpstreamError",
    "no_proxy_matches",
    "open_via",
    "parse_proxy",
    "proxy_from_env",
]

SCHEMES = ("socks5", "socks5h", "http")
DEFAULT_PORTS = {"socks5": 1080, "socks5h": 1080, "http": 8080}
MAX_HEAD = 16 * 1024  # an HTTP proxy's answer head; real ones are a few hundred bytes
RECV_SIZE = 16 * 1024


class UpstreamError(OSError):
    """The upstream proxy refused or botched the CONNECT.

    ``errno`` is the closest local equivalent of the proxy's answer (ECONNREFUSED,
    EHOSTUNREACH, ETIMEDOUT, EACCES, ...) or ``None`` when there is none, which
    ``socks5.reply_for_exception`` turns into a general failure.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        if code is None:
            super().__init__(message)
        else:
            super().__init__(code, message)


@dataclass(frozen=True)
class Proxy:
    scheme: str  # "socks5" | "socks5h" | "http"
    host: str  # name or IP literal, IPv6 without brackets
    port: int
    username: str = ""
    password: str = field(default="", repr=False)  # repr() ends up in logs

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unsupported proxy scheme {self.scheme!r}")
        if not 0 < self.port <= 0xFFFF:
            raise ValueError(f"proxy port {self.port} is outside 1..65535")

    @property
    def display(self) -> str:
        """The URL with the password replaced by ``***``: safe for logs and errors."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username, safe="") + (":***" if self.password else "") + "@"
        return f"{self.scheme}://{auth}{hostport(self.host, self.port)}"

    @property
    def has_auth(self) -> bool:
        return bool(self.username or self.password)

    def __str__(self) -> str:
        return self.display


# --- parsing ------------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def _redact(url: str) -> str:
    """``url`` with any password masked, for error messages (the URL may be mistyped)."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{head}{sep}{user}{':***' if colon else ''}@{hostpart}"


def parse_proxy(url: str) -> Proxy:
    """``socks5://[user:pass@]host[:port]``, ``socks5h://...`` or ``http://...``.

    Raises ValueError with a message meant for the person who typed the URL.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"upstream proxy {_redact(url)!r}: {why}")

    text = url.strip()
    raw_scheme, sep, rest = text.partition("://")
    if not sep:
        raise bad("expected scheme://host:port, e.g. socks5://127.0.0.1:1080")
    scheme = raw_scheme.lower()
    if scheme == "https":
        raise bad(
            "https:// proxies (TLS to the proxy) are not supported; "
            "use http:// (a wss:// connection stays encrypted through it)"
        )
    if scheme not in SCHEMES:
        raise bad(f"unsupported scheme {raw_scheme!r} (use socks5://, socks5h:// or http://)")

    username = password = ""
    if "@" in rest:  # the last "@": an unencoded one in a password is forgiven
        userinfo, _, rest = rest.rpartition("@")
        raw_user, _, raw_password = userinfo.partition(":")
        try:
            username = unquote(raw_user, errors="strict")
            password = unquote(raw_password, errors="strict")
        except UnicodeDecodeError:
            raise bad("username or password is not valid percent-encoded UTF-8") from None
    # Checked after the credentials are split off, so the message cannot quote a password.
    rest = rest.removesuffix("/")
    for mark in "/?#":
        if mark in rest:
            raise bad(f"unexpected {rest[rest.index(mark) :]!r} after host:port")

    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise bad("missing ']' after IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        if tail and not tail.startswith(":"):
            raise bad(f"unexpected {tail!r} after ']'")
        port_text = tail[1:] if tail else None
    else:
        if rest.count(":") > 1:
            raise bad("IPv6 addresses must be in brackets, e.g. socks5://[::1]:1080")
        host, colon, port_text_ = rest.partition(":")
        port_text = port_text_ if colon else None
        if host and not _HOSTNAME.fullmatch(host):
            raise bad(f"invalid host {host!r}")
    if not host:
        raise bad("missing host")

    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    elif _PORT.fullmatch(port_text) and 0 < int(port_text) <= 0xFFFF:
        port = int(port_text)
    else:
        raise bad(f"bad port {port_text!r} (expected 1..65535)")
    return Proxy(scheme, host, port, username, password)


# --- environment --------------------------------------------------------------

# Lowercase first: curl reads http_proxy only in lowercase and prefers the
# lowercase spelling of the others; we also accept HTTP_PROXY (we are not a CGI
# program, so the "httpoxy" header injection does not apply) but it loses when
# both are set.
_ENV_VARS = {
    "ws": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    "wss": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}


def proxy_from_env(
    scheme: str, host: str, port: int, environ: Mapping[str, str] = os.environ
) -> Proxy | None:
    """The proxy the environment asks for to reach ``scheme://host:port``, or None.

    ``scheme`` is "ws" or "wss". Empty variables count as unset (as in curl). A
    value without ``scheme://`` is taken as an HTTP proxy (curl does the same;
    ``HTTP_PROXY=proxy:3128`` is common). NO_PROXY is consulted before the proxy
    URL is parsed, so a bad proxy variable only matters when it would be used.
    """
    variables = _ENV_VARS.get(scheme.lower())
    if variables is None:
        raise ValueError(f"proxy_from_env: scheme must be 'ws' or 'wss', not {scheme!r}")
    found = [(v, environ.get(v, "").strip()) for v in variables]
    name, value = next(((v, text) for v, text in found if text), ("", ""))
    if not value:
        return None
    no_proxy = environ.get("no_proxy", "").strip() or environ.get("NO_PROXY", "")
    if no_proxy_matches(no_proxy, host, port):
        return None
    if "://" not in value:
        value = "http://" + value
    try:
        return parse_proxy(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: {exc}") from None


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """True when a NO_PROXY value excludes ``host:port`` from proxying.

    Entries are separated by commas or spaces. ``*`` matches everything; a
    domain (with or without a leading ``.`` or ``*.``) matches itself and its
    subdomains; IP addresses and CIDR blocks match IP literals only (no DNS
    lookups); any entry may end in ``:port``. Loopback is not special: like
    curl, only what the variable says is excluded. Malformed entries are ignored.
    """
    host = host.strip("[]").rstrip(".").lower()
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in re.split(r"[,\s]+", no_proxy.lower()):
        if entry == "*":
            return True
        split = _split_no_proxy_entry(entry)
        if split is None:
            continue
        name, entry_port = split
        if entry_port is not None and entry_port != port:
            continue
        try:
            net = ipaddress.ip_network(name, strict=False)
        except ValueError:
            net = None
        if net is not None:
            if ip is not None and ip in net:  # `in` is False across IP versions
                return True
            continue
        domain = name.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def _split_no_proxy_entry(entry: str) -> tuple[str, int | None] | None:
    """(name, port or None), or None when the entry is empty or malformed."""
    if entry.startswith("["):
        name, bracket, tail = entry[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            return None
        port_text = tail[1:] if tail else None
    elif entry.count(":") == 1:  # host:port; two or more colons is a bare IPv6 address
        name, _, port_text = entry.partition(":")
    else:
        name, port_text = entry, None
    if not name:
        return None
    if port_text is None:
        return name, None
    if not _PORT.fullmatch(port_text):
        return None
    return name, int(port_text)


# --- connecting ---------------------------------------------------------------

# SOCKS5 reply code -> errno that socks5.reply_for_exception maps back to it.
_SOCKS_ERRNO = {
    socks5.NOT_ALLOWED: errno.EACCES,
    socks5.NETWORK_UNREACHABLE: errno.ENETUNREACH,
    socks5.HOST_UNREACHABLE: errno.EHOSTUNREACH,
    socks5.CONNECTION_REFUSED: errno.ECONNREFUSED,
    socks5.TTL_EXPIRED: errno.ETIMEDOUT,
}

# HTTP status -> errno. Squid answers 503 when it cannot connect, others 502.
_HTTP_ERRNO = {
    403: errno.EACCES,
    407: errno.EACCES,
    502: errno.ECONNREFUSED,
    503: errno.ECONNREFUSED,
    504: errno.ETIMEDOUT,
}

_UNSAFE_IN_HEAD = re.compile(r"[\x00-\x20\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: ([^\r\n]*))?\r?")

Handshake = Callable[[socket.socket, bytearray], Awaitable[None]]


async def open_via(
    proxy: Proxy, host: str, port: int, *, timeout: float
) -> tuple[socket.socket, bytes]:
    """A socket connected to ``host:port`` through ``proxy``, and the tunnel's first bytes.

    Hostnames go to the proxy unresolved (for socks5:// too: a tunnel wants the
    far side to resolve). Everything, dial included, runs under one ``timeout``.
    The second value holds bytes the proxy sent right after its answer; they
    belong to the target's stream and must be delivered before reading more.

    Raises: the dial's own OSError (ConnectionRefusedError, gaierror, ...) when
    the proxy cannot be reached; :class:`UpstreamError` when it answers badly,
    refuses, or does not answer within ``timeout``; ValueError for a target that
    cannot be expressed in the protocol (checked before dialing).
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    handshake = _prepare(proxy, host, port)  # may raise ValueError: before any socket exists
    sock: socket.socket | None = None
    try:
        with trio.fail_after(timeout):
            try:
                sock = await dial_tcp(proxy.host, proxy.port, timeout=timeout)
            except OSError as exc:
                raise _unreachable(proxy, exc) from exc
            buf = bytearray()
            try:
                await handshake(sock, buf)
            except UpstreamError:
                raise
            except socks5.Socks5Error as exc:
                raise UpstreamError(
                    f"upstream proxy {proxy.display} does not speak SOCKS5 ({exc})", errno.EPROTO
                ) from None
            except OSError as exc:
                raise UpstreamError(
                    f"upstream proxy {proxy.display}: connection lost during the handshake "
                    f"({exc.strerror or exc})",
                    exc.errno,
                ) from exc
        return sock, bytes(buf)
    except trio.TooSlowError:
        close_socket(sock)
        what = "did not answer" if sock is not None else "could not be reached"
        raise UpstreamError(
            f"upstream proxy {proxy.display} {what} within {timeout:g} s", errno.ETIMEDOUT
        ) from None
    except BaseException:
        close_socket(sock)  # failures and cancellation alike: no socket outlives the call
        raise


def _unreachable(proxy: Proxy, exc: OSError) -> OSError:
    """The same kind of error, saying it was the proxy that could not be reached."""
    message = f"upstream proxy {proxy.display} unreachable: {exc.strerror or exc}"
    if isinstance(exc, socket.gaierror):
        return socket.gaierror(exc.errno, message)
    if exc.errno is None:
        return OSError(message)
    return OSError(exc.errno, message)  # OSError(errno, ...) builds the matching subclass


def _prepare(proxy: Proxy, host: str, port: int) -> Handshake:
    """Build every request up front, so bad input fails before we dial."""
    target = hostport(host, port)
    if proxy.scheme == "http":
        if _UNSAFE_IN_HEAD.search(host) or not host:
            raise ValueError(f"target host {host!r} cannot be sent in an HTTP CONNECT request")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is outside 0..65535")
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.has_auth:
            token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()

        async def http(sock: socket.socket, buf: bytearray) -> None:
            await _http_connect(sock, buf, proxy, target, request)

        return http

    connect = socks5.client_request(socks5.CMD_CONNECT, host, port)
    userpass = socks5.client_userpass(proxy.username, proxy.password) if proxy.has_auth else b""

    async def socks(sock: socket.socket, buf: bytearray) -> None:
        await _socks5_connect(sock, buf, proxy, target, connect, userpass)

    return socks


async def _receive(
    sock: socket.socket, buf: bytearray, parse: Callable[[bytearray], Any], proxy: Proxy
) -> Any:
    """Read until ``parse`` has a whole message; drop it from ``buf``, keep what follows."""

    def closed() -> UpstreamError:
        return UpstreamError(
            f"upstream proxy {proxy.display} closed the connection during the handshake",
            errno.ECONNRESET,
        )

    value = await recv_parsed(sock, buf, parse, closed, RECV_SIZE)
    return value[0] if len(value) == 1 else value


async def _socks5_connect(
    sock: socket.socket, buf: bytearray, proxy: Proxy, target: str, connect: bytes, userpass: bytes
) -> None:
    # One message at a time: some servers read the greeting with a single recv
    # and would lose a pipelined request.
    await sock_sendall(sock, socks5.client_greeting(bool(userpass)))
    method = await _receive(sock, buf, socks5.parse_method_reply, proxy)
    if method == socks5.NO_ACCEPTABLE:
        hint = " (it wants a username and password)" if not userpass else ""
        raise UpstreamError(
            f"upstream proxy {proxy.display} accepts none of our authentication methods{hint}",
            errno.EACCES,
        )
    if method == socks5.USERPASS and userpass:
        await sock_sendall(sock, userpass)
        if not await _receive(sock, buf, socks5.parse_userpass_reply, proxy):
            raise UpstreamError(
                f"upstream proxy {proxy.display} rejected username {proxy.username!r}",
                errno.EACCES,
            )
    elif method != socks5.NO_AUTH:
        raise UpstreamError(
            f"upstream proxy {proxy.display} chose authentication method {method:#04x}, "
            "which we did not offer",
            errno.EPROTO,
        )
    await sock_sendall(sock, connect)
    code, _bound_host, _bound_port = await _receive(sock, buf, socks5.parse_reply, proxy)
    if code != socks5.SUCCEEDED:
        raise UpstreamError(
            f"upstream proxy {proxy.display} could not connect to {target}: "
            f"{socks5.error_text(code)} (SOCKS5 reply {code})",
            _SOCKS_ERRNO.get(code),
        )


def _parse_head(buf: bytearray) -> tuple[int, str, int] | None:
    """An HTTP answer head at the front of ``buf`` -> (status, reason, consumed)."""
    if not b"HTTP/".startswith(buf[:5]):  # fail at the first wrong byte, not at the deadline
        raise ValueError(f"not an HTTP answer: {bytes(buf[:32])!r}")
    end = _HEAD_END.search(buf, 0, MAX_HEAD + 4)
    if end is None:
        if len(buf) > MAX_HEAD:
            raise ValueError(f"answer head longer than {MAX_HEAD} bytes")
        return None
    line = bytes(buf[: buf.index(b"\n")])
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ValueError(f"malformed status line {line[:80]!r}")
    reason = (match.group(2) or b"").decode("latin-1")[:80]
    return int(match.group(1)), reason, end.end()


async def _http_connect(
    sock: socket.socket, buf: bytearray, proxy: Proxy, target: str, request: bytes
) -> None:
    await sock_sendall(sock, request)
    while True:
        try:
            status, reason = await _receive(sock, buf, _parse_head, proxy)
        except ValueError as exc:
            raise UpstreamError(
                f"upstream proxy {proxy.display} gave no valid HTTP answer: {exc}", errno.EPROTO
            ) from None
        if not 100 <= status < 200:  # interim 1xx heads come before the real one
            break
    if 200 <= status < 300:
        return
    if status == 407:
        detail = "credentials rejected" if proxy.has_auth else "no credentials given"
        why = f"proxy authentication required ({detail})"
    else:
        why = f"{status} {reason}".rstrip()
    raise UpstreamError(
        f"upstream proxy {proxy.display} refused CONNECT {target}: {why}",
        _HTTP_ERRNO.get(status),
    )
