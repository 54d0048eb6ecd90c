"""Outbound TCP connections: cheap for IP literals, sequential fallback for names.

An IP literal needs no resolver thread: one non-blocking ``connect`` and a
wait for writability. Names go through ``getaddrinfo`` in a worker thread of
our own limiter (:func:`resolve`) and each address is tried in turn until one
answers. The whole dial runs under one deadline; ``trio.TooSlowError`` means
it passed. Whatever a bad host makes the stdlib raise comes out as an
``OSError`` (``socket.gaierror`` for names), so callers catch one thing.

A dial may be told which addresses it must not reach (``refuse``): a server
must not lead its tunnel users back into itself (see :func:`is_own_listener`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable

import trio
from trio.lowlevel import RunVar, wait_writable

from ..wire.names import BadHostName, ascii_host, ip_of
from .transport import close_socket, tune_socket

# Name lookups at once. getaddrinfo blocks a worker thread for as long as a resolver takes
# (seconds, for a name whose servers do not answer); without a limiter of our own, a flood of
# such names would hold every thread of trio's default limiter (40) and stall whatever else
# needs one. Lookups beyond this wait their turn within their own dial deadline.
MAX_LOOKUPS = 32
_lookups: RunVar[trio.CapacityLimiter] = RunVar("trisocks_lookups")

# Refusal text for a target that is one of this process's own listeners: "not allowed"
# makes socks5.reply_for_error_text answer 0x02 (connection not allowed by ruleset).
OWN_LISTENER_TEXT = "not allowed by ruleset: the server's own address"


class Refused(PermissionError):
    """The target is one this dial must not reach (socks5 maps PermissionError to 0x02)."""

    def __init__(self, text: str = OWN_LISTENER_TEXT) -> None:
        super().__init__(errno.EACCES, text)


def lookup_limiter() -> trio.CapacityLimiter:
    try:
        return _lookups.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAX_LOOKUPS)
        _lookups.set(limiter)
        return limiter


async def resolve(host: str, port: int, type: int = socket.SOCK_STREAM) -> list:
    """getaddrinfo in a worker thread under :data:`MAX_LOOKUPS`; only OSError on failure."""
    try:
        name = ascii_host(host)
    except BadHostName as exc:
        raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: {exc}") from None
    try:
        infos = await trio.to_thread.run_sync(
            socket.getaddrinfo, name, port, 0, type, 0, 0,
            abandon_on_cancel=True, limiter=lookup_limiter())
    except (UnicodeError, ValueError) as exc:  # what a name the checks let through may still do
        raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: {exc}") from None
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "name has no addresses")
    return infos


def literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal, None for anything else (inet_pton: no Python parsing)."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except (OSError, ValueError):  # ValueError: a NUL; UnicodeEncodeError: undecodable bytes
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return socket.AF_INET6
    except (OSError, ValueError):
        return None


async def connect_address(family: int, sockaddr) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        tune_socket(sock)
        try:
            err = sock.connect_ex(sockaddr)
        except (ValueError, UnicodeError) as exc:  # an IPv6 scope id that is not one
            raise socket.gaierror(socket.EAI_NONAME, str(exc)) from None
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            await wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        close_socket(sock)
        raise


def never_resolves(host: str) -> bool:
    """RFC 6761: names under .invalid never resolve, so resolvers need not be asked."""
    name = host.rstrip(".").lower()
    return name == "invalid" or name.endswith(".invalid")


# refuse(sockaddr) -> why the dial must not go there ("not allowed by ruleset: ..."), or None
Refuse = Callable[[tuple], "str | None"]


async def dial_tcp(host: str, port: int, *, timeout: float, refuse: Refuse | None = None) -> socket.socket:
    """A connected, non-blocking TCP socket to host:port (TCP_NODELAY set).

    ``refuse`` is asked about each address before it is tried; refused ones raise
    :class:`Refused` (when no other address answered)."""
    host = host.strip("[]")
    with trio.fail_after(timeout):
        family = literal_family(host)
        if family is not None:
            if refuse is not None:
                reason = refuse((host, port))
                if reason:
                    raise Refused(reason)
            return await connect_address(family, (host, port))
        if never_resolves(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: name does not resolve (RFC 6761)")
        infos = await resolve(host, port)
        last: BaseException | None = None
        for fam, _type, _proto, _name, sockaddr in infos:
            if refuse is not None:
                reason = refuse(sockaddr)
                if reason:
                    last = Refused(reason)
                    continue
            try:
                return await connect_address(fam, sockaddr)
            except OSError as exc:
                last = exc
        assert last is not None
        raise last


# -- the process's own listeners ---------------------------------------------------------------

WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    ip = ip_of(text)
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def is_local_address(sockaddr: tuple) -> bool:
    """True when ``sockaddr``'s IP is an address of this machine (a socket can be bound to it)."""
    ip = _ip(str(sockaddr[0]))
    if ip is None:
        return False
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    addr = (str(ip), 0) if family == socket.AF_INET else (str(ip), 0, 0, *sockaddr[3:4])
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(addr)
        except OSError:
            return False
    return True


def is_own_listener(sockaddr: tuple, listeners: Iterable[tuple[str, int]]) -> bool:
    """Does a connection to ``sockaddr`` reach one of ``listeners`` ((host, port) this process
    listens on, host possibly a wildcard)? Only a matching port costs more than a compare."""
    port = sockaddr[1]
    target: object = None
    for lhost, lport in listeners:
        if lport != port:
            continue
        if target is None:
            target = _ip(str(sockaddr[0])) or False
        if target is False:
            return True  # not an IP after resolution: be safe
        # 0.0.0.0 and :: as a destination mean this machine, as loopback does
        if target.is_loopback or target.is_unspecified or target == _ip(str(lhost)):
            return True
        if (str(lhost) in WILDCARDS or _ip(str(lhost)) is None) and is_local_address(sockaddr):
            return True  # a wildcard (or a name) listens on every address of this machine
    return False
