"""trisocks against an independent WebSocket implementation: trio-websocket (wsproto).

The tunnel's own codec does the framing on both sides, so these tests check it against a
third party's reading of RFC 6455: a trio-websocket client speaks LinkSocks messages (built
by hand from PROTOCOL.md, not with trisocks.wire.protocol) to a trisocks server, and a
trio-websocket server plays the LinkSocks server for a trisocks client, whose frames must
be masked and well formed or wsproto would close the connection.
"""

from __future__ import annotations

import struct

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

from trisocks.tunnel.client import Client, ClientConfig

from .inproc import TOKEN, echo_handler, serve_tcp, socks_connect, start_tunnel

CHANNEL = bytes(range(0x10, 0x20))
AUTH_OK = b"\x01\x02\x01"


def auth(token: str, reverse: bool = False) -> bytes:
    raw = token.encode()
    return b"\x01\x01" + bytes([len(raw)]) + raw + bytes([reverse]) + b"\x42" * 16


def connect(channel: bytes, host: str, port: int) -> bytes:
    return b"\x01\x03\x01" + channel + bytes([len(host)]) + host.encode() + struct.pack(">H", port)


def data(channel: bytes, payload: bytes) -> bytes:
    return b"\x01\x04\x01" + channel + b"\x00" + struct.pack(">I", len(payload)) + payload


async def next_of_type(ws, msg_type: int) -> bytes:
    """The next message of ``msg_type``, skipping the informational ones (Log, Partners...)."""
    while True:
        message = await ws.get_message()
        assert isinstance(message, bytes), "every LinkSocks message is a binary message"
        if message[1] == msg_type:
            return message


async def test_a_trio_websocket_client_tunnels_through_a_trisocks_server(nursery):
    tunnel = await start_tunnel(nursery)
    echo_port = await serve_tcp(nursery, echo_handler)
    payload = bytes(range(256)) * 2000  # 500 KiB: several frames of the server's codec
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{tunnel.ws_port}/socket",
                                      max_message_size=4 << 20) as ws:
            await ws.send_message(auth(TOKEN))
            assert await ws.get_message() == AUTH_OK
            await ws.send_message(connect(CHANNEL, "127.0.0.1", echo_port))
            assert await next_of_type(ws, 0x05) == b"\x01\x05\x01" + CHANNEL
            await ws.send_message(data(CHANNEL, payload))
            echoed = bytearray()
            while len(echoed) < len(payload):
                message = await next_of_type(ws, 0x04)
                assert message[2:19] == b"\x01" + CHANNEL and message[19] == 0  # TCP, not compressed
                (size,) = struct.unpack(">I", message[20:24])
                assert len(message) == 24 + size
                echoed += message[24:]
            assert echoed == payload
            await ws.ping(b"are you there")  # returns once the matching pong came back
            await ws.send_message(b"\x01\x06" + CHANNEL)  # Disconnect
            await ws.aclose(1000)
        assert ws.closed.code == 1000


async def test_a_wrong_token_from_a_trio_websocket_client_is_refused_and_closed(nursery):
    tunnel = await start_tunnel(nursery)
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{tunnel.ws_port}/socket") as ws:
            await ws.send_message(auth("not-the-token"))
            reply = await ws.get_message()
            assert reply[:4] == b"\x01\x02\x00" + bytes([len("invalid token")])
            assert reply[4:] == b"invalid token"
            with pytest.raises(ConnectionClosed):
                await ws.get_message()  # the server closes after refusing


async def test_a_trisocks_client_speaks_to_a_trio_websocket_server(nursery):
    """The fake server checks what wsproto received: Auth with our token, then Connect for the
    SOCKS5 client's target, then its bytes; it answers and the SOCKS5 client reads the answer."""
    seen: list[bytes] = []
    data_seen = trio.Event()

    async def linksocks_like_server(request):
        assert request.path == "/socket"
        ws = await request.accept()
        try:
            seen.append(await ws.get_message())
            await ws.send_message(AUTH_OK)
            while True:
                message = await ws.get_message()
                seen.append(message)
                if message[1] == 0x04:
                    data_seen.set()
                if message[1] == 0x03:  # Connect: accept, then greet
                    channel = message[3:19]
                    await ws.send_message(b"\x01\x05\x01" + channel)
                    await ws.send_message(data(channel, b"hello from a wsproto server"))
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, linksocks_like_server, "127.0.0.1", 0, None)
    ws_port = server.port
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{ws_port}", token=TOKEN, socks_host="127.0.0.1",
                                 socks_port=0))
    socks_port = await nursery.start(client.run)
    with trio.fail_after(10):
        stream = await socks_connect(socks_port, "example.invalid.test", 8080)
        async with stream:
            await stream.send_all(b"ping through the tunnel")
            got = b""
            while len(got) < len(b"hello from a wsproto server"):
                got += await stream.receive_some(1024)
            assert got == b"hello from a wsproto server"
            await data_seen.wait()
    assert seen[0] == auth(TOKEN)[:-16] + seen[0][-16:]  # the instance UUID is the client's own
    connects = [m for m in seen if m[1] == 0x03]
    assert len(connects) == 1
    assert connects[0][2] == 0x01 and connects[0][19:] == (bytes([20]) + b"example.invalid.test"
                                                           + struct.pack(">H", 8080))
    sent = [m for m in seen if m[1] == 0x04]
    assert sent[0][3:19] == connects[0][3:19] and sent[0][24:] == b"ping through the tunnel"
