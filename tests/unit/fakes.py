"""Test doubles shared by the unit tests: a transport the test drives by hand."""

from __future__ import annotations

import trio


class FakeTransport:
    """A transport whose writes the test controls.

    ``try_send`` takes up to ``take_now`` bytes (0: the socket is busy). ``write_some``
    records the views it was given and waits for the test to ``grant(n)``, then writes
    up to ``n`` bytes of them. ``fail_with`` makes the next call raise.
    """

    def __init__(self, take_now: int = 0) -> None:
        self.take_now = take_now
        self.written = bytearray()
        self.batches: list[int] = []  # how many views each write_some call had
        self.fail_with: BaseException | None = None
        self.closed = False
        self._send, self._receive = trio.open_memory_channel(100)
        self._in_send, self._in_receive = trio.open_memory_channel(1000)
        self._in_buf = b""

    def try_send(self, frame) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        n = min(self.take_now, len(frame))
        self.take_now -= n
        self.written += bytes(frame[:n])
        return n

    async def write_some(self, views) -> int:
        self.batches.append(len(views))
        budget = await self._receive.receive()
        if self.fail_with is not None:
            raise self.fail_with
        n = 0
        for view in views:
            take = min(budget - n, len(view))
            self.written += bytes(view[:take])
            n += take
            if take < len(view):
                break
        return n

    def grant(self, n: int = 1 << 40) -> None:
        """Let the pending (or next) write_some write up to ``n`` bytes."""
        self._send.send_nowait(n)

    def fail(self, exc: BaseException) -> None:
        """Make the pending write_some (and every later call) raise ``exc``."""
        self.fail_with = exc
        self._send.send_nowait(0)

    def feed(self, data: bytes) -> None:
        """Bytes for recv_into, as if the peer sent them (b"": EOF)."""
        self._in_send.send_nowait(data)

    async def recv_into(self, view) -> int:
        if not self._in_buf:
            self._in_buf = await self._in_receive.receive()
        n = min(len(view), len(self._in_buf))
        view[:n] = self._in_buf[:n]
        self._in_buf = self._in_buf[n:]
        return n

    async def aclose(self) -> None:
        self.closed = True


class FakeHost:
    """A session as a channel end sees it (trisocks.net.contracts.ChannelHost), recording
    what is sent: control messages in ``sent``, data frames through a real Outbox whose
    transport takes everything at once (see :meth:`data`)."""

    def __init__(self, *, peer_window=None, recv_window=0, half_close=False, pending_limit=1 << 62,
                 nursery=None) -> None:
        from trisocks.net.flow import WindowBudget, initial_window
        from trisocks.net.outbox import Outbox

        self.transport = FakeTransport(take_now=1 << 62)
        self.outbox = Outbox(self.transport)
        self.peer_window = peer_window
        self.recv_window = initial_window(recv_window) if peer_window else 0
        self.windows = WindowBudget(recv_window or (16 << 20))
        self.half_close = half_close
        self.pending_limit = pending_limit
        self.pending_bytes = 0
        self.pending_max = 1 << 62
        self.channels: dict = {}
        self.trace = False
        self.sent: list = []
        self.nursery = nursery
        self.closed = False

    def mask_key(self):
        return None

    def send(self, msg) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        self.sent.append(msg)

    def send_if_open(self, msg) -> None:
        if not self.closed:
            self.sent.append(msg)

    def spawn(self, fn, *args, unit: str = "channel") -> None:
        self.nursery.start_soon(fn, *args)

    def register(self, ch, account=None) -> None:
        self.channels[ch.id] = ch
        ch.account = account
        if account is not None:
            account.opened(ch)

    def forget(self, ch) -> None:
        if self.channels.get(ch.id) is ch:
            del self.channels[ch.id]
            if ch.account is not None:
                ch.account.closed(ch)

    def pending_changed(self, delta: int) -> None:
        self.pending_bytes += delta

    async def wait_sent(self) -> None:
        await trio.lowlevel.checkpoint()

    def of_type(self, kind) -> list:
        return [m for m in self.sent if type(m) is kind]

    def data(self) -> bytes:
        """The payload of every Data frame written so far, in order."""
        from trisocks.wire import codec

        dec = codec.Decoder(expect_masked=False)
        dec.feed_bytes(bytes(self.transport.written))
        out = bytearray()
        while True:
            ev = dec.next_event()
            if ev == codec.NEED_DATA:
                return bytes(out)
            assert ev == codec.DATA, ev
            out += dec.data
