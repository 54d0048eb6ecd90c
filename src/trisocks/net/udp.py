"""UDP over the tunnel: SOCKS5 UDP ASSOCIATE on one side, a UDP socket on the other.

The SOCKS5 side (:func:`associate`) opens a channel with Connect(UDP), binds a
UDP socket next to the TCP control connection and tells the SOCKS5 client to
send there. Each datagram's SOCKS5 header is stripped and its destination
travels in Data(UDP).target_address/target_port; answers come back with
their source in Data(UDP).address/port and get a SOCKS5 header again.

The remote side (:class:`UdpEgress`) owns one UDP socket per channel and
sends each datagram where it says.

The association lives as long as the SOCKS5 TCP connection, and ends after
``idle_timeout`` seconds without a datagram either way. UDP may lose packets,
and so may we when a WebSocket is congested: a datagram that finds more than
the outbox's high-water mark queued is dropped (and counted) rather than
buffered. Fragmented SOCKS5 datagrams (FRAG != 0) are dropped, as RFC 1928
allows, counted and logged. So is a datagram for a host that cannot be one
(:mod:`trisocks.wire.names`), on either side, before anything resolves it.

A SOCKS5 client that resets its control connection (as a browser closing a tab does)
simply ends the association: the far end hears Disconnect.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import weakref

import trio
from trio.lowlevel import wait_readable

from ..wire import protocol, socks5
from ..wire.names import host_error
from .contracts import ChannelHost
from .dial import literal_family, resolve
from .transport import close_socket, send_quietly, sock_recv

log = logging.getLogger("trisocks.udp")

MAX_DATAGRAM = 65535
IDLE_TIMEOUT = 60.0
# UDP associations one session may have open on the side that talks to the targets. Each
# holds up to two UDP sockets and a task for IDLE_TIMEOUT after its last datagram; a peer
# that opens them in a loop would otherwise take file descriptors without end.
MAX_UDP_ASSOCIATIONS = 256
TOO_MANY_ASSOCIATIONS = "too many UDP associations"
RESOLVE_TIMEOUT = 10.0
# Per association: lookups under way (datagrams to further new names are dropped meanwhile,
# so a stream of datagrams to made-up names costs bounded tasks) and names remembered.
MAX_PENDING_LOOKUPS = 64
MAX_RESOLVED = 1024


class _UdpChannel:
    """What a session needs from a channel, for UDP: datagrams only, no stream."""

    def __init__(self, session: ChannelHost, channel_id: bytes, target: str = "udp") -> None:
        self.id = channel_id
        self.session = session
        self.target = target
        self.state = 0
        self.error = ""
        self.bytes_up = 0
        self.bytes_down = 0
        self.dropped = 0
        self.last_active = trio.current_time()
        self.account = None
        self._done = trio.Event()
        self._response: protocol.ConnectResponse | None = None
        self._response_ready = trio.Event()

    def __repr__(self) -> str:
        return f"<UDP channel {protocol.channel_str(self.id)[:8]}>"

    # bytes_up counts datagrams towards targets on both sides: the user's upload
    @property
    def uploaded(self) -> int:
        return self.bytes_up

    @property
    def downloaded(self) -> int:
        return self.bytes_down

    # the stream half of the channel interface: not used by UDP
    def deliver(self, data, decoder=None) -> bool:
        return False

    async def wait_space(self) -> None:
        return

    def add_credit(self, n: int) -> None:
        pass

    def on_response(self, msg: protocol.ConnectResponse) -> None:
        self._response = msg
        self._response_ready.set()

    async def wait_response(self, timeout: float) -> protocol.ConnectResponse | None:
        with trio.move_on_after(timeout):
            await self._response_ready.wait()
        return self._response

    def on_remote_disconnect(self, error: str) -> None:
        self._response_ready.set()
        self._done.set()

    def fail(self, error: str) -> None:
        self.error = error
        self.session.send_if_open(protocol.Disconnect(self.id, error))
        self._done.set()

    def abort(self) -> None:
        self._response_ready.set()
        self._done.set()

    def send_datagram(self, msg: protocol.Data) -> bool:
        """Queue a Data(UDP) on the session; False (dropped) when the WebSocket is congested."""
        if not self.charge(len(msg.data)):
            return False
        outbox = self.session.outbox
        if outbox.queued_bytes > outbox.high_water:
            self.dropped += 1
            return False
        self.session.send_if_open(msg)
        return True

    def charge(self, n: int) -> bool:
        """Bill the account; past its limit the association ends."""
        account = self.account
        if account is not None and not account.charge(n):
            self.fail(account.refuse_reason() or "traffic limit reached")
            return False
        return True

    def finish(self) -> None:
        if self.state:
            return
        self.state = 1
        self._done.set()
        self.session.forget(self)


def _udp_socket(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


# -- the SOCKS5 side ------------------------------------------------------------------------


class UdpAssociation(_UdpChannel):
    def __init__(self, session, channel_id: bytes, udp: socket.socket, client_ip: str,
                 client_port: int, idle_timeout: float) -> None:
        super().__init__(session, channel_id)
        self.udp = udp
        self.client_ip = client_ip
        self.client_port = client_port  # 0 until the first datagram (or as the request said)
        self.idle_timeout = idle_timeout
        self.fragments_dropped = 0

    def on_datagram(self, msg: protocol.Data) -> None:
        if not self.client_port:
            return  # nobody to send it to yet
        if not self.charge(len(msg.data)):
            return
        try:
            header = socks5.udp_header(msg.address or "0.0.0.0", msg.port)
            self.udp.sendto(header + msg.data, (self.client_ip, self.client_port))
        except (OSError, ValueError, socks5.Socks5Error) as exc:
            self.dropped += 1
            log.debug("%r: answer not delivered: %s", self, exc)
            return
        self.bytes_down += len(msg.data)
        self.last_active = trio.current_time()

    async def pump(self) -> None:
        """SOCKS5 client datagrams -> tunnel, until the association ends."""
        udp = self.udp
        while True:
            try:
                data, addr = udp.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                await wait_readable(udp)
                continue
            except OSError:
                await trio.lowlevel.checkpoint()
                continue
            if not _same_ip(addr[0], self.client_ip) or (self.client_port and addr[1] != self.client_port):
                self.dropped += 1  # only the SOCKS5 client that asked may use this relay
                continue
            self.client_port = addr[1]
            try:
                frag, host, port, offset = socks5.parse_udp_header(data)
            except socks5.Socks5Error:
                self.dropped += 1
                continue
            if frag:
                self.fragments_dropped += 1
                if self.fragments_dropped in (1, 10, 100) or self.fragments_dropped % 1000 == 0:
                    log.info("%r: dropped %d fragmented SOCKS5 datagram(s) (not supported)",
                             self, self.fragments_dropped)
                continue
            payload = data[offset:]
            if self.send_datagram(protocol.Data(protocol.UDP, self.id, payload,
                                                target_address=host, target_port=port)):
                self.bytes_up += len(payload)
            self.last_active = trio.current_time()
            await trio.lowlevel.checkpoint()

    async def watch_idle(self) -> None:
        while True:
            left = self.last_active + self.idle_timeout - trio.current_time()
            if left <= 0:
                log.debug("%r: idle for %.0f s, ending", self, self.idle_timeout)
                return
            await trio.sleep(left)


async def associate(session, control, request: socks5.Request, *, connect_timeout: float,
                    idle_timeout: float = IDLE_TIMEOUT, account=None) -> None:
    """Serve one SOCKS5 UDP ASSOCIATE over ``session``; returns when it ends."""
    try:
        local_ip = control.getsockname()[0]
        client_ip = control.getpeername()[0]
    except OSError as exc:  # ENOTCONN: the client reset the connection already
        log.debug("UDP ASSOCIATE: the client is gone before the reply: %s", exc)
        return
    # The request may name the client's UDP address, but clients behind NAT cannot know
    # it: like LinkSocks, learn the port from the first datagram, from the client's IP only.
    client_port = 0
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    try:
        udp = _udp_socket(family, local_ip)
    except OSError as exc:
        log.warning("cannot open a UDP relay socket: %s", exc.strerror)
        await _reply(control, socks5.GENERAL_FAILURE)
        return
    ch = UdpAssociation(session, protocol.new_channel_id(), udp, client_ip, client_port, idle_timeout)
    session.register(ch, account)
    try:
        session.send(protocol.Connect(protocol.UDP, ch.id))
        resp = await ch.wait_response(connect_timeout)
        if resp is None or not resp.success:
            code = socks5.reply_for_error_text(resp.error) if resp else socks5.TTL_EXPIRED
            await _reply(control, code)
            return
        bound_host, bound_port = udp.getsockname()[:2]
        if not await _reply(control, socks5.SUCCEEDED, bound_host, bound_port):
            return  # the client went away: the finally below tells the far end
        await _relay(ch, control)
    except trio.ClosedResourceError:
        pass
    finally:
        if not ch._done.is_set():  # we end it, not the far end: say so
            session.send_if_open(protocol.Disconnect(ch.id))
        ch.finish()
        close_socket(udp)


async def _relay(ch: UdpAssociation, control) -> None:
    """Datagrams both ways until the control connection ends, the association idles out or
    the far end ends it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ch.pump)

        async def end_when(awaitable_fn):
            await awaitable_fn()
            nursery.cancel_scope.cancel()

        nursery.start_soon(end_when, lambda: _until_closed(control))
        nursery.start_soon(end_when, ch.watch_idle)
        nursery.start_soon(end_when, ch._done.wait)


async def _until_closed(control) -> None:
    """The association lives as long as its TCP connection: wait for that to end."""
    while True:
        try:
            data = await sock_recv(control, 4096)
        except OSError:
            return
        if not data:
            return


async def _reply(sock, code: int, host: str = "0.0.0.0", port: int = 0) -> bool:
    """Send a SOCKS5 reply; False when the client is gone (reset, closed)."""
    return await send_quietly(sock, socks5.reply(code, host, port), log, "UDP ASSOCIATE: reply not delivered")


def _same_ip(a: str, b: str) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a.split("%")[0]), ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b
    if ia.version != ib.version:
        ia = getattr(ia, "ipv4_mapped", None) or ia
        ib = getattr(ib, "ipv4_mapped", None) or ib
    return ia == ib


# -- the remote side --------------------------------------------------------------------------

# session -> its open UdpEgress associations (weak: a session that is gone is forgotten)
_associations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()



class UdpEgress(_UdpChannel):
    """One UDP association on the side that talks to the targets."""

    def __init__(self, session, channel_id: bytes, idle_timeout: float, rules=None) -> None:
        super().__init__(session, channel_id)
        self.idle_timeout = idle_timeout
        # rules(name, sockaddr) -> why a datagram may not go there, or None (destination rules)
        self.rules = rules
        self.sockets: dict[int, socket.socket] = {}
        self._resolved: dict[str, tuple[int, str]] = {}
        self._lookups = 0
        self._nursery: trio.Nursery | None = None

    @classmethod
    def start(cls, session, channel_id: bytes, *, idle_timeout: float = IDLE_TIMEOUT,
              rules=None) -> None:
        if channel_id in session.channels:
            return
        if _associations.get(session, 0) >= MAX_UDP_ASSOCIATIONS:
            session.send_if_open(protocol.ConnectResponse(False, channel_id, TOO_MANY_ASSOCIATIONS))
            return
        ch = cls(session, channel_id, idle_timeout, rules)
        _associations[session] = _associations.get(session, 0) + 1
        session.register(ch)
        session.spawn(ch.run, unit="UDP association")

    def finish(self) -> None:
        if not self.state:
            left = _associations.get(self.session, 1) - 1
            if left > 0:
                _associations[self.session] = left
            else:
                _associations.pop(self.session, None)
        super().finish()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.session.send(protocol.ConnectResponse(True, self.id))
                nursery.start_soon(self._idle)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        except trio.ClosedResourceError:
            pass
        finally:
            for sock in self.sockets.values():
                close_socket(sock)
            self.finish()

    async def _idle(self) -> None:
        while True:
            left = self.last_active + self.idle_timeout - trio.current_time()
            if left <= 0:
                self.fail("udp idle timeout")
                return
            await trio.sleep(left)

    def _socket(self, family: int) -> socket.socket:
        sock = self.sockets.get(family)
        if sock is None:
            sock = _udp_socket(family, "::" if family == socket.AF_INET6 else "0.0.0.0")
            self.sockets[family] = sock
            self._nursery.start_soon(self._receive, sock)
        return sock

    def on_datagram(self, msg: protocol.Data) -> None:
        if self._nursery is None or self.state:
            return
        host, port = msg.target_address, msg.target_port
        bad = host_error(host)
        if bad is not None:
            self.dropped += 1
            log.debug("%r: datagram to %r dropped: %s", self, host, bad)
            return
        if not self.charge(len(msg.data)):
            return
        family = literal_family(host)
        if family is None:
            cached = self._resolved.get(host)
            if cached is None:
                if self._lookups >= MAX_PENDING_LOOKUPS:
                    self.dropped += 1
                    return
                self._lookups += 1
                self._nursery.start_soon(self._resolve_and_send, host, port, msg.data)
                return
            family, host = cached
            self._send(family, host, port, msg.data, name=msg.target_address)
            return
        self._send(family, host, port, msg.data)

    def _send(self, family: int, host: str, port: int, data: bytes, name: str | None = None) -> None:
        if self.rules is not None and self.rules(name, (host, port)):
            self.dropped += 1  # refused by a rule: counted and reported by the rules' owner
            return
        try:
            self._socket(family).sendto(data, (host, port))
        except (OSError, ValueError, OverflowError) as exc:  # OverflowError: a port past 65535
            self.dropped += 1
            log.debug("%r: datagram to %s:%d not sent: %s", self, host, port, exc)
            return
        self.bytes_up += len(data)
        self.last_active = trio.current_time()

    async def _resolve_and_send(self, name: str, port: int, data: bytes) -> None:
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                infos = await resolve(name, port, socket.SOCK_DGRAM)
        except (OSError, trio.TooSlowError) as exc:
            self.dropped += 1
            log.debug("%r: datagram to %r dropped: %s", self, name, exc or "lookup timed out")
            return
        finally:
            self._lookups -= 1
        family, _, _, _, sockaddr = infos[0]
        if len(self._resolved) >= MAX_RESOLVED:
            self._resolved.clear()
        self._resolved[name] = (family, sockaddr[0])
        self._send(family, sockaddr[0], port, data, name=name)

    async def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                await wait_readable(sock)
                continue
            except OSError:
                await trio.lowlevel.checkpoint()  # ICMP errors surface here; keep going
                continue
            host = addr[0]
            mapped = getattr(ipaddress.ip_address(host.split("%")[0]), "ipv4_mapped", None)
            if mapped is not None:
                host = str(mapped)
            if self.send_datagram(protocol.Data(protocol.UDP, self.id, data, address=host,
                                                port=addr[1])):
                self.bytes_down += len(data)
            self.last_active = trio.current_time()
            await trio.lowlevel.checkpoint()
