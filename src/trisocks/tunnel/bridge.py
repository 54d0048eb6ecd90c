"""Agent mode: the server relays a channel between a connector's session and a provider's.

A connector sends Connect; the server forwards it, with the same channel id,
to a provider of the reverse token behind the connector token, and from then
on relays every message of that channel between the two sessions. Each
session sees a :class:`BridgeEnd` in its channel table where it would
otherwise see a socket-backed :class:`~trisocks.net.channel.Channel`; the two
ends share one :class:`Bridge`.

Memory stays bounded the same way as for sockets: an end only sends as much
as its own peer's window allows (``credit``); bytes beyond that wait in the
end's ``out`` buffer, and only once they have left do we grant the other peer
more window. With a peer that has no windows, a full ``out`` (or a full
outbox) makes the other session's read loop wait.
"""

from __future__ import annotations

import logging

import trio
from trio.lowlevel import ParkingLot

from ..net.channel import CHUNK, LINGER, UNLIMITED
from ..net.contracts import ChannelHost
from ..wire import protocol
from ..wire.codec import HEADROOM, encode_data

log = logging.getLogger("trisocks.bridge")


class BridgeEnd:
    __slots__ = ("id", "session", "bridge", "partner", "target", "credit", "limit", "out",
                 "unacked", "early", "state", "bytes_in", "_space", "_disconnect_after", "account",
                 "window", "_eof_after")

    def __init__(self, session: ChannelHost, channel_id: bytes, bridge: Bridge, target: str) -> None:
        self.id = channel_id
        self.session = session
        self.bridge = bridge
        self.partner: BridgeEnd | None = None
        self.target = target
        self.credit = session.peer_window or UNLIMITED  # what our peer lets us send
        self.limit = session.pending_limit
        self.out = bytearray()  # bytes from the partner's peer, waiting for credit
        self.unacked = 0  # bytes from our peer that left us, not yet acknowledged
        self.window = session.recv_window  # what our peer may have in flight to us (flow.py)
        self.early = bytearray()  # bytes from our peer before the partner exists
        self.state = 0  # 0 open, 1 closed
        self.bytes_in = 0
        self.account = None
        self._space = ParkingLot()
        self._disconnect_after: str | None = None
        self._eof_after = False  # an Eof to pass on once ``out`` is empty

    def __repr__(self) -> str:
        return f"<BridgeEnd {protocol.channel_str(self.id)[:8]} {self.target}>"

    # The connector is the user: what it sent, and what came back from the provider.
    @property
    def uploaded(self) -> int:
        user = self.bridge.connector
        return user.bytes_in

    @property
    def downloaded(self) -> int:
        provider = self.bridge.provider
        return provider.bytes_in if provider is not None else 0

    # -- from our peer ---------------------------------------------------------------
    def deliver(self, data, decoder=None) -> bool:
        if self.state:
            return False
        account = self.bridge.connector.account
        if account is not None and not account.charge(len(data)):
            self.bridge.fail(account.refuse_reason() or "traffic limit reached")
            return False
        self.bytes_in += len(data)
        partner = self.partner
        if partner is None:
            self.early += data
            return len(self.early) > self.limit
        partner.push(data)
        return partner.congested()

    async def wait_space(self) -> None:
        while not self.state:
            partner = self.partner
            if partner is None:
                if len(self.early) <= self.limit:
                    return
                await self._space.park()
            elif not partner.congested():
                return
            elif len(partner.out) > partner.limit:
                await partner._space.park()
            else:
                await partner.session.outbox.wait_for_space()

    def add_credit(self, n: int) -> None:
        self.credit += n
        self._flush()

    def on_response(self, msg: protocol.ConnectResponse) -> None:
        self.bridge.response_from(self, msg)

    def on_remote_disconnect(self, error: str) -> None:
        self.bridge.disconnect_from(self, error)

    def on_remote_eof(self) -> None:
        """Half-close from our peer: passed on when the other peer speaks it too; otherwise
        the other side learns of the end with the Disconnect that follows."""
        self.bridge.eof_from(self)

    def fail(self, error: str) -> None:
        self.bridge.fail(error)

    def abort(self) -> None:
        self.bridge.gone(self)

    def on_datagram(self, msg: protocol.Data) -> None:
        if self.partner is not None and not self.partner.state:
            self.partner.session.send_if_open(
                protocol.Data(msg.protocol, self.partner.id, msg.data, 0, msg.address, msg.port,
                              msg.target_address, msg.target_port))

    # -- towards our peer ---------------------------------------------------------------
    def push(self, data) -> None:
        """Bytes from the partner's peer, to send to ours as far as our credit allows."""
        if self.out or self.credit <= 0:
            self.out += data
            return
        n = len(data) if len(data) <= self.credit else self.credit
        self._send(data[:n] if n < len(data) else data)
        if n < len(data):
            self.out += data[n:]

    def congested(self) -> bool:
        return len(self.out) > self.limit or self.session.outbox.queued_bytes > self.session.outbox.high_water

    def _send(self, data) -> None:
        session = self.session
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            piece = view[i : i + CHUNK]
            n = len(piece)
            buf = bytearray(HEADROOM + n)
            buf[HEADROOM:] = piece
            start = encode_data(buf, HEADROOM, n, self.id, session.mask_key())
            session.outbox.send_nowait(memoryview(buf)[start:])
        self.credit -= len(view)
        if self.partner is not None:
            self.partner.consumed(len(view))

    def _flush(self) -> None:
        if self.out and self.credit > 0:
            n = min(len(self.out), self.credit)
            chunk = bytes(self.out[:n])
            del self.out[:n]
            self._send(chunk)
        if not self.congested():
            self._space.unpark_all()
        if not self.out and self._eof_after:
            self._eof_after = False
            self.session.send_if_open(protocol.Eof(self.id))
            self.bridge.maybe_done()
        if not self.out and self._disconnect_after is not None:
            self.session.send_if_open(protocol.Disconnect(self.id, self._disconnect_after))
            self._disconnect_after = None

    def consumed(self, n: int) -> None:
        """Bytes our peer sent have been handed on: grant it more window."""
        window = self.window
        if window and not self.state:
            self.unacked += n
            if self.unacked >= window >> 2:
                grant = self.unacked
                partner = self.partner
                if partner is not None and not partner.out:  # the far side keeps up: grow
                    extra = self.session.windows.grow(window)
                    self.window = window + extra
                    grant += extra
                self.session.send_if_open(protocol.WindowUpdate(self.id, grant))
                self.unacked = 0

    def send_eof(self) -> None:
        """Pass a half-close on to our peer after everything queued before it."""
        if self.out:
            self._eof_after = True
        else:
            self.session.send_if_open(protocol.Eof(self.id))

    def send_disconnect(self, error: str) -> None:
        """Forward a Disconnect to our peer once everything before it has gone out."""
        if self.out:
            self._disconnect_after = error
        else:
            self.session.send_if_open(protocol.Disconnect(self.id, error))

    def finish(self) -> None:
        if self.state:
            return
        self.state = 1
        if self.window > self.session.recv_window:
            self.session.windows.release(self.window - self.session.recv_window)
        self.out.clear()
        self.early.clear()
        self._space.unpark_all()
        self.session.forget(self)


class Bridge:
    """The pair of ends of one relayed channel, and how it closes."""

    def __init__(self, connector_session: ChannelHost, channel_id: bytes, target: str) -> None:
        self.connector = BridgeEnd(connector_session, channel_id, self, target)
        self.provider: BridgeEnd | None = None
        self.target = target
        self._down: set[int] = set()  # ids of ends whose peer has sent Disconnect
        self._eofs: set[int] = set()  # ids of ends whose peer has sent Eof (half-close)
        self._lingering = False

    def attach_provider(self, provider_session) -> BridgeEnd | None:
        """Link to a provider session; None if that session already uses this channel id."""
        end = BridgeEnd(provider_session, self.connector.id, self, self.target)
        if self.connector.id in provider_session.channels:
            return None
        provider_session.register(end)
        self.provider = end
        end.partner, self.connector.partner = self.connector, end
        if self.connector.early:
            early = bytes(self.connector.early)
            self.connector.early.clear()
            end.push(early)
            self.connector._space.unpark_all()
        return end

    def response_from(self, end: BridgeEnd, msg: protocol.ConnectResponse) -> None:
        if end is not self.provider:
            return
        self.connector.session.send_if_open(protocol.ConnectResponse(msg.success, self.connector.id,
                                                                     msg.error))
        if not msg.success:
            self._finish()

    def eof_from(self, end: BridgeEnd) -> None:
        """One peer's socket ended its direction: pass it on if the other peer speaks
        half-close (else it learns of the end from the Disconnect that follows)."""
        other = end.partner
        if other is None:
            return  # no provider yet: the channel ends with the connector's Disconnect
        if other.state:
            return
        if other.session.half_close:
            self._eofs.add(id(end))
            other.send_eof()
            self.maybe_done()
        elif end is self.provider:
            # the destination ended: a LinkSocks connector hears that as Disconnect
            self.disconnect_from(end, "")
        # else a SOCKS5 client half-closed and a LinkSocks provider cannot be told: the
        # response still comes, and the channel ends with the provider's Disconnect

    def maybe_done(self) -> None:
        """Both directions ended with Eof and everything went out: the peers are done with
        the channel without a Disconnect, and so are we."""
        if len(self._eofs) == 2 and not any(e.out or e._eof_after for e in (self.connector, self.provider)):
            self._finish()

    def disconnect_from(self, end: BridgeEnd, error: str) -> None:
        other = end.partner
        self._down.add(id(end))
        if other is None:
            self._finish()
            return
        other.send_disconnect(error)
        if len(self._down) == 2:
            self._finish()
        elif not self._lingering:
            # the other side may still have bytes in flight; give it a moment to answer
            self._lingering = True
            end.session.spawn(self._linger, unit="bridge")

    async def _linger(self) -> None:
        """One side said Disconnect: give the other time to answer, and for as long as bytes
        still waiting for window keep moving, let them go out first."""
        held = self._held()
        while True:
            await trio.sleep(LINGER)
            now = self._held()
            if not now or now >= held:
                break
            held = now
        self._finish()

    def _held(self) -> int:
        return sum(len(end.out) for end in (self.connector, self.provider)
                   if end is not None and not end.state)

    def fail(self, error: str) -> None:
        for end in (self.connector, self.provider):
            if end is not None and not end.state:
                end.session.send_if_open(protocol.Disconnect(end.id, error))
        self._finish()

    def gone(self, end: BridgeEnd) -> None:
        """The session under ``end`` closed: tell the other side, drop both."""
        other = end.partner
        if other is not None and not other.state:
            other.session.send_if_open(protocol.Disconnect(other.id, "peer disconnected"))
        self._finish()

    def _finish(self) -> None:
        self.connector.finish()
        if self.provider is not None:
            self.provider.finish()
