"""In-process building blocks for tests: a tunnel (server + client) inside the test's
nursery, TCP echo/firehose targets, a raw SOCKS5 connect, and a raw WebSocket peer.

Everything listens on 127.0.0.1 port 0 and reports the port it got.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from dataclasses import dataclass

import trio

from trisocks.tunnel.client import Client, ClientConfig
from trisocks.tunnel.server import Server, ServerConfig
from trisocks.tunnel.tokens import TokenTable
from trisocks.wire import protocol, socks5
from trisocks.wire.codec import Decoder, encode_frame

TOKEN = "test-token-0123456789"


@dataclass
class Tunnel:
    server: Server
    client: Client
    ws_port: int
    socks_port: int


async def start_tunnel(nursery, *, token: str = TOKEN, server_cfg: dict | None = None,
                       client_cfg: dict | None = None) -> Tunnel:
    tokens = TokenTable()
    tokens.add_forward(token)
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, **(server_cfg or {})), tokens)
    ws_port = await nursery.start(server.serve)
    cfg = ClientConfig(url=f"ws://127.0.0.1:{ws_port}", token=token, socks_host="127.0.0.1",
                       socks_port=0, **(client_cfg or {}))
    client = Client(cfg)
    socks_port = await nursery.start(client.run)
    return Tunnel(server, client, ws_port, socks_port)


# -- targets ------------------------------------------------------------------------------


async def serve_tcp(nursery, handler) -> int:
    """Listen on 127.0.0.1:0 and run handler(stream) per connection; returns the port."""
    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return listeners[0].socket.getsockname()[1]


async def echo_handler(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


def firehose_handler(chunk: int = 256 << 10):
    """A target that writes as fast as it is allowed until the connection breaks."""
    blob = os.urandom(chunk)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(blob)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


# -- SOCKS5 ----------------------------------------------------------------------------------


async def socks_connect(socks_port: int, host: str, port: int, *, auth: tuple[str, str] | None = None
                        ) -> trio.SocketStream:
    """A stream through the SOCKS5 proxy; raises Socks5Failure with the reply code."""
    stream = await trio.open_tcp_stream("127.0.0.1", socks_port)
    try:
        await stream.send_all(socks5.client_greeting(auth is not None))
        buf = bytearray()

        async def read(parse):
            while True:
                result = parse(buf)
                if result is not None:
                    del buf[: result[-1]]
                    return result[:-1]
                data = await stream.receive_some(4096)
                if not data:
                    raise EOFError("proxy closed the connection")
                buf.extend(data)

        (method,) = await read(socks5.parse_method_reply)
        if method == socks5.USERPASS:
            await stream.send_all(socks5.client_userpass(*auth))
            (ok,) = await read(socks5.parse_userpass_reply)
            if not ok:
                raise Socks5Failure(-1)
        await stream.send_all(socks5.client_request(socks5.CMD_CONNECT, host, port))
        code, _host, _port = await read(socks5.parse_reply)
        if code != socks5.SUCCEEDED:
            raise Socks5Failure(code)
        return Prefixed(stream, bytes(buf)) if buf else stream
    except BaseException:
        await stream.aclose()
        raise


class Prefixed(trio.abc.HalfCloseableStream):
    """A stream that first returns bytes already read past the SOCKS5 reply."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.stream = stream
        self.first = first

    async def receive_some(self, max_bytes=None):
        if self.first:
            data, self.first = self.first, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Socks5Failure(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 reply {code}")
        self.code = code


async def echo_roundtrip(socks_port: int, echo_port: int, payload: bytes) -> bool:
    """Send payload through the tunnel to an echo target; True if it all came back intact."""
    stream = await socks_connect(socks_port, "127.0.0.1", echo_port)
    received = hashlib.sha256()
    got = 0
    async with stream, trio.open_nursery() as nursery:
        async def sender():
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 20):
                await stream.send_all(view[i : i + (1 << 20)])

        nursery.start_soon(sender)
        while got < len(payload):
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            received.update(data)
            got += len(data)
    return got == len(payload) and received.digest() == hashlib.sha256(payload).digest()


# -- raw WebSocket peer ----------------------------------------------------------------------


class RawPeer:
    """A hand-driven WebSocket client, for sending what a good client never would."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.decoder = Decoder(expect_masked=False)

    @classmethod
    async def connect(cls, port: int, *, path: str = "/socket") -> RawPeer:
        sock = socket.socket()
        sock.setblocking(False)
        peer = cls(sock)
        await peer.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await peer.sock.send(
            (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
             ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = await peer.sock.recv(4096)
            if not data:
                raise EOFError("closed during handshake")
            head += data
        status, _, rest = head.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        peer.decoder.feed_bytes(rest)
        return peer

    async def send_raw(self, data: bytes) -> None:
        await self.sock.send(data)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        await self.sock.send(encode_frame(opcode, payload, int.from_bytes(os.urandom(4), "big")))

    async def send_message(self, msg) -> None:
        await self.send_frame(2, protocol.pack(msg))

    async def authenticate(self, token: str = TOKEN) -> protocol.AuthResponse:
        await self.send_message(protocol.Auth(token, False, os.urandom(16)))
        kind, data = await self.next()
        return protocol.parse(data)

    async def next(self):
        """The next event: ('message', bytes) / ('ping'|'pong', bytes) / ('close', code) / ('eof', None)."""
        from trisocks.wire import codec

        while True:
            ev = self.decoder.next_event()
            if ev == codec.MESSAGE:
                return "message", self.decoder.data
            if ev == codec.DATA:
                return "data", (self.decoder.channel, bytes(self.decoder.data))
            if ev == codec.PING:
                return "ping", self.decoder.data
            if ev == codec.PONG:
                return "pong", self.decoder.data
            if ev == codec.CLOSE:
                return "close", self.decoder.close_code
            buf = self.decoder.get_buffer()
            try:
                n = await self.sock.recv_into(buf)
            except ConnectionResetError:
                return "eof", None
            if n == 0:
                return "eof", None
            self.decoder.feed(n)

    async def expect_pong(self) -> None:
        """Ping and wait for the pong: proves the session is alive and reading."""
        await self.send_frame(9, b"alive?")
        while True:
            kind, data = await self.next()
            if kind == "pong":
                assert data == b"alive?"
                return
            assert kind not in ("close", "eof"), (kind, data)

    async def aclose(self) -> None:
        self.sock.close()


def be32(n: int) -> bytes:
    return struct.pack(">I", n)
