"""The server's front door: every connection to the WebSocket port until it has a route.

Admission caps on connections that have not authenticated yet (in all and per source),
the TLS handshake, the request head (h11), the client's own address behind a
``--trusted-proxy``, and the route: ``/socket`` upgrades go to authentication (see
:mod:`trisocks.tunnel.authenticate`), everything else to the management app or a plain reply.
Everything before authentication runs under one deadline.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from .._version import __version__
from ..net.handshake import HandshakeError, error_response, read_request, response
from ..net.transport import SocketTransport, close_socket, tls_wrap
from ..wire.names import hostport
from .server_config import ServerConfig
from .throttle import address_key

log = logging.getLogger("trisocks.server")

WS_PATHS = ("/socket", "/socket/")
API_PATHS = ("/api/", "/api", "/healthz", "/metrics")  # what the management app answers

# websocket(transport, request, peer, client address, ticket, front-door scope): the upgrade
WebSocketRoute = Callable[..., Awaitable[None]]


class FrontDoor:
    """Accepted connections of the WebSocket port, each up to its route (``handle``)."""

    def __init__(self, config: ServerConfig, tls: ssl.SSLContext | None, trusted_proxies: tuple, *,
                 websocket: WebSocketRoute, http_app=None) -> None:
        self.config = config
        self.tls = tls
        self.trusted_proxies = trusted_proxies  # networks(config.trusted_proxies)
        self.websocket = websocket
        self.http_app = http_app
        self.admission = Admission(config.max_unauthenticated, config.max_unauthenticated_per_source)

    async def handle(self, sock, addr, *, plain: bool = False) -> None:
        """One accepted connection; ``plain``: no TLS even if the port speaks it (the node
        listener on loopback, see Server.node_url)."""
        peer = _fmt(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) and addr else peer
        # behind a trusted proxy the client's own address is known only from the request head
        ticket = self.admission.enter(None if self.trusts(ip) else address_key(ip))
        if ticket is None:
            await self._busy(sock, peer)
            return
        transport = None
        try:
            # the whole life before authentication (TLS, request head, Auth) has one deadline;
            # whoever authenticates or goes to the API app leaves it (and the admission count)
            with trio.CancelScope(deadline=trio.current_time() + self.config.preauth_timeout) as front:
                transport = await self._open(sock, peer, plain)
                if transport is not None:
                    await self._route(transport, peer, addr, ip, ticket, front)
            if front.cancelled_caught:
                log.info("client %s did not authenticate within %g s", peer, self.config.preauth_timeout)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("connection from %s failed: %s", peer, exc)
        # anything else is a bug: guard.contained (around every accepted connection) reports
        # and counts it, and it ends this connection only
        finally:
            ticket.leave()
            if transport is not None:
                with trio.CancelScope(shield=True):
                    await transport.aclose()
            close_socket(sock)

    async def _open(self, sock, peer: str, plain: bool = False):
        """The connection as a transport (after the TLS handshake when we speak TLS), or None."""
        if self.tls is None or plain:
            return SocketTransport(sock, peer)
        try:
            return await tls_wrap(sock, self.tls, server_side=True, peer=peer)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            log.debug("TLS handshake with %s failed: %s", peer, exc.__cause__ or exc)
            return None

    async def _route(self, transport, peer: str, addr, ip: str, ticket: Ticket,
                     front: trio.CancelScope) -> None:
        """Read the request head and hand the connection to the tunnel, the API app or a reply."""
        try:
            req = await read_request(transport)
        except HandshakeError as exc:
            log.debug("bad HTTP request from %s: %s", peer, exc.message)
            await reply(transport, error_response(exc.status, exc.message))
            return
        if req is None:
            return
        client = self.client_address(ip, req.headers)
        req.peer = (client, addr[1] if client == ip else 0)
        if client != ip:
            peer = f"{client} (via {peer})"
        if ticket.source is None and not ticket.claim(address_key(client)):
            log.info("client %s: too many connections waiting to authenticate", peer)
            await reply(transport, error_response(503, "too many connections waiting to authenticate"))
            return
        if req.path in WS_PATHS:
            await self.websocket(transport, req, peer, client, ticket, front)
        elif self.http_app is not None:
            ticket.leave()
            front.deadline = math.inf
            await self.http_app(transport, req)
        elif req.path == "/" and req.method in ("GET", "HEAD"):
            body = f"trisocks {__version__} is running\n"
            await reply(transport, response(200, "" if req.method == "HEAD" else body))
        elif req.method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            await reply(transport, error_response(405, "method not allowed"))
        elif req.is_websocket():
            await reply(transport, error_response(
                404, f"no WebSocket endpoint at {req.path}: the tunnel is on {WS_PATHS[0]}"))
        elif req.path.startswith(API_PATHS):
            await reply(transport, error_response(
                404, "the management API is off: start the server with -k KEY (or TRISOCKS_API_KEY) "
                     "to turn it on (docs/api.md)"))
        else:
            await reply(transport, error_response(404, "not found"))

    async def _busy(self, sock, peer: str) -> None:
        """Over the admission caps: a 503 (plain HTTP; a TLS client is just closed, no handshake
        is spent on it), then close. The request is drained for a moment so that the close does
        not reset the connection before the client has read the answer."""
        self.admission.refused += 1
        log.debug("client %s refused: too many connections waiting to authenticate", peer)
        try:
            if self.tls is None:
                transport = SocketTransport(sock, peer)
                with trio.move_on_after(1):
                    await transport.send_all(error_response(503, "too many connections waiting to "
                                                                 "authenticate"))
                    sock.shutdown(socket.SHUT_WR)
                    while await transport.recv(16384):
                        pass
        except OSError:
            pass
        finally:
            close_socket(sock)

    def trusts(self, ip: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)

    def client_address(self, peer_ip: str, headers: dict[str, str]) -> str:
        """The client's address: the TCP peer's, or behind a trusted proxy the rightmost
        X-Forwarded-For entry that is not a trusted proxy (entries left of it could be made
        up by the client itself). ``headers`` has lower-case names."""
        ip = peer_ip
        if not self.trusts(ip):
            return ip
        for entry in reversed(headers.get("x-forwarded-for", "").split(",")):
            entry = entry.strip().strip("[]")
            if not entry:
                continue
            if not self.trusts(entry):
                try:
                    return str(ipaddress.ip_address(entry))
                except ValueError:
                    return ip  # not an address: nothing to go by but the proxy's own
        return ip


class Admission:
    """Connections that have not authenticated yet: at most ``total`` in all and
    ``per_source`` per source (an address, or an IPv6 /64, see throttle.address_key)."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.count = 0
        self.by_source: dict[str, int] = {}
        self.refused = 0

    def enter(self, source: str | None) -> Ticket | None:
        """A ticket for one more connection (``source`` None: known later, see Ticket.claim),
        or None when a cap is reached."""
        if self.count >= self.total:
            return None
        ticket = Ticket(self)
        self.count += 1
        if source is not None and not ticket.claim(source):
            ticket.leave()
            return None
        return ticket


class Ticket:
    """One connection's place in :class:`Admission`; ``leave`` (idempotent) gives it back."""

    __slots__ = ("admission", "source", "active")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.source: str | None = None
        self.active = True

    def claim(self, source: str) -> bool:
        by_source = self.admission.by_source
        if by_source.get(source, 0) >= self.admission.per_source:
            return False
        by_source[source] = by_source.get(source, 0) + 1
        self.source = source
        return True

    def leave(self) -> None:
        if not self.active:
            return
        self.active = False
        self.admission.count -= 1
        if self.source is not None:
            left = self.admission.by_source.pop(self.source) - 1
            if left:
                self.admission.by_source[self.source] = left


def networks(cidrs) -> tuple:
    """--trusted-proxy values as networks; a ValueError names a bad one."""
    nets = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxy {text!r}: not an address or CIDR") from None
    return tuple(nets)


async def reply(transport, data: bytes) -> None:
    """Send a last word (an HTTP reply before the close); its loss is no news."""
    try:
        await transport.send_all(data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _fmt(addr) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return hostport(host, port)
