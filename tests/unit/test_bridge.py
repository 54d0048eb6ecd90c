"""trisocks.tunnel.bridge: one channel relayed between a connector's and a provider's session."""

from __future__ import annotations

import trio
import trio.testing

from trisocks.net.channel import LINGER
from trisocks.net.flow import INITIAL_WINDOW
from trisocks.tunnel.bridge import Bridge
from trisocks.wire import protocol

from .fakes import FakeHost

CID = bytes(range(16))


def pair(connector: FakeHost, provider: FakeHost):
    bridge = Bridge(connector, CID, "example.org:80")
    connector.register(bridge.connector)
    end = bridge.attach_provider(provider)
    assert end is not None
    return bridge


async def test_bytes_pass_both_ways():
    c, p = FakeHost(), FakeHost()
    b = pair(c, p)
    b.connector.deliver(b"request")
    b.provider.deliver(b"response")
    assert p.data() == b"request"
    assert c.data() == b"response"
    assert (b.connector.uploaded, b.connector.downloaded) == (7, 8)


async def test_an_end_sends_only_as_far_as_its_peer_grants():
    c = FakeHost(peer_window=10, recv_window=1 << 20)
    p = FakeHost()
    b = pair(c, p)
    b.provider.deliver(b"a" * 25)
    assert c.data() == b"a" * 10
    assert len(b.connector.out) == 15
    b.connector.add_credit(10)
    assert c.data() == b"a" * 20
    b.connector.add_credit(100)
    assert c.data() == b"a" * 25
    assert not b.connector.out


async def test_a_congested_end_makes_the_other_read_loop_wait():
    c = FakeHost(peer_window=10, recv_window=1 << 20, pending_limit=100)
    p = FakeHost(pending_limit=100)
    b = pair(c, p)
    assert not b.provider.deliver(b"x" * 100)
    assert b.provider.deliver(b"x" * 20)  # 110 waiting for the connector's peer: wait
    released = trio.Event()

    async def read_loop():
        await b.provider.wait_space()
        released.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_loop)
        await trio.testing.wait_all_tasks_blocked()
        assert not released.is_set()
        b.connector.add_credit(1000)
    assert released.is_set()


async def test_early_bytes_wait_for_the_provider():
    c, p = FakeHost(), FakeHost()
    bridge = Bridge(c, CID, "t")
    c.register(bridge.connector)
    bridge.connector.deliver(b"GET / ")
    bridge.connector.deliver(b"HTTP/1.1\r\n")
    assert bridge.attach_provider(p) is bridge.provider
    assert p.data() == b"GET / HTTP/1.1\r\n"
    assert CID in p.channels


async def test_attach_refuses_a_provider_that_uses_the_id():
    c, p = FakeHost(), FakeHost()
    p.channels[CID] = object()
    bridge = Bridge(c, CID, "t")
    assert bridge.attach_provider(p) is None


async def test_window_updates_grow_while_the_far_side_keeps_up():
    c = FakeHost(peer_window=1 << 20, recv_window=1 << 20)
    p = FakeHost()
    b = pair(c, p)
    window = b.connector.window
    assert window == INITIAL_WINDOW
    b.connector.deliver(b"u" * (window // 4 - 1))
    assert c.of_type(protocol.WindowUpdate) == []
    b.connector.deliver(b"u")  # a quarter of the window has gone on to the provider
    [wu] = c.of_type(protocol.WindowUpdate)
    assert wu.channel == CID
    assert wu.credit == window // 4 + window  # what it sent, and the window doubled
    assert b.connector.window == 2 * window


async def test_no_growth_while_the_far_side_lags():
    c = FakeHost(peer_window=1 << 20, recv_window=1 << 20)
    p = FakeHost(peer_window=1)  # the provider's peer grants next to nothing
    b = pair(c, p)
    window = b.connector.window
    b.connector.deliver(b"u" * window)
    assert p.data() == b"u"
    assert c.of_type(protocol.WindowUpdate) == []  # nothing left: nothing to acknowledge
    b.provider.add_credit(window // 4)
    [wu] = c.of_type(protocol.WindowUpdate)
    assert wu.credit == window // 4 + 1
    assert b.connector.window == window


async def test_eof_passes_through_when_both_peers_speak_half_close():
    c = FakeHost(peer_window=1 << 20, recv_window=1 << 20, half_close=True)
    p = FakeHost(peer_window=1 << 20, recv_window=1 << 20, half_close=True)
    b = pair(c, p)
    b.connector.on_remote_eof()
    assert p.of_type(protocol.Eof) == [protocol.Eof(CID)]
    assert b.connector.state == 0  # the other direction goes on
    b.provider.deliver(b"late answer")
    assert c.data() == b"late answer"
    b.provider.on_remote_eof()
    assert c.of_type(protocol.Eof) == [protocol.Eof(CID)]
    assert b.connector.state == b.provider.state == 1  # both directions done
    assert not c.channels and not p.channels
    assert not c.of_type(protocol.Disconnect) and not p.of_type(protocol.Disconnect)


async def test_eof_waits_for_the_bytes_before_it():
    c = FakeHost(peer_window=4, recv_window=1 << 20, half_close=True)
    p = FakeHost(peer_window=1 << 20, recv_window=1 << 20, half_close=True)
    b = pair(c, p)
    b.provider.deliver(b"12345678")
    b.provider.on_remote_eof()
    assert c.of_type(protocol.Eof) == []
    b.connector.add_credit(4)
    assert c.data() == b"12345678"
    assert c.of_type(protocol.Eof) == [protocol.Eof(CID)]


async def test_a_destination_eof_becomes_disconnect_for_a_linksocks_connector():
    c = FakeHost()  # no half-close
    p = FakeHost(peer_window=1 << 20, recv_window=1 << 20, half_close=True)
    async with trio.open_nursery() as nursery:
        c.nursery = p.nursery = nursery
        b = pair(c, p)
        b.provider.on_remote_eof()
        assert [m.channel for m in c.of_type(protocol.Disconnect)] == [CID]
        nursery.cancel_scope.cancel()


async def test_a_client_eof_is_not_passed_to_a_linksocks_provider():
    c = FakeHost(peer_window=1 << 20, recv_window=1 << 20, half_close=True)
    p = FakeHost()
    b = pair(c, p)
    b.connector.on_remote_eof()
    assert p.sent == []
    assert b.provider.state == 0


async def test_disconnect_is_forwarded_and_the_answer_ends_the_bridge(mock_clock):
    mock_clock.autojump_threshold = 0
    c, p = FakeHost(), FakeHost()
    async with trio.open_nursery() as nursery:
        c.nursery = p.nursery = nursery
        b = pair(c, p)
        b.connector.on_remote_disconnect("")
        assert p.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "")]
        assert b.provider.state == 0  # lingering: the provider may still answer
        b.provider.deliver(b"last bytes")
        assert c.data() == b"last bytes"
        b.provider.on_remote_disconnect("")
        assert b.connector.state == b.provider.state == 1
        assert not c.channels and not p.channels


async def test_an_unanswered_disconnect_ends_after_the_linger(mock_clock):
    mock_clock.autojump_threshold = 0
    c, p = FakeHost(), FakeHost()
    async with trio.open_nursery() as nursery:
        c.nursery = p.nursery = nursery
        b = pair(c, p)
        start = trio.current_time()
        b.connector.on_remote_disconnect("boom")
        assert p.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "boom")]
        await trio.sleep(LINGER - 0.5)
        assert b.provider.state == 0
        await trio.sleep(1)
        assert b.connector.state == b.provider.state == 1
        assert trio.current_time() - start < LINGER + 1


async def test_fail_tells_both_peers():
    c, p = FakeHost(), FakeHost()
    b = pair(c, p)
    b.connector.fail("traffic limit reached")
    assert c.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "traffic limit reached")]
    assert p.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "traffic limit reached")]
    assert not c.channels and not p.channels


async def test_a_session_that_goes_tells_the_other_side():
    c, p = FakeHost(), FakeHost()
    b = pair(c, p)
    b.provider.abort()
    assert c.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "peer disconnected")]
    assert p.sent == []
    assert b.connector.state == 1


async def test_only_the_providers_response_is_forwarded():
    c, p = FakeHost(), FakeHost()
    b = pair(c, p)
    b.connector.on_response(protocol.ConnectResponse(True, CID))
    assert c.sent == []
    b.provider.on_response(protocol.ConnectResponse(False, CID, "refused"))
    assert c.of_type(protocol.ConnectResponse) == [protocol.ConnectResponse(False, CID, "refused")]
    assert b.connector.state == 1  # a failed connect ends the bridge


async def test_the_connectors_account_is_charged_and_can_stop_it():
    class Account:
        pace_up = pace_down = None  # no speed limit

        def admit(self):
            return self.refuse_reason()

        def __init__(self):
            self.used = 0

        def charge(self, n):
            self.used += n
            return self.used <= 10

        def refuse_reason(self):
            return "traffic limit reached"

        def opened(self, ch):
            pass

        def closed(self, ch):
            pass

    c, p = FakeHost(), FakeHost()
    b = pair(c, p)
    b.connector.account = Account()
    b.provider.deliver(b"12345")
    b.connector.deliver(b"12345")
    assert b.connector.state == 0
    b.provider.deliver(b"1")
    assert b.connector.state == 1
    assert p.of_type(protocol.Disconnect) == [protocol.Disconnect(CID, "traffic limit reached")]
