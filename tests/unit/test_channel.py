"""trisocks.net.channel: one TCP connection over a session, on a real socket pair."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from trisocks.net.channel import CLOSED, LOCAL_CLOSED, OPEN, REMOTE_CLOSED, Channel
from trisocks.net.flow import INITIAL_WINDOW
from trisocks.wire import protocol

from .fakes import FakeHost

CID = bytes(range(16, 32))


@pytest.fixture
def socks():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def flow_host(nursery, **kw) -> FakeHost:
    return FakeHost(peer_window=1 << 20, recv_window=16 << 20, nursery=nursery, **kw)


async def read_exactly(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        assert chunk, "EOF before the expected bytes"
        out += chunk
    return bytes(out)


async def read_to_eof(sock) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            return bytes(out)
        out += chunk


async def test_deliver_writes_to_the_socket(socks):
    a, b = socks
    host = FakeHost()
    ch = Channel(host, CID)
    ch.attach(a)
    assert ch.state == OPEN
    assert ch.deliver(b"hello") is False
    assert await read_exactly(b, 5) == b"hello"
    assert ch.bytes_down == 5


async def test_bytes_before_the_socket_are_held_then_written(socks):
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery)
        ch = Channel(host, CID)
        ch.deliver(b"early ")
        ch.deliver(b"bytes")
        assert ch.held == 11 and host.pending_bytes == 11
        ch.attach(a)
        assert await read_exactly(b, 11) == b"early bytes"
        await trio.testing.wait_all_tasks_blocked()
        assert ch.held == 0 and host.pending_bytes == 0


async def test_what_the_socket_refuses_is_drained_in_order(socks):
    a, b = socks
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket pair holds
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        ch.deliver(payload[:1000])
        ch.deliver(memoryview(payload)[1000:])
        assert ch.held > 0  # the socket did not take it all
        assert await read_exactly(b, len(payload)) == payload
        await trio.testing.wait_all_tasks_blocked()
        assert ch.held == 0 and not ch.pending


async def test_a_linksocks_peer_past_the_limit_makes_the_read_loop_wait(socks):
    a, b = socks
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery, pending_limit=64 << 10)
        ch = Channel(host, CID)
        ch.attach(a)
        assert ch.deliver(b"x" * (1 << 20)) is True
        released = trio.Event()

        async def read_loop():
            await ch.wait_space()
            released.set()

        nursery.start_soon(read_loop)
        await trio.testing.wait_all_tasks_blocked()
        assert not released.is_set()
        await read_exactly(b, (1 << 20) - (64 << 10) - 1)  # down to the limit: space again
        await released.wait()
        await read_exactly(b, (64 << 10) + 1)


async def test_window_update_grows_while_the_reader_keeps_up(socks):
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = flow_host(nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        assert ch.window == INITIAL_WINDOW
        quarter = INITIAL_WINDOW // 4
        ch.deliver(b"q" * (quarter - 1))
        assert host.of_type(protocol.WindowUpdate) == []
        ch.deliver(b"q")
        [wu] = host.of_type(protocol.WindowUpdate)
        assert wu == protocol.WindowUpdate(CID, quarter + INITIAL_WINDOW)
        assert ch.window == 2 * INITIAL_WINDOW
        await read_exactly(b, quarter)
        ch.finish()
        assert host.windows.grown == 0  # the growth went back to the session


async def test_no_growth_while_the_reader_lags(socks):
    a, b = socks
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.open_nursery() as nursery:
        host = flow_host(nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        ch.deliver(b"s" * INITIAL_WINDOW)  # the whole window: much of it is held
        assert ch.held
        await read_exactly(b, INITIAL_WINDOW)
        await trio.testing.wait_all_tasks_blocked()
        grants = host.of_type(protocol.WindowUpdate)
        assert sum(w.credit for w in grants) >= INITIAL_WINDOW * 3 // 4
        assert ch.window < sum(w.credit for w in grants) + INITIAL_WINDOW  # not every grant grew it
        nursery.cancel_scope.cancel()


async def test_a_peer_exceeding_its_window_fails_the_channel(socks):
    a, b = socks
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.open_nursery() as nursery:
        host = flow_host(nursery)
        ch = Channel(host, CID)  # no socket yet: everything is held
        ch.deliver(b"w" * INITIAL_WINDOW)
        assert ch.error == ""
        ch.deliver(b"w")
        assert ch.error == "peer exceeded the flow-control window"
        assert host.of_type(protocol.Disconnect) == [
            protocol.Disconnect(CID, "peer exceeded the flow-control window")]
        assert ch.held == 0 and host.pending_bytes == 0
        assert ch.deliver(b"more") is False


async def test_the_pump_sends_socket_bytes_within_credit(socks):
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = FakeHost(peer_window=10, recv_window=1 << 20, nursery=nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        nursery.start_soon(ch.run)
        b.sendall(b"0123456789abcdef")
        await trio.testing.wait_all_tasks_blocked()
        assert host.data() == b"0123456789"  # the credit the peer granted
        ch.add_credit(100)
        await trio.testing.wait_all_tasks_blocked()
        assert host.data() == b"0123456789abcdef"
        assert ch.bytes_up == 16
        nursery.cancel_scope.cancel()


async def test_half_close_both_ways_when_negotiated(socks):
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = flow_host(nursery, half_close=True)
        host.channels[CID] = ch = Channel(host, CID)
        ch.attach(a)
        nursery.start_soon(ch.run)
        b.sendall(b"request")
        b.shutdown(socket.SHUT_WR)  # the client is done sending
        await trio.testing.wait_all_tasks_blocked()
        assert host.data() == b"request"
        assert host.of_type(protocol.Eof) == [protocol.Eof(CID)]
        assert ch.state == OPEN  # the response may still come
        ch.deliver(b"response")
        ch.on_remote_eof()
        assert await read_to_eof(b) == b"response"
        await trio.testing.wait_all_tasks_blocked()
        assert ch.state == CLOSED
        assert host.of_type(protocol.Disconnect) == []
        assert CID not in host.channels


async def test_without_half_close_a_client_eof_becomes_disconnect(socks, mock_clock):
    mock_clock.autojump_threshold = 0
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery)
        ch = Channel(host, CID)
        ch.ingress = True
        ch.attach(a)
        nursery.start_soon(ch.run)
        b.shutdown(socket.SHUT_WR)
        await trio.sleep(60)  # no response, no Disconnect from the far end: give up
        assert host.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "")]
        assert ch.state == CLOSED


async def test_remote_disconnect_flushes_and_answers(socks):
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        nursery.start_soon(ch.run)
        ch.deliver(b"last words")
        ch.on_remote_disconnect("")
        assert ch.state in (REMOTE_CLOSED, CLOSED)
        assert host.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "")]
        assert await read_to_eof(b) == b"last words"
    assert ch.state == CLOSED


async def test_disconnect_after_our_own_ends_the_linger(socks, mock_clock):
    mock_clock.autojump_threshold = 0
    a, b = socks
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery=nursery)
        ch = Channel(host, CID)
        ch.attach(a)
        nursery.start_soon(ch.run)
        b.sendall(b"bye")
        b.shutdown(socket.SHUT_WR)  # the target ended: the peer has no half-close
        await trio.sleep(0.001)
        start = trio.current_time()
        while not host.of_type(protocol.Disconnect):
            await trio.sleep(0.01)
        assert ch.state == LOCAL_CLOSED
        ch.on_remote_disconnect("")
        await trio.testing.wait_all_tasks_blocked()
        assert ch.state == CLOSED
        assert trio.current_time() - start < 1
        assert len(host.of_type(protocol.Disconnect)) == 1  # no answer to an answer


async def test_wait_response_and_a_disconnect_instead():
    host = FakeHost()
    ch = Channel(host, CID)
    got = []

    async def opener():
        got.append(await ch.wait_response(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await trio.testing.wait_all_tasks_blocked()
        ch.on_remote_disconnect("refused")
    assert got == [protocol.ConnectResponse(False, CID, "refused")]


async def test_an_account_over_its_limit_fails_the_channel(socks):
    a, b = socks

    class Account:
        pace_up = pace_down = None  # no speed limit

        def admit(self):
            return self.refuse_reason()

        def charge(self, n):
            return n < 100

        def refuse_reason(self):
            return "traffic limit reached"

    host = FakeHost()
    ch = Channel(host, CID)
    ch.account = Account()
    ch.attach(a)
    ch.deliver(b"small")
    ch.deliver(b"L" * 100)
    assert ch.error == "traffic limit reached"
    assert host.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "traffic limit reached")]
    assert await read_exactly(b, 5) == b"small"


async def test_a_reset_socket_fails_the_channel(socks):
    a, b = socks
    host = FakeHost()
    ch = Channel(host, CID)
    ch.attach(a)
    b.close()
    ch.deliver(b"into the void")
    assert ch.error
    assert [m.channel for m in host.of_type(protocol.Disconnect)] == [CID]
