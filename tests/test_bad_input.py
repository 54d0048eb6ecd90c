"""Bad input gets a clear error, closes only what it must, and never takes the process down.

Each test runs a healthy channel (an echo round trip through a real client)
the whole time; it must keep working while a raw peer misbehaves.
"""

from __future__ import annotations

import os
import random
from contextlib import asynccontextmanager

import pytest
import trio

from trisocks.net.channel import CLOSED
from trisocks.wire import protocol

from .inproc import (
    RawPeer,
    be32,
    echo_handler,
    firehose_handler,
    serve_tcp,
    socks_connect,
    start_tunnel,
)


@pytest.fixture
async def env(nursery):
    tunnel = await start_tunnel(nursery)
    echo_port = await serve_tcp(nursery, echo_handler)
    return tunnel, echo_port


@asynccontextmanager
async def healthy_channel(tunnel, echo_port):
    """Keeps echoing 64 KiB blocks through the tunnel; on exit checks every byte came back."""
    stream = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
    rounds = 0
    stop = trio.Event()

    async def loop():
        nonlocal rounds
        while not stop.is_set():
            block = os.urandom(64 << 10)
            await stream.send_all(block)
            got = b""
            while len(got) < len(block):
                data = await stream.receive_some(len(block) - len(got))
                assert data, "healthy channel closed"
                got += data
            assert got == block
            rounds += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        before = rounds
        yield
        # the healthy channel must still make progress after the bad input
        with trio.fail_after(10):
            while rounds < before + 3:
                await trio.sleep(0.01)
        stop.set()
    await stream.aclose()


@pytest.mark.parametrize("authenticated", [False, True])
async def test_random_bytes_after_upgrade(env, authenticated):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        if authenticated:
            assert (await peer.authenticate()).success
        rng = random.Random(1234)
        garbage = bytes(rng.getrandbits(8) for _ in range(4096))
        assert garbage[0] & 0x70  # reserved bits set: a framing error at the first byte
        await peer.send_raw(garbage)
        with trio.fail_after(5):
            kind, code = await peer.next()
        assert (kind, code) == ("close", 1002)
        assert (await peer.next())[0] == "eof"
        await peer.aclose()
    # the server still accepts new clients
    peer = await RawPeer.connect(tunnel.ws_port)
    assert (await peer.authenticate()).success
    await peer.aclose()


async def test_oversized_frame_is_refused_with_1009(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        # a binary frame announcing 64 MiB (the cap is 32 MiB), masked as a client must
        await peer.send_raw(bytes([0x82, 0xFF]) + (64 << 20).to_bytes(8, "big") + os.urandom(4))
        with trio.fail_after(5):
            while True:
                kind, value = await peer.next()
                if kind in ("close", "eof"):
                    break
        assert (kind, value) == ("close", 1009)
        await peer.aclose()


async def test_truncated_messages(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        # A Connect cut short: logged and ignored, the session stays up.
        await peer.send_frame(2, bytes([1, 3, 1]) + os.urandom(5))
        await peer.expect_pong()
        # A Data message announcing more bytes than it carries: that channel is closed.
        channel = protocol.new_channel_id()
        await peer.send_message(protocol.Connect(protocol.TCP, channel, "127.0.0.1", echo_port))
        kind, data = await peer.next()
        assert protocol.parse(data) == protocol.ConnectResponse(True, channel)
        await peer.send_frame(2, bytes([1, 4, 1]) + channel + b"\0" + be32(100) + b"only ten b")
        with trio.fail_after(5):
            while True:
                kind, data = await peer.next()
                if kind == "message":
                    msg = protocol.parse(data)
                    if isinstance(msg, protocol.Disconnect):
                        break
        assert msg.channel == channel
        await peer.expect_pong()
        await peer.aclose()


async def test_unknown_message_type_is_ignored(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        await peer.send_frame(2, bytes([1, 0x55]) + b"from the future")
        await peer.send_frame(1, b"a text message")  # LinkSocks speaks binary only
        await peer.expect_pong()
        await peer.aclose()


async def test_wrong_major_version_message_is_ignored(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        channel = protocol.new_channel_id()
        connect = bytearray(protocol.pack(protocol.Connect(protocol.TCP, channel, "127.0.0.1", echo_port)))
        connect[0] = 0x21  # major 2
        await peer.send_frame(2, bytes(connect))
        await peer.send_frame(9, b"after")
        with trio.fail_after(5):
            kind, data = await peer.next()
        assert (kind, data) == ("pong", b"after")  # no ConnectResponse: the Connect was refused
        await peer.aclose()


async def test_wrong_token_gets_auth_failure(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        reply = await peer.authenticate("not-the-token")
        assert reply == protocol.AuthResponse(False, "invalid token")
        assert (await peer.next()) == ("close", 1008)
        await peer.aclose()


async def test_garbage_instead_of_auth(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        await peer.send_frame(2, b"\x01")  # too short to be any message
        kind, data = await peer.next()
        assert protocol.parse(data) == protocol.AuthResponse(False, "invalid auth message")
        await peer.aclose()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /socket HTTP/1.1\r\nHost: x\r\n\r\n", b"426"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"BREW /socket HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64, b"400"),  # a TLS hello
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_non_websocket_requests_get_http_errors(env, request_bytes, status):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        stream = await trio.open_tcp_stream("127.0.0.1", tunnel.ws_port)
        await stream.send_all(request_bytes)
        answer = b""
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                answer += data
        assert answer.split(b" ")[1] == status, answer[:200]
        await stream.aclose()


async def test_root_says_running(env):
    tunnel, _ = env
    stream = await trio.open_tcp_stream("127.0.0.1", tunnel.ws_port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while data := await stream.receive_some(65536):
        answer += data
    from trisocks import __version__

    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"trisocks {__version__} is running\n".encode())


@pytest.mark.parametrize(
    "greeting",
    [
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4
        b"\x05",  # truncated, then closed
        b"\x05\x00",  # no methods
        b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50",  # unknown command 9
        b"\x05\x01\x00\x05\x01\x00\x07",  # unknown address type
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
async def test_broken_socks_greeting_closes_only_that_connection(env, greeting):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        stream = await trio.open_tcp_stream("127.0.0.1", tunnel.socks_port)
        await stream.send_all(greeting)
        if greeting == b"\x05":
            await stream.send_eof()
        with trio.fail_after(12):  # the handshake timeout is 10 s
            while await stream.receive_some(4096):
                pass
        await stream.aclose()


async def test_data_for_unknown_channel_is_ignored(env):
    tunnel, echo_port = env
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        stray = protocol.new_channel_id()
        await peer.send_message(protocol.Data(protocol.TCP, stray, b"nobody home"))
        await peer.send_message(protocol.Disconnect(stray))
        await peer.send_message(protocol.ConnectResponse(True, stray))
        await peer.expect_pong()
        await peer.aclose()


async def test_client_vanishing_mid_transfer_frees_its_channels(env, nursery):
    tunnel, echo_port = env
    target_done = trio.Event()
    hose = firehose_handler()

    async def watched(stream):
        try:
            await hose(stream)
        finally:
            target_done.set()

    hose_port = await serve_tcp(nursery, watched)
    async with healthy_channel(tunnel, echo_port):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert (await peer.authenticate()).success
        channel = protocol.new_channel_id()
        await peer.send_message(protocol.Connect(protocol.TCP, channel, "127.0.0.1", hose_port))
        received = 0
        with trio.fail_after(5):
            while received < 1 << 20:
                kind, value = await peer.next()
                if kind == "data":
                    received += len(value[1])
        await peer.aclose()  # vanish without a close frame
        with trio.fail_after(5):
            await target_done.wait()  # the server closed its connection to the target
        sessions = list(tunnel.server.sessions)
        assert all(channel not in s.channels for s in sessions)


async def test_duplicate_channel_id_is_refused(env):
    tunnel, echo_port = env
    peer = await RawPeer.connect(tunnel.ws_port)
    assert (await peer.authenticate()).success
    channel = protocol.new_channel_id()
    connect = protocol.Connect(protocol.TCP, channel, "127.0.0.1", echo_port)
    await peer.send_message(connect)
    kind, data = await peer.next()
    assert protocol.parse(data) == protocol.ConnectResponse(True, channel)
    await peer.send_message(connect)  # same id again: ignored, the first channel keeps working
    await peer.send_message(protocol.Data(protocol.TCP, channel, b"ping"))
    with trio.fail_after(5):
        kind, value = await peer.next()
    assert kind == "data" and value == (channel, b"ping")
    await peer.aclose()


def test_channel_state_constants_are_ordered():
    # deliver() relies on CLOSED being the last state
    from trisocks.net import channel

    assert channel.OPENING < channel.OPEN < channel.LOCAL_CLOSED < channel.REMOTE_CLOSED < CLOSED


async def test_channel_limit_per_session(env, monkeypatch):
    tunnel, echo_port = env
    from trisocks.net import session as session_module

    monkeypatch.setattr(session_module, "MAX_CHANNELS", 3)
    peer = await RawPeer.connect(tunnel.ws_port)
    assert (await peer.authenticate()).success
    answers = []
    for _ in range(4):
        channel = protocol.new_channel_id()
        await peer.send_message(protocol.Connect(protocol.TCP, channel, "127.0.0.1", echo_port))
        kind, data = await peer.next()
        answers.append(protocol.parse(data))
    assert [a.success for a in answers] == [True, True, True, False]
    assert answers[3].error == "too many channels"
    await peer.aclose()


async def test_repeated_wrong_tokens_get_429(env):
    tunnel, echo_port = env
    from trisocks.tunnel.throttle import FailureLimiter

    tunnel.server.auth_limiter = FailureLimiter(max_failures=3, window=60)
    for _ in range(3):
        peer = await RawPeer.connect(tunnel.ws_port)
        assert not (await peer.authenticate("wrong-token-123456")).success
        await peer.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", tunnel.ws_port)
    await stream.send_all(b"GET /socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    answer = b""
    while data := await stream.receive_some(4096):
        answer += data
    assert answer.startswith(b"HTTP/1.1 429") and b"Retry-After: " in answer
    await stream.aclose()
    # tunnels already up are not affected
    async with healthy_channel(tunnel, echo_port):
        pass
