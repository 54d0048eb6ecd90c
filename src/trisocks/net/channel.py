"""A channel: one TCP connection carried over a WebSocket session.

Bytes flow two ways:

* **socket -> tunnel** (:meth:`Channel.run`, in the task that owns the
  channel): wait until the socket is readable, take a buffer from the pool,
  ``recv_into`` it behind ``HEADROOM`` bytes, frame it in place and hand it
  to the session's outbox. An idle channel holds no buffer.
* **tunnel -> socket** (:meth:`Channel.deliver`, called by the session's read
  loop for every Data piece): send straight from the decoder's buffer when the
  socket takes it; whatever the socket refuses is copied to ``pending`` and a
  drain task finishes the job.

Nothing is dropped and memory stays bounded: with a trisocks peer, each side
grants the other a window of unacknowledged bytes per channel (WindowUpdate
messages), so a stalled reader stops only its own sender. With LinkSocks
peers, which have no such message, a channel whose ``pending`` passes its
limit makes the read loop wait (backpressure on the whole WebSocket) rather
than buffer without end.

Closing. Between trisocks peers that negotiated it, an EOF is a half-close: the
side whose socket ended sends ``Eof``, the other flushes what it holds and shuts
down its socket's sending direction, and the other direction goes on until its
own EOF (``nc -N``, ``socat`` and some HTTP clients send the request, then EOF,
then read the response). A channel whose two directions have both ended is
done; an error (a reset, a refused write) ends both at once with Disconnect.

With LinkSocks peers there is no half-close: whoever sees its socket end sends
Disconnect; the other side flushes what it holds, closes its socket and answers
with its own Disconnect, which ends the first side's short linger. When the
destination ends (a close-delimited response), the Disconnect follows its last
byte at once: one WebSocket keeps messages in order. When the SOCKS5 client
ends its sending side first, the response may still be on its way, so the
channel waits for the far end's Disconnect for as long as bytes keep arriving.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import ParkingLot, checkpoint, wait_readable

from ..wire import protocol
from ..wire.codec import HEADROOM, OP_BINARY, encode_data, encode_frame
from .delivery import CLOSED, LOCAL_CLOSED, OPEN, OPENING, REMOTE_CLOSED, Delivery
from .flow import UNLIMITED
from .transport import close_socket

if TYPE_CHECKING:
    from .contracts import ChannelHost

log = logging.getLogger("trisocks.channel")

# Largest Data payload we send: one read from a socket. Per frame there is fixed work
# (Python, two syscalls), so bigger is cheaper per byte: 1 MiB frames take ~30% less CPU
# per GiB than 256 KiB ones (docs/performance.md). pywssocks caps a whole message at
# 1 MiB, headers included, hence 1023 KiB.
CHUNK = 1023 << 10
LINGER = 5.0  # how long a closing channel waits for the peer's Disconnect or for a slow reader
# A SOCKS5 client ended its sending side, and the peer cannot be told (no half-close): the
# response may still come; give up once nothing has arrived for this long.
EOF_IDLE = 5.0
# pywssocks throws away what it still queues for its socket when Disconnect arrives, and has
# no message to say it wrote it: after the destination's EOF, once the peer's kernel has every
# byte, allow it time to write them at this (modest, for loopback) rate, up to EOF_DRAIN_MAX.
PEER_DRAIN_RATE = 300e6
EOF_DRAIN_MAX = 2.0


class BufferPool:
    """Reusable send buffers, so that a busy channel does not allocate per read."""

    __slots__ = ("size", "_free", "keep")

    def __init__(self, size: int, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._free: list[tuple[bytearray, memoryview]] = []

    def get(self) -> tuple[bytearray, memoryview]:
        if self._free:
            return self._free.pop()
        buf = bytearray(self.size)
        return buf, memoryview(buf)

    def put(self, item: tuple[bytearray, memoryview]) -> None:
        if len(self._free) < self.keep:
            self._free.append(item)


BUFFERS = BufferPool(HEADROOM + CHUNK, keep=8)  # at most 8 MiB of spare buffers


# An account (contracts.Account) is charged for every byte a channel moves, in the data
# path itself, so a traffic limit holds to within one read.


class Channel(Delivery):
    """One TCP connection carried as a channel: opening, the socket -> tunnel pump, closing;
    the tunnel -> socket half is :class:`~trisocks.net.delivery.Delivery`."""

    __slots__ = (
        "id", "session", "sock", "state", "pending", "held", "credit", "limit", "error",
        "bytes_up", "bytes_down", "_unacked", "_lot", "_pump_scope",
        "_drain_scope", "_draining", "_drained", "_remote_done", "_response", "_response_ready",
        "target", "account", "ingress", "window", "_eof_in", "_allowance",
    )

    def __init__(self, session: ChannelHost, channel_id: bytes, target: str = "") -> None:
        self.id = channel_id
        self.session = session
        self.sock = None
        self.state = OPENING
        # Bytes the socket has not taken yet, as a queue of chunks: appending never copies
        # what is already held (a growing bytearray re-copies itself), and the drain sends
        # several chunks with one sendmsg. ``held`` is their total length.
        self.pending: deque = deque()
        self.held = 0
        self.credit = session.peer_window or UNLIMITED
        self.limit = session.pending_limit
        self.window = session.recv_window  # what the peer may have in flight to us (0: no flow control)
        self._eof_in = False  # the peer's socket ended its direction (protocol.Eof)
        self._allowance = 0  # bytes paid for under a speed limit and not written yet (delivery.py)
        self.error = ""
        self.bytes_up = 0  # socket -> tunnel
        self.bytes_down = 0  # tunnel -> socket
        self.target = target
        self.account = None  # set by the session's register() (an Account, see contracts.py)
        self.ingress = False  # True when our socket is the user's (SOCKS5 side), False for a target
        self._unacked = 0
        # one lot for both waits (the pump for credit, the read loop for space): both are
        # rare, and each waiter re-checks its own condition; idle channels stay small
        self._lot = ParkingLot()
        self._pump_scope = trio.CancelScope()
        self._drain_scope: trio.CancelScope | None = None
        self._draining = False
        self._drained: trio.Event | None = None  # made when somebody waits for a drain
        self._remote_done = trio.Event()
        self._response: protocol.ConnectResponse | None = None
        self._response_ready: trio.Event | None = None  # made by wait_response (openers only)

    def __repr__(self) -> str:
        return f"<Channel {protocol.channel_str(self.id)[:8]} {self.target}>"

    # What the user sent and received, whichever side of the tunnel this channel is on.
    @property
    def uploaded(self) -> int:
        return self.bytes_up if self.ingress else self.bytes_down

    @property
    def downloaded(self) -> int:
        return self.bytes_down if self.ingress else self.bytes_up

    # -- opening ---------------------------------------------------------------
    async def wait_response(self, timeout: float) -> protocol.ConnectResponse | None:
        """Wait for the peer's ConnectResponse; None on timeout or if the session ended."""
        if self._response is None and self.state < REMOTE_CLOSED:
            if self._response_ready is None:
                self._response_ready = trio.Event()
            with trio.move_on_after(timeout):
                await self._response_ready.wait()
        return self._response

    def on_response(self, msg: protocol.ConnectResponse) -> None:
        self._response = msg
        self._wake_response()

    def _wake_response(self) -> None:
        if self._response_ready is not None:
            self._response_ready.set()

    def attach(self, sock) -> None:
        """Give the channel its socket (after a successful dial or SOCKS handshake)."""
        self.sock = sock
        if self.state == OPENING:
            self.state = OPEN
        if self.pending:
            self._kick_drain()
        elif self._eof_in:
            self._end_output()

    # -- ending ------------------------------------------------------------------
    def fail(self, error: str) -> None:
        """End the channel with an error: tell the peer, stop both directions."""
        self.error = self.error or error
        self._drop_pending()
        self._lot.unpark_all()
        if self.state in (OPENING, OPEN):
            self.session.send_if_open(protocol.Disconnect(self.id, self.error))
            self.state = LOCAL_CLOSED
            self._remote_done.set()  # no linger: nothing more can be written
        self._pump_scope.cancel()

    def on_datagram(self, msg: protocol.Data) -> None:
        log.debug("%r: UDP data on a TCP channel ignored", self)

    # -- credit ------------------------------------------------------------------
    def add_credit(self, n: int) -> None:
        self.credit += n
        self._lot.unpark_all()

    # -- socket -> tunnel --------------------------------------------------------
    async def send_early(self, data: bytes) -> None:
        """Send bytes that arrived before the pump started (sent along with a SOCKS request)."""
        session = self.session
        for i in range(0, len(data), CHUNK):
            piece = data[i : i + CHUNK]
            frame = protocol.pack(protocol.Data(protocol.TCP, self.id, piece))
            session.outbox.send_nowait(
                encode_frame(OP_BINARY, frame, session.mask_key())
            )
            self.credit -= len(piece)
            self.bytes_up += len(piece)
        await session.outbox.wait_for_space()

    async def run(self) -> None:
        """Pump the socket into the tunnel until either side ends; then close everything."""
        try:
            with self._pump_scope:
                await self._pump()
            if self.state == LOCAL_CLOSED:
                with trio.move_on_after(LINGER):
                    await self._remote_done.wait()
            if self.pending and not self.error:
                await self._flush_pending()
        finally:
            self.finish()

    async def _pump(self) -> None:
        sock = self.sock
        session = self.session
        outbox = session.outbox
        pool = BUFFERS
        cid = self.id
        error = ""
        try:
            while True:
                while self.credit <= 0:
                    await self._lot.park()
                if outbox.queued_bytes > outbox.high_water:
                    # the WebSocket is backed up: read no more (and hold no buffer) until it drains
                    await outbox.wait_for_space()
                item = pool.get()
                sent = None
                account = self.account
                pacer = None if account is None else (
                    account.pace_up if self.ingress else account.pace_down)
                try:
                    buf, view = item
                    want = CHUNK if self.credit > CHUNK else self.credit
                    if pacer is not None and want > pacer.quantum:
                        want = pacer.quantum  # small steps: the account's other channels get turns
                    try:
                        n = sock.recv_into(view[HEADROOM : HEADROOM + want])
                    except BlockingIOError:
                        pool.put(item)
                        item = None
                        await wait_readable(sock)
                        continue
                    if n == 0:
                        break
                    if account is not None and not account.charge(n):
                        error = account.refuse_reason() or "traffic limit reached"
                        break
                    start = encode_data(buf, HEADROOM, n, cid, session.mask_key())
                    sent = await outbox.send_borrowed(view[start : HEADROOM + n])
                    self.credit -= n
                    self.bytes_up += n
                    if session.trace:
                        log.log(5, "%s: send Data %s %d bytes", session, protocol.channel_str(cid)[:8], n)
                finally:
                    if item is not None:
                        pool.put(item)
                if sent is not None:  # a small frame was copied: wait for it without the buffer
                    await sent.wait()
                if pacer is not None:
                    delay = pacer.take(n)  # a speed limit: read again once these bytes are paid for
                    if delay:
                        await trio.sleep(delay)
                        continue
                await checkpoint()
        except (OSError, trio.ClosedResourceError) as exc:
            if isinstance(exc, OSError):
                error = (exc.strerror or str(exc)).lower()
            else:
                error = "connection closed"
        if self.state in (OPENING, OPEN) and not error:
            if self.session.half_close:
                self.session.send_if_open(protocol.Eof(cid))
                await self._remote_done.wait()  # the other direction: the peer's Eof or Disconnect
                if self.state == OPEN:  # both directions ended: done, nothing more to say
                    self.state = LOCAL_CLOSED
                return
            if self.ingress:
                await self._await_response()
            elif self.bytes_up:
                await self._let_peer_write()
        if self.state in (OPENING, OPEN):
            self.state = LOCAL_CLOSED
            self.session.send_if_open(protocol.Disconnect(cid, error))

    async def _await_response(self) -> None:
        """The SOCKS5 client ended its sending side and the peer has no half-close: wait for
        the far end's Disconnect while the response keeps coming (each byte restarts the
        clock), so a request sent with EOF still gets its whole response."""
        while True:
            seen = self.bytes_down + self.held
            with trio.move_on_after(EOF_IDLE):
                await self._remote_done.wait()
                return
            if self.bytes_down + self.held == seen:
                return

    async def _let_peer_write(self) -> None:
        """The destination ended and the peer has no half-close: the Disconnect goes out once
        the peer has had our bytes long enough to write them (its own Disconnect ends the wait)."""
        session = self.session
        with trio.move_on_after(LINGER + EOF_DRAIN_MAX):
            await session.wait_sent()
            with trio.move_on_after(min(EOF_DRAIN_MAX, self.bytes_up / PEER_DRAIN_RATE)):
                await self._remote_done.wait()

    # -- closing ----------------------------------------------------------------
    def on_remote_disconnect(self, error: str) -> None:
        """The peer ended the channel: stop reading, flush what we hold, answer in kind."""
        if error:
            log.debug("%r closed by peer: %s", self, error)
        if self.state == LOCAL_CLOSED:
            self._remote_done.set()
            return
        if self.state in (OPENING, OPEN):
            self.state = REMOTE_CLOSED
            self.session.send_if_open(protocol.Disconnect(self.id))
            self._remote_done.set()
            if self._response is None:
                self._response = protocol.ConnectResponse(False, self.id, error or "disconnected")
                self._wake_response()
            self._pump_scope.cancel()

    def abort(self) -> None:
        """Session is gone: stop at once."""
        if self.state < CLOSED:
            self._remote_done.set()
            self._wake_response()
            self._pump_scope.cancel()
            self._drop_pending()
            if self._drain_scope is not None:
                self._drain_scope.cancel()

    def finish(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.window > self.session.recv_window:
            self.session.windows.release(self.window - self.session.recv_window)
        if self._drain_scope is not None:
            self._drain_scope.cancel()
        self._drop_pending()
        self._lot.unpark_all()
        close_socket(self.sock)
        self.session.forget(self)
