"""trisocks.net.session: a WebSocket carrying channels, over a transport the test drives."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trisocks.net import session as session_mod
from trisocks.net.session import OUTBOX_MAX, PROCESS, ChannelGroup, Handler, Session
from trisocks.wire import codec, csprng, protocol

from .fakes import FakeTransport

CID = bytes(range(32, 48))


def frame(msg) -> bytes:
    """A message as the (client-side, masking) peer sends it."""
    return codec.encode_frame(codec.OP_BINARY, protocol.pack(msg), csprng.mask_key())


def ping(payload: bytes = b"p") -> bytes:
    return codec.encode_frame(codec.OP_PING, payload, csprng.mask_key())


def written_events(t: FakeTransport) -> list:
    """What the session wrote, as (event, data) pairs."""
    dec = codec.Decoder(expect_masked=False)
    dec.feed_bytes(bytes(t.written))
    out = []
    while (ev := dec.next_event()) != codec.NEED_DATA:
        out.append((ev, bytes(dec.data)))
    return out


class RecordingEnd:
    """A channel end that records what the session calls."""

    def __init__(self, cid: bytes = CID) -> None:
        self.id = cid
        self.account = None
        self.calls: list = []
        self.uploaded = self.downloaded = 0

    def deliver(self, data, decoder=None) -> bool:
        self.calls.append(("data", bytes(data)))
        return False

    async def wait_space(self) -> None:
        pass

    def add_credit(self, n: int) -> None:
        self.calls.append(("credit", n))

    def on_response(self, msg) -> None:
        self.calls.append(("response", msg.success))

    def on_remote_disconnect(self, error: str) -> None:
        self.calls.append(("disconnect", error))

    def on_remote_eof(self) -> None:
        self.calls.append(("eof",))

    def on_datagram(self, msg) -> None:
        self.calls.append(("datagram", msg.data))

    def fail(self, error: str) -> None:
        self.calls.append(("fail", error))

    def abort(self) -> None:
        self.calls.append(("abort",))


def make(t: FakeTransport, **kw) -> Session:
    return Session(t, codec.Decoder(expect_masked=True), client_side=False, handler=Handler(), **kw)


async def test_messages_reach_their_channel_end():
    t = FakeTransport(take_now=1 << 30)
    s = make(t)
    end = RecordingEnd()
    s.register(end)
    t.feed(frame(protocol.Data(protocol.TCP, CID, b"payload")))
    t.feed(frame(protocol.WindowUpdate(CID, 4096)))
    t.feed(frame(protocol.Eof(CID)))
    t.feed(frame(protocol.Data(protocol.UDP, CID, b"dgram", target_address="1.2.3.4", target_port=53)))
    t.feed(frame(protocol.Disconnect(CID, "bye")))
    t.feed(frame(protocol.Data(protocol.TCP, bytes(16), b"nobody's")))
    t.feed(b"")
    with trio.fail_after(5):
        await s.run()
    assert end.calls == [("data", b"payload"), ("credit", 4096), ("eof",), ("datagram", b"dgram"),
                         ("disconnect", "bye"), ("abort",)]
    assert s.unknown_data == 1
    assert s.close_reason == "peer closed the connection"
    assert t.closed


async def test_a_connect_goes_to_the_handler_which_refuses_by_default():
    t = FakeTransport(take_now=1 << 30)
    s = make(t)
    t.feed(frame(protocol.Connect(protocol.TCP, CID, "example.org", 80)))
    t.feed(b"")
    with trio.fail_after(5):
        await s.run()
    msgs = [protocol.parse(d) for ev, d in written_events(t) if ev == codec.MESSAGE]
    assert protocol.ConnectResponse(False, CID, "not allowed") in msgs


async def test_pings_are_answered_and_waiting_pongs_coalesce(mock_clock):
    mock_clock.autojump_threshold = 0
    t = FakeTransport(take_now=0)  # the peer does not read
    s = make(t)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run)
        t.feed(ping(b"first"))
        await trio.testing.wait_all_tasks_blocked()
        one = s.outbox.queued_bytes
        assert one > 0
        for i in range(1000):
            t.feed(ping(b"ping%04d" % i))
        await trio.testing.wait_all_tasks_blocked()
        # the first pong is being written; of the 1000 after it only one waits
        assert s.outbox.queued_bytes <= 2 * one + 8
        assert len(t.batches) == 1
        s.close()
        t.grant()
    assert s.closed.is_set()


async def test_a_peer_that_does_not_read_is_closed_past_outbox_max(mock_clock):
    mock_clock.autojump_threshold = 0
    t = FakeTransport(take_now=0)
    s = make(t)
    big = protocol.Data(protocol.TCP, CID, b"d" * (1 << 20))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run)
        await trio.testing.wait_all_tasks_blocked()
        sent = 0
        while not s.close_reason:
            s.send(big)
            sent += 1 << 20
            assert sent < 2 * OUTBOX_MAX
        assert OUTBOX_MAX <= sent <= OUTBOX_MAX + (2 << 20)
        assert s.close_reason == "peer does not read"
        with trio.fail_after(10):
            await s.closed.wait()
        with pytest.raises(trio.ClosedResourceError):
            s.send(big)
    assert t.closed


async def test_idle_peer_is_dropped(mock_clock):
    mock_clock.autojump_threshold = 0
    t = FakeTransport(take_now=1 << 30)
    s = make(t, ping_interval=10, idle_timeout=25)
    start = trio.current_time()
    with trio.fail_after(100):
        await s.run()
    assert s.close_reason == "idle timeout"
    assert 25 <= trio.current_time() - start <= 45
    assert [ev for ev, _ in written_events(t)].count(codec.PING) >= 2


async def test_responsive_follows_unanswered_pings(mock_clock):
    mock_clock.autojump_threshold = 0
    t = FakeTransport(take_now=1 << 30)
    s = make(t)
    assert s.responsive(trio.current_time(), 5)
    s.ping()
    await trio.sleep(3)
    s.ping()  # the first unanswered ping keeps its time
    await trio.sleep(3)
    assert not s.responsive(trio.current_time(), 5)
    t.feed(codec.encode_frame(codec.OP_PONG, b"trisocks", csprng.mask_key()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run)
        await trio.testing.wait_all_tasks_blocked()
        assert s.responsive(trio.current_time(), 5)
        assert s.rtt == pytest.approx(6)
        s.close()
    assert not s.responsive(trio.current_time(), 5)


async def test_refuse_reason_counts_channels_of_the_session_the_group_and_the_process(monkeypatch):
    t = FakeTransport(take_now=1 << 30)
    s = make(t)
    assert s.refuse_reason() is None
    s.max_channels = 2
    a, b = RecordingEnd(bytes(16)), RecordingEnd(bytes(15) + b"\x01")
    s.register(a)
    s.register(b)
    assert s.refuse_reason() == "too many channels"
    s.forget(a)
    assert s.refuse_reason() is None

    s.group = ChannelGroup(limit=3)
    s.group.open = 3  # other sessions of the token
    assert s.refuse_reason() == "too many channels for this token"
    s.group.open = 0

    monkeypatch.setattr(PROCESS, "open", PROCESS.limit())
    assert s.refuse_reason() == "server out of connections"
    monkeypatch.undo()

    class Over:
        pace_up = pace_down = None  # no speed limit

        def admit(self):
            return self.refuse_reason()

        def refuse_reason(self):
            return "expired"

        def opened(self, ch):
            pass

        def closed(self, ch):
            pass

    assert s.refuse_reason(Over()) == "expired"
    s.account = Over()
    assert s.refuse_reason() == "expired"


async def test_register_and_forget_keep_the_counts_and_tell_the_account():
    t = FakeTransport(take_now=1 << 30)
    s = make(t)
    s.group = ChannelGroup(limit=10)
    seen = []

    class Account:
        pace_up = pace_down = None  # no speed limit

        def admit(self):
            return self.refuse_reason()

        def opened(self, ch):
            seen.append(("opened", ch))

        def closed(self, ch):
            seen.append(("closed", ch))

    before = session_mod.PROCESS.open
    end = RecordingEnd()
    s.register(end, Account())
    assert (s.group.open, PROCESS.open - before, s.channels_total) == (1, 1, 1)
    s.forget(end)
    s.forget(end)  # twice: once
    assert (s.group.open, PROCESS.open - before) == (0, 0)
    assert seen == [("opened", end), ("closed", end)]
