"""Serving the management app with hypercorn, inside the tunnel's Trio process.

Same port (the default): the tunnel's front door reads each connection's request head;
``/socket`` upgrades go to the data path and never reach this module, everything else is
handed to :class:`AsgiHandoff`, which runs hypercorn's Trio ``TCPServer`` on the connection
that is already open. A small stream adapter gives hypercorn first the bytes the front
door has read (the head, maybe the start of the body), then the rest of the connection.
HTTP keep-alive works as usual; a WebSocket upgrade on a kept-alive connection reaches
the app, which refuses it.

This drives hypercorn's internals (``TCPServer``, ``WorkerContext``, ``Lifespan``), so
pyproject.toml pins hypercorn's minor version, and tests/test_api_serving.py covers the
hand-off (plain and TLS).

The client address the app sees (the ASGI scope's ``client``: what failed keys are
counted against and logged with) is the one the front door decided on, ``request.peer``:
behind a ``--trusted-proxy`` that is the forwarded client, not the proxy.

``--api-bind HOST:PORT``: the app gets its own listener through hypercorn's public
``serve``; the tunnel port then answers as it does without the API.
"""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from ..net.handshake import response
from ..wire.names import hostport

log = logging.getLogger("trisocks.management.http")

# closing a connection the server ends (a refused body, an idle keep-alive): what a client
# may still send is read and dropped for this long, at most this many reads of 64 KiB
LINGER = 1.0
LINGER_READS = 64


def hypercorn_config() -> Config:
    config = Config()
    config.accesslog = None  # request lines hold tokens and users' keys: never logged
    config.errorlog = log
    config.keep_alive_timeout = 5.0
    config.read_timeout = 30
    config.startup_timeout = 10.0
    config.shutdown_timeout = 5.0
    config.graceful_timeout = 2.0
    config.h11_max_incomplete_size = 16 * 1024
    config.include_date_header = True
    config.include_server_header = False  # the app says Server: trisocks/<version>
    return config


class _SocketView:
    """What hypercorn asks of the socket (family, both addresses), with the client address
    the front door decided on (behind a trusted proxy: the forwarded one)."""

    def __init__(self, sock, peer: tuple) -> None:
        self._sock = sock
        self._peer = peer

    @property
    def family(self):
        return self._sock.family

    def getpeername(self):
        return self._peer if self._peer else self._sock.getpeername()

    def getsockname(self):
        return self._sock.getsockname()


class _Stream:
    """A front-door connection as hypercorn's TCPServer wants a stream."""

    def __init__(self, transport, first: bytes, peer: tuple = ()) -> None:
        self._transport = transport
        self._first = first
        self._peer = peer

    @property
    def socket(self):
        return _SocketView(self._transport.sock, self._peer)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        try:
            return await self._transport.recv(max_bytes or 65536)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data) -> None:
        try:
            await self._transport.send_all(data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        """Close, lingering first: a client still sending (a body refused with 413) would get
        a reset for its unread bytes, and a reset can destroy our answer in its receive
        buffer before it reads it. So read and drop what it sends, a little while."""
        if isinstance(self, _PlainStream):  # (a TLS stream has one reader at a time: no)
            with trio.move_on_after(LINGER):
                try:
                    self._transport.sock.shutdown(socket.SHUT_WR)
                    for _ in range(LINGER_READS):
                        if not await self._transport.recv(65536):
                            break
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        trio.BusyResourceError):  # busy: hypercorn's reader drains it anyway
                    pass
        await self._transport.aclose()


class _PlainStream(_Stream):
    async def send_eof(self) -> None:
        sock = self._transport.sock
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await trio.lowlevel.checkpoint()


class _TlsStream(_Stream):
    """The same over TLS (the front door did the handshake): hypercorn sees an SSL stream,
    so the ASGI scope says https. Like trio's SSLStream it has no send_eof."""

    @property
    def transport_stream(self):
        # hypercorn reads only .socket of it, for the addresses
        return SimpleNamespace(socket=self.socket)

    @property
    def socket(self):
        return _SocketView(self._transport.stream.transport_stream.socket, self._peer)

    async def do_handshake(self) -> None:
        await trio.lowlevel.checkpoint()

    def selected_alpn_protocol(self) -> str:
        return "http/1.1"  # the front door has read an HTTP/1.1 request head already


class AsgiHandoff:
    """``Server(http_app=...)``: serve the ASGI app on connections the tunnel accepted."""

    def __init__(self, app, *, tls: bool = False) -> None:
        self.app = ASGIWrapper(app)
        self.config = hypercorn_config()
        self.context = WorkerContext(None)
        self.state: dict = {}
        self.tls = tls
        self.ready = False
        self.connections = 0

    async def run_lifespan(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The app's ASGI lifespan, once for the process: startup now, shutdown on cancel."""
        lifespan = Lifespan(self.app, self.config, self.state)
        async with trio.open_nursery() as nursery:
            host_scope = await nursery.start(self._host, lifespan)
            await lifespan.wait_for_startup()
            self.ready = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.ready = False
                with trio.CancelScope(shield=True):
                    await self.context.terminated.set()
                    try:
                        await lifespan.wait_for_shutdown()
                    except Exception as exc:
                        log.debug("ASGI lifespan shutdown: %r", exc)
                    host_scope.cancel()

    @staticmethod
    async def _host(lifespan: Lifespan, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Shielded: the lifespan ends when told to shut down (above), not half-way by the
        # cancellation that stops the server.
        with trio.CancelScope(shield=True) as scope:
            task_status.started(scope)
            await lifespan.handle_lifespan()

    async def __call__(self, transport, request) -> None:
        if not self.ready:
            await transport.send_all(response(503, "starting or stopping\n"))
            return
        self.connections += 1
        stream = (_TlsStream if self.tls else _PlainStream)(transport, request.raw,
                                                            tuple(getattr(request, "peer", ())))
        server = TCPServer(self.app, self.config, self.context, ConnectionState(self.state.copy()),
                           stream)
        await server.run()


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (PORT 0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--api-bind {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


async def serve_bound(app, bind: tuple[str, int], server_config, *,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``--api-bind``: the app on a listener of its own (TLS too when the tunnel has it)."""
    host, port = bind
    config = hypercorn_config()
    config.bind = [hostport(host, port)]
    if server_config.tls_cert:
        config.certfile = server_config.tls_cert
        config.keyfile = server_config.tls_key or None

    async def started_hook(*, task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started_hook)
        bound_port = int(binds[0].rpartition(":")[2]) if binds else port
        log.info("management API listening on %s", ", ".join(binds))
        task_status.started(bound_port)
