"""Outbound TCP connections: cheap for IP literals, sequential fallback for names.

An IP literal needs no resolver thread: one non-blocking ``connect`` and a
wait for writability. Names go through ``trio.socket.getaddrinfo`` (a worker
thread) and each address is tried in turn until one answers. The whole dial
runs under one deadline; ``trio.TooSlowError`` means it passed.
"""

from __future__ import annotations

import errno
import os
import socket

import trio
from trio.lowlevel import wait_writable

from .transport import close_socket, tune_socket


def literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal, None for a name (inet_pton: no Python parsing)."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return socket.AF_INET6
    except OSError:
        return None


async def connect_address(family: int, sockaddr) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        tune_socket(sock)
        err = sock.connect_ex(sockaddr)
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


async def dial_tcp(host: str, port: int, *, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to host:port (TCP_NODELAY set)."""
    host = host.strip("[]")
    with trio.fail_after(timeout):
        family = literal_family(host)
        if family is not None:
            return await connect_address(family, (host, port))
        if never_resolves(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: name does not resolve (RFC 6761)")
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "name has no addresses")
        last: BaseException | None = None
        for fam, _type, _proto, _name, sockaddr in infos:
            try:
                return await connect_address(fam, sockaddr)
            except OSError as exc:
                last = exc
        assert last is not None
        raise last
