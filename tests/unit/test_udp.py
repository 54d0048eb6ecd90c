"""trisocks.net.udp: the parts that need no sockets (address matching, channel bookkeeping)."""

from __future__ import annotations

import trio

from trisocks.net.udp import _same_ip, _UdpChannel
from trisocks.wire import protocol

from .fakes import FakeHost

CID = bytes(range(48, 64))


def test_same_ip_compares_addresses_not_text():
    assert _same_ip("127.0.0.1", "127.0.0.1")
    assert _same_ip("::1", "0:0:0:0:0:0:0:1")
    assert _same_ip("::ffff:10.0.0.1", "10.0.0.1")
    assert _same_ip("10.0.0.1", "::ffff:10.0.0.1")
    assert _same_ip("fe80::1%eth0", "fe80::1")
    assert not _same_ip("10.0.0.1", "10.0.0.2")
    assert not _same_ip("::1", "127.0.0.1")
    assert not _same_ip("not-an-ip", "10.0.0.1")


def datagram(data: bytes) -> protocol.Data:
    return protocol.Data(protocol.UDP, CID, data, target_address="1.2.3.4", target_port=53)


async def test_send_datagram_is_dropped_when_the_websocket_is_congested():
    host = FakeHost()
    ch = _UdpChannel(host, CID)
    assert ch.send_datagram(datagram(b"one"))
    host.outbox.high_water = 0
    host.transport.take_now = 0  # the socket is busy: a frame waits
    host.outbox.send_nowait(b"frame")
    assert not ch.send_datagram(datagram(b"two"))
    assert ch.dropped == 1
    assert host.sent == [datagram(b"one")]


async def test_an_account_past_its_limit_ends_the_association():
    class Account:
        pace_up = pace_down = None  # no speed limit

        def admit(self):
            return self.refuse_reason()

        def charge(self, n):
            return False

        def refuse_reason(self):
            return "expired"

    host = FakeHost()
    ch = _UdpChannel(host, CID)
    ch.account = Account()
    assert not ch.send_datagram(datagram(b"x"))
    assert host.sent == [protocol.Disconnect(CID, "expired")]
    assert ch.error == "expired"


async def test_response_and_disconnect_wake_the_opener():
    ch = _UdpChannel(FakeHost(), CID)
    ch.on_response(protocol.ConnectResponse(True, CID))
    assert (await ch.wait_response(1)).success
    other = _UdpChannel(FakeHost(), CID)
    other.on_remote_disconnect("gone")
    with trio.fail_after(1):
        assert await other.wait_response(10) is None


async def test_finish_forgets_once():
    host = FakeHost()
    ch = _UdpChannel(host, CID)
    host.register(ch)
    ch.finish()
    ch.finish()
    assert CID not in host.channels
    assert ch.deliver(b"stream bytes") is False  # no stream half
