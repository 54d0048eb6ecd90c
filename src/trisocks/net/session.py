"""A session: one authenticated WebSocket carrying many channels.

The session owns three loops in one nursery: the read loop (decoder events
to channels and to the role's handler), the outbox writer, and the keepalive
(pings; a peer silent for too long is dropped). Channel tasks of the
accepting side also live in this nursery, so closing a session closes every
channel it carries, and nothing outlives it.

What a message *means* depends on the role (server, client, provider...):
the session calls a :class:`Handler` for everything that is not plain data
plumbing.
"""

from __future__ import annotations

import logging

import trio
from trio.lowlevel import ParkingLot

from ..wire import codec, csprng, protocol
from ..wire.errors import ProtocolError
from .channel import CLOSED, OPEN, OPENING, Channel
from .flow import MAX_WINDOW, WindowBudget, initial_window
from .guard import contained
from .limits import PROCESS, ChannelGroup
from .outbox import Outbox
from .reader import Reader, _summary
from .trace import TRACE

log = logging.getLogger("trisocks.session")

# The most per-channel credit we grant trisocks peers (see flow.py). It must cover what
# loopback-fast sockets hold in flight between two processes (send buffer + receive buffer,
# several MiB each way): 4 MiB left a bulk transfer waiting on credit; 16 MiB runs at socket
# speed (see docs/performance.md).
DEFAULT_WINDOW = MAX_WINDOW
# With LinkSocks peers (no flow control) the only brake is to stop reading the WebSocket:
DEFAULT_PENDING = 2 << 20  # per-channel backlog before a LinkSocks peer's reader is paused
SESSION_PENDING = 64 << 20  # all channels of a session together: past it, the read loop waits
MAX_CHANNELS = 10000  # channels one peer may have open on a session at once
# Frames waiting for a peer that does not read: honest peers stay far below (data frames are
# bounded by the outbox's high-water mark, control frames are small), so past this the peer
# is not reading and the session is closed rather than queueing without end.
OUTBOX_MAX = 32 << 20
RECV_BUFFER = 256 << 10  # what the decoder reads at a time (1 MiB measured no better)


class Handler:
    """What a role does with session-level messages. The defaults refuse or ignore."""

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        session.send(protocol.ConnectResponse(False, msg.channel, "not allowed"))

    def on_connector(self, session: Session, msg: protocol.Connector) -> None:
        session.send(protocol.ConnectorResponse(msg.channel, False, "not allowed"))

    def on_connector_response(self, session: Session, msg: protocol.ConnectorResponse) -> None:
        pass

    def on_partners(self, session: Session, count: int) -> None:
        pass

    def on_log(self, session: Session, msg: protocol.Log) -> None:
        log.debug("%s: peer log [%s] %s", session, msg.level, msg.msg[:200])


class Session(Reader):
    # The process's access log (net/access.py), if ``--access-log`` asked for one: told of
    # every channel registered and forgotten. Off, it costs one attribute check per channel.
    access_log = None

    def __init__(
        self,
        transport,
        decoder,
        *,
        client_side: bool,
        handler: Handler,
        name: str = "session",
        peer_window: int | None = None,
        recv_window: int = 0,
        ping_interval: float = 30.0,
        idle_timeout: float = 90.0,
        half_close: bool = False,
    ) -> None:
        self.transport = transport
        self.decoder = decoder
        self.client_side = client_side
        self.handler = handler
        self.name = name
        self.peer = ""  # the client's address, for events (set by whoever accepted the session)
        self.outbox = Outbox(transport)
        self.channels: dict[bytes, Channel] = {}
        # Flow control: peer_window is the credit the peer grants us per channel
        # (None: the peer does not speak it); recv_window is what we grant a new channel
        # (the window advertised in the handshake), growing up to the configured maximum.
        self.peer_window = peer_window
        self.recv_window = initial_window(recv_window) if peer_window else 0
        self.windows = WindowBudget(recv_window or MAX_WINDOW)
        # Half-close (protocol.Eof): negotiated in the handshake, only with flow control.
        self.half_close = bool(half_close and peer_window)
        # bytes held for slow local sockets, all channels together
        self.pending_bytes = 0
        if self.recv_window:
            # a trisocks peer never sends past the window we granted: what a channel holds is
            # bounded by it, and the read loop never has to wait for one slow reader
            self.pending_limit = self.pending_max = 1 << 62
        else:
            # a LinkSocks peer: past these the read loop waits (a backstop for many stalled
            # readers at once; one alone is bounded by its own limit)
            self.pending_limit = DEFAULT_PENDING
            self.pending_max = SESSION_PENDING
        self._pending_space = ParkingLot()
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.nursery: trio.Nursery | None = None
        self.closed = trio.Event()
        self.close_reason = ""
        self.last_seen = trio.current_time()
        self.last_pong = trio.current_time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.unknown_data = 0
        self._read_scope = trio.CancelScope()
        self._ping_sent_at: float | None = None
        self.rtt: float | None = None
        # Who the traffic is metered to (a management-plane user), if anyone: see register().
        self.account = None
        self.channels_total = 0
        self.trace = log.isEnabledFor(TRACE)  # decided once: the data path never asks the logger
        self.max_channels = MAX_CHANNELS
        # channels of every session of one token together (set by the server), and of the process
        self.group: ChannelGroup | None = None
        self._pong: list | None = None  # the pong still waiting in the outbox, if any

    def __str__(self) -> str:
        return self.name

    # -- sending -------------------------------------------------------------------
    def mask_key(self):
        return csprng.mask_key() if self.client_side else None

    def send(self, msg) -> None:
        """Queue a LinkSocks message; raises trio.ClosedResourceError once the session is closing."""
        if self.trace:
            log.log(TRACE, "%s: send %s", self, _summary(msg))
        self.outbox.send_nowait(codec.encode_frame(codec.OP_BINARY, protocol.pack(msg), self.mask_key()))
        if self.outbox.queued_bytes > OUTBOX_MAX:
            self._not_reading()

    def _not_reading(self) -> None:
        log.warning("%s: peer does not read (%d MiB waiting for it), closing", self,
                    self.outbox.queued_bytes >> 20)
        self.close(1008, "peer does not read")

    def _answer_ping(self, payload: bytes) -> None:
        """A pong; while an earlier one still waits in the outbox, that one is replaced, so a
        peer that pings without reading costs one pong (RFC 6455 5.5.3: answering the latest
        ping is enough)."""
        frame = codec.encode_frame(codec.OP_PONG, payload, self.mask_key())
        if self._pong is not None and self.outbox.replace(self._pong, frame):
            return
        self._pong = self.outbox.send_nowait(frame)

    def send_if_open(self, msg) -> None:
        try:
            self.send(msg)
        except trio.ClosedResourceError:
            pass

    async def wait_sent(self) -> None:
        """Until everything queued so far has left the outbox and the kernel's send queue
        (the peer's kernel acknowledged it), or the session closed."""
        await self.outbox.flush()
        unsent = getattr(self.transport, "unsent", None)
        while unsent is not None and unsent() > 0 and not self.close_reason:
            await trio.sleep(0.01)  # the kernel has no event for "acknowledged": look again

    def ping(self) -> None:
        if self._ping_sent_at is None:  # an unanswered ping keeps its time: that is the liveness test
            self._ping_sent_at = trio.current_time()
        self.outbox.send_nowait(codec.encode_frame(codec.OP_PING, b"trisocks", self.mask_key()))

    def responsive(self, now: float, grace: float) -> bool:
        """Open, and not sitting on a ping older than ``grace`` seconds."""
        if self.closed.is_set() or self.close_reason:
            return False
        return self._ping_sent_at is None or now - self._ping_sent_at < grace

    # -- channels ------------------------------------------------------------------
    def open_channel(self, target: str = "", account=None) -> Channel:
        """A new outgoing channel (we send Connect), registered so replies find it."""
        ch = Channel(self, protocol.new_channel_id(), target)
        ch.ingress = True
        self.register(ch, account)
        return ch

    def accept_channel(self, channel_id: bytes, target: str = "") -> Channel | None:
        """A channel the peer asked for; None if that id is already in use."""
        if channel_id in self.channels:
            return None
        ch = Channel(self, channel_id, target)
        self.register(ch)
        return ch

    def register(self, ch, account=None) -> None:
        """Put any kind of channel in the table; its bytes are metered to ``account``
        (default: the session's). The account hears ``opened(ch)`` now and ``closed(ch)``
        when the channel is forgotten, with its final byte counts."""
        self.channels[ch.id] = ch
        self.channels_total += 1
        PROCESS.open += 1
        if self.group is not None:
            self.group.open += 1
        ch.account = account if account is not None else self.account
        if ch.account is not None:
            ch.account.opened(ch)
        if self.access_log is not None:
            self.access_log.opened(ch)

    def forget(self, ch) -> None:
        if self.channels.get(ch.id) is ch:
            del self.channels[ch.id]
            PROCESS.open -= 1
            if self.group is not None:
                self.group.open -= 1
            if ch.account is not None:
                ch.account.closed(ch)
            if self.access_log is not None:
                self.access_log.closed(self, ch)

    def refuse_reason(self, account=None) -> str | None:
        """Why a new channel asked for by the peer must be refused (too many open, the
        account over quota, expired...), or None."""
        if len(self.channels) >= self.max_channels:
            return "too many channels"
        if self.group is not None and self.group.open >= self.group.limit:
            return "too many channels for this token"
        if PROCESS.open >= PROCESS.limit():
            # keep file descriptors for accepting and authenticating everyone else
            return "server out of connections"
        account = account if account is not None else self.account
        return account.admit() if account is not None else None

    def spawn(self, fn, *args, unit: str = "channel") -> None:
        """Start a task that belongs to this session (a dial, a drain, a relay), contained:
        an unexpected error ends that task, never the session and its other channels."""
        self.nursery.start_soon(contained, f"{unit} on {self}", fn, *args)

    # -- running -------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the WebSocket ends; every channel is closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._keepalive)
                try:
                    with self._read_scope:
                        await self._read_loop()
                except ProtocolError as exc:
                    log.warning("%s: protocol error from peer: %s", self, exc.reason)
                    self.close_reason = f"protocol error: {exc.reason}"
                    self._send_close(exc.close_code, exc.reason)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.close_reason = self.close_reason or f"connection lost ({_describe(exc)})"
                finally:
                    await self._shutdown(nursery)
        finally:
            self.closed.set()

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        if not self.close_reason:  # stopped from outside (Ctrl-C, shutdown): say so to the peer
            self.close_reason = "shutting down"
            payload = (1001).to_bytes(2, "big") + b"going away"
            self.outbox.send_last(codec.encode_frame(codec.OP_CLOSE, payload, self.mask_key()))
        for ch in list(self.channels.values()):
            ch.abort()
        self.outbox.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1.0):
                await self.outbox.flush_closed()
            nursery.cancel_scope.cancel()
            await self.transport.aclose()

    async def _write_loop(self) -> None:
        try:
            await self.outbox.run()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close_reason = self.close_reason or f"connection lost ({_describe(exc)})"
            self._read_scope.cancel()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start a clean close: send a close frame and stop reading."""
        if not self.close_reason:
            self.close_reason = reason or "closed"
        self._send_close(code, reason)
        self._read_scope.cancel()

    def _send_close(self, code: int, reason: str) -> None:
        payload = code.to_bytes(2, "big") + reason.encode()[:120]
        try:
            self.outbox.send_nowait(codec.encode_frame(codec.OP_CLOSE, payload, self.mask_key()))
        except trio.ClosedResourceError:
            pass

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            now = trio.current_time()
            if now - self.last_seen > self.idle_timeout:
                log.warning("%s: peer silent for %.0f s, closing", self, now - self.last_seen)
                self.close(1001, "idle timeout")
                return
            try:
                self.ping()
            except trio.ClosedResourceError:
                return

    def pending_changed(self, delta: int) -> None:
        """Channels report what they hold for their sockets; wakes the read loop when it fell."""
        self.pending_bytes += delta
        if delta < 0 and self.pending_bytes <= self.pending_max >> 1:
            self._pending_space.unpark_all()

async def read_message(transport, decoder, *, timeout: float, client_side: bool) -> bytes:
    """Before a session runs: the first whole message (Auth, AuthResponse), answering pings.

    Raises trio.TooSlowError when none comes in time and EOFError when the peer closes first.
    """
    with trio.fail_after(timeout):
        while True:
            ev = decoder.next_event()
            if ev == codec.MESSAGE:
                return decoder.data
            if ev == codec.NEED_DATA:
                n = await transport.recv_into(decoder.get_buffer())
                if n == 0:
                    raise EOFError("connection closed")
                decoder.feed(n)
            elif ev == codec.PING:
                key = csprng.mask_key() if client_side else None
                await transport.send_all(codec.encode_frame(codec.OP_PONG, decoder.data, key))
            elif ev == codec.CLOSE:
                reason = decoder.close_reason or f"code {decoder.close_code}"
                raise EOFError(f"closed by peer ({reason})")
            # Data before authentication has no channel to go to: drop it.


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


__all__ = ["Session", "Handler", "DEFAULT_WINDOW", "OPEN", "OPENING", "CLOSED"]
