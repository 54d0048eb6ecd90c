"""A session's read side: WebSocket events to channels and to the role's handler.

Data pieces go straight to their channel (``deliver``); a channel that must not take more
makes the loop wait, which only happens with LinkSocks peers (no flow control). Every other
message is parsed and dispatched; one that breaks a channel or the handler is reported and
ends that channel, never the session. A mixin of :class:`~trisocks.net.session.Session`.
"""

from __future__ import annotations

import logging

import trio

from ..wire import codec, protocol
from ..wire.errors import MessageError
from .contracts import ChannelEnd
from .guard import report
from .trace import TRACE

log = logging.getLogger("trisocks.session")
STALL_TIMEOUT = 30.0  # a channel that pauses the whole WebSocket this long is closed


class Reader:
    """The read loop and message dispatch of a session (attributes are the Session's)."""

    async def _read_loop(self) -> None:
        dec = self.decoder
        recv_into = self.transport.recv_into
        channels = self.channels
        DATA, NEED_DATA = codec.DATA, codec.NEED_DATA
        while True:
            ev = dec.next_event()
            if ev == DATA:
                ch = channels.get(dec.channel)
                if self.trace:
                    log.log(TRACE, "%s: recv Data %s %d bytes", self,
                            protocol.channel_str(dec.channel)[:8], len(dec.data))
                if ch is None:
                    self.unknown_data += 1
                else:
                    try:
                        if ch.deliver(dec.data, dec):
                            await self._wait_space(ch)
                    except Exception as exc:  # a bug in one channel must not end the session
                        self._channel_broke(ch, exc)
                continue
            if ev == NEED_DATA:
                n = await recv_into(dec.get_buffer())
                if n == 0:
                    self.close_reason = self.close_reason or "peer closed the connection"
                    return
                dec.feed(n)
                self.bytes_in += n
                self.last_seen = trio.current_time()
                continue
            if ev == codec.MESSAGE:
                try:
                    await self._on_message(dec.data)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    raise  # our own WebSocket is closing
                except Exception as exc:  # a bug handling one message must not end the session
                    report(f"a message on {self}", exc)
            elif ev == codec.PING:
                self._answer_ping(dec.data)
            elif ev == codec.PONG:
                if self._ping_sent_at is not None:
                    self.rtt = trio.current_time() - self._ping_sent_at
                    self._ping_sent_at = None
                self.last_pong = trio.current_time()
            elif ev == codec.CLOSE:
                code = dec.close_code
                self.close_reason = self.close_reason or (
                    f"peer closed ({code}{': ' + dec.close_reason if dec.close_reason else ''})"
                )
                self._send_close(1000 if code in (1005, 1006) else code, "")
                return
            elif ev == codec.TRUNCATED:
                ch = channels.get(dec.channel)
                if ch is not None:
                    log.warning("%s: truncated Data message, closing %r", self, ch)
                    ch.fail("truncated data message")

    def _channel_broke(self, ch, exc: Exception) -> None:
        report(f"{ch!r} on {self}", exc)
        try:
            ch.fail("internal error")
        except Exception:
            ch.abort()

    async def _wait_space(self, ch: ChannelEnd) -> None:
        with trio.move_on_after(STALL_TIMEOUT) as scope:
            await ch.wait_space()
            while self.pending_bytes > self.pending_max:
                await self._pending_space.park()
        if scope.cancelled_caught:
            log.warning("%s: %r has not read for %.0f s, closing it", self, ch, STALL_TIMEOUT)
            ch.fail("reader stalled")

    async def _on_message(self, data: bytes) -> None:
        try:
            msg = protocol.parse(data)
        except MessageError as exc:
            log.warning("%s: bad message from peer ignored: %s", self, exc)
            return
        if self.trace:
            log.log(TRACE, "%s: recv %s", self, _summary(msg))
        kind = type(msg)
        if kind is protocol.Data:
            ch = self.channels.get(msg.channel)
            if ch is None:
                self.unknown_data += 1
            elif msg.protocol == protocol.TCP:
                if ch.deliver(msg.data):
                    await self._wait_space(ch)
            else:
                ch.on_datagram(msg)
        elif kind is protocol.WindowUpdate:
            ch = self.channels.get(msg.channel)
            if ch is not None:
                ch.add_credit(msg.credit)
        elif kind is protocol.Eof:
            ch = self.channels.get(msg.channel)
            on_eof = getattr(ch, "on_remote_eof", None)
            if on_eof is not None:
                on_eof()
        elif kind is protocol.Connect:
            if msg.channel in self.channels:
                log.warning("%s: Connect for a channel id already in use ignored", self)
            else:
                self.handler.on_connect(self, msg)
        elif kind is protocol.ConnectResponse:
            ch = self.channels.get(msg.channel)
            if ch is not None:
                ch.on_response(msg)
        elif kind is protocol.Disconnect:
            ch = self.channels.get(msg.channel)
            if ch is not None:
                ch.on_remote_disconnect(msg.error)
        elif kind is protocol.Partners:
            self.handler.on_partners(self, msg.count)
        elif kind is protocol.Connector:
            self.handler.on_connector(self, msg)
        elif kind is protocol.ConnectorResponse:
            self.handler.on_connector_response(self, msg)
        elif kind is protocol.Log:
            self.handler.on_log(self, msg)
        else:
            # Auth/AuthResponse after authentication (pywssocks sends Auth even when
            # its URL already authenticated it), Direct* signalling, unknown types.
            log.debug("%s: %s message ignored", self, kind.__name__)


def _summary(msg) -> str:
    """A message for the trace log: its fields, with channel ids short and secrets out."""
    parts = []
    for name in msg.__slots__:
        value = getattr(msg, name)
        if name in ("channel", "instance"):
            value = protocol.channel_str(value)[:8]
        elif name == "token":
            from ..tunnel.tokens import redact

            value = redact(value)
        elif isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        if value not in ("", 0, None) or name == "success":
            parts.append(f"{name}={value}")
    return f"{type(msg).__name__}({', '.join(parts)})"
