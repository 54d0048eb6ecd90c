"""Byte transports under a WebSocket session, and the raw-socket helpers the data path uses.

The data path works on plain non-blocking stdlib sockets and waits with
``trio.lowlevel.wait_readable``/``wait_writable``: one syscall per operation
when the socket is ready, and no wrapper objects per call.  A transport gives
the session four operations:

``recv_into(view)``   await at least one byte (0 means EOF)
``try_send(view)``    send what the kernel takes right now, never wait
``write_some(views)`` await until some of ``views`` is written; returns the count
``aclose()``          close

:class:`SocketTransport` is the fast one. :class:`StreamTransport` wraps any
``trio.abc.Stream`` (TLS) and copies, since a TLS stream cannot take scatter
lists.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from ..wire.names import hostport
from .guard import contained, next_id

# Errors that mean "the peer is gone", reported as a plain close, not a crash.
CLOSED_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN,
     errno.EBADF, errno.ETIMEDOUT}
)
IOV_MAX = 64  # frames coalesced into one sendmsg
_U32 = struct.Struct("I")


def tune_socket(sock: socket.socket) -> None:
    """Non-blocking, and no Nagle delay: small messages (SOCKS replies, requests) go out at once."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def sock_recv_into(sock: socket.socket, view) -> int:
    """Receive into ``view``; waits only when nothing is there yet."""
    while True:
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        await checkpoint()
        return n


async def sock_recv(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        await checkpoint()
        return data


async def sock_sendall(sock: socket.socket, data) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await wait_writable(sock)
            continue
        view = view[n:]
    await checkpoint()


async def send_quietly(sock: socket.socket, data, log=None, what: str = "send failed") -> bool:
    """Send all of ``data``; False when the peer is gone (reset, closed). For last words (a
    failure reply before the close) whose loss is no news: logged at debug to ``log`` if given."""
    try:
        await sock_sendall(sock, data)
    except OSError as exc:
        if log is not None:
            log.debug("%s: %s", what, exc)
        return False
    return True


async def recv_parsed(sock: socket.socket, buf: bytearray, parse, eof, size: int = 4096) -> tuple:
    """Read into ``buf`` until ``parse(buf)`` has a whole message, as ``(*fields, used)``; drop
    the ``used`` bytes from ``buf`` (what follows stays) and return the fields. A parser
    raises on bad input; on EOF first, ``eof()`` gives the exception to raise."""
    while True:
        parsed = parse(buf)
        if parsed is not None:
            del buf[: parsed[-1]]
            return tuple(parsed[:-1])
        data = await sock_recv(sock, size)
        if not data:
            raise eof()
        buf += data


def close_socket(sock: socket.socket | None) -> None:
    """Close and tell Trio first, so no task stays parked on the file descriptor."""
    if sock is None or sock.fileno() < 0:
        return
    try:
        trio.lowlevel.notify_closing(sock)
    except (ValueError, OSError):
        pass
    sock.close()


class SocketTransport:
    """A WebSocket's TCP socket, used directly."""

    __slots__ = ("sock", "peer")

    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        tune_socket(sock)
        self.sock = sock
        self.peer = peer

    async def recv_into(self, view) -> int:
        return await sock_recv_into(self.sock, view)

    async def recv(self, size: int) -> bytes:
        return await sock_recv(self.sock, size)

    def try_send(self, view) -> int:
        try:
            return self.sock.send(view)
        except BlockingIOError:
            return 0

    async def write_some(self, views) -> int:
        sock = self.sock
        while True:
            try:
                return sock.sendmsg(views)
            except BlockingIOError:
                await wait_writable(sock)

    async def send_all(self, data) -> None:
        await sock_sendall(self.sock, data)

    def unsent(self) -> int:
        """Bytes in the kernel's send queue not yet acknowledged by the peer (0 if unknown)."""
        try:
            return _U32.unpack(fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return 0

    async def aclose(self) -> None:
        close_socket(self.sock)
        await checkpoint()


class StreamTransport:
    """Any Trio stream (TLS): correct but copies, since streams take one buffer at a time."""

    __slots__ = ("stream", "peer")

    def __init__(self, stream: trio.abc.Stream, peer: str = "") -> None:
        self.stream = stream
        self.peer = peer

    async def recv_into(self, view) -> int:
        data = await self.stream.receive_some(len(view))
        n = len(data)
        view[:n] = data
        return n

    async def recv(self, size: int) -> bytes:
        return await self.stream.receive_some(size)

    def try_send(self, view) -> int:
        return 0

    async def write_some(self, views) -> int:
        data = b"".join(views)
        await self.stream.send_all(data)
        return len(data)

    async def send_all(self, data) -> None:
        await self.stream.send_all(bytes(data))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- TLS ----------------------------------------------------------------------------------


async def tls_wrap(sock: socket.socket, context, *, server_side: bool, hostname: str | None = None,
                   timeout: float = 15.0, peer: str = "") -> StreamTransport:
    """Run the TLS handshake over a connected socket; raises trio.BrokenResourceError or TooSlowError.

    A failed certificate check surfaces as BrokenResourceError whose __cause__ is the
    ssl.SSLCertVerificationError.
    """
    stream = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(sock)), context,
        server_side=server_side, server_hostname=None if server_side else hostname,
        https_compatible=True,
    )
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return StreamTransport(stream, peer)


# -- listening -------------------------------------------------------------------

# accept() errors that concern one connection or a passing shortage, not the listener
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
_ACCEPT_RESOURCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listen_tcp(host: str, port: int, *, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket; ``host`` may be an IPv4/IPv6 literal or a name."""
    sock = bind_tcp(host, port)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_on(host: str, port: int, what: str) -> socket.socket:
    """listen_tcp, with an error that names the address (for start-up messages)."""
    try:
        return listen_tcp(host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {hostport(host, port)} for {what}: "
                      f"{(exc.strerror or str(exc)).lower()}") from None


def _peer(addr) -> str:
    try:
        return hostport(addr[0], addr[1])
    except (TypeError, IndexError):
        return str(addr)


_share_ports = False


def share_ports() -> None:
    """From now on every listening socket of this process is bound with SO_REUSEPORT: the
    workers of one server bind the same ports and the kernel spreads connections over them."""
    global _share_ports
    _share_ports = True


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound, non-blocking TCP socket, not listening yet: the port is ours, connections are refused."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _share_ports:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept_loop(lsock: socket.socket, handler, nursery: trio.Nursery, log,
                      what: str = "connection") -> None:
    """Accept until the listener is closed (``close_socket``, e.g. for a graceful stop),
    starting ``handler(sock, addr)`` in ``nursery`` for each connection, contained: whatever
    one connection raises ends that connection only. Closing the listener ends this loop
    quietly; the connections it started go on."""
    while lsock.fileno() >= 0:
        try:
            sock, addr = lsock.accept()
        except BlockingIOError:
            try:
                await wait_readable(lsock)
            except trio.ClosedResourceError:
                return  # closed under us: no new connections
            continue
        except OSError as exc:
            if exc.errno in _ACCEPT_TRANSIENT:
                continue
            if exc.errno in _ACCEPT_RESOURCE:
                log.warning("cannot accept connections: %s; pausing 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            raise
        tune_socket(sock)
        nursery.start_soon(contained, f"{what} #{next_id()} from {_peer(addr)}", handler, sock, addr)
        await checkpoint()
