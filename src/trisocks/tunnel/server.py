"""The tunnel server: one port for WebSocket clients and plain HTTP.

Front door: every connection's request head is read once (h11). Upgrades on
``/socket`` become sessions; ``GET /`` says the server is running; anything
else gets a plain HTTP error. After the 101 the client authenticates, with an
Auth message or with ``?token=<sha256 hex>`` in the URL, and its token decides
its role:

* **forward** token: the client asks, we dial targets (:class:`Egress`).
* **reverse** token, client says reverse: a *provider*. Each reverse token has
  a :class:`ReverseService`: a SOCKS5 port whose connections go round-robin to
  its providers.
* **connector** token: the client's channels are relayed to a provider of the
  reverse token behind it (:mod:`trisocks.tunnel.bridge`). In autonomy mode providers
  create connector tokens themselves, and those reach only their creator.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field

import trio

from .._version import __version__
from ..net.handshake import (
    FLOW_HEADER,
    HandshakeError,
    Request,
    accept_websocket,
    error_response,
    offers_eof,
    read_request,
    response,
)
from ..net.session import DEFAULT_WINDOW, RECV_BUFFER, ChannelGroup, Handler, Session
from ..net.transport import SocketTransport, accept_loop, bind_tcp, close_socket, listen_on, tls_wrap
from ..wire import protocol
from ..wire.codec import (
    CLOSE,
    MESSAGE,
    NEED_DATA,
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    PING,
    PONG,
    Decoder,
    ProtocolError,
    encode_frame,
)
from ..wire.errors import MessageError
from .bridge import Bridge
from .egress import Egress, direct_dialer
from .ingress import Ingress
from .pool import SessionPool
from .socks_server import Credentials, SocksServer
from .throttle import FailureLimiter, TokenBucket, address_key
from .tokens import CONNECTOR, FORWARD, REVERSE, TokenInfo, TokenTable, generate, redact

log = logging.getLogger("trisocks.server")

WS_PATHS = ("/socket", "/socket/")
# Channels all sessions of one token may have open at once: with sessions per token capped too,
# one token (or user key) cannot take every file descriptor of the server.
MAX_CHANNELS_PER_TOKEN = 10000

# Before authentication a client may send one small Auth message (at most 275 bytes) and a
# few pings, nothing else, within one deadline; it holds a small buffer meanwhile.
PREAUTH_MAX_MESSAGE = 4 << 10
PREAUTH_BUFFER = 4 << 10
PREAUTH_CONTROL_FRAMES = 16
PREAUTH_TIMEOUT = 30.0  # TLS handshake + request head + Auth, all together
MAX_UNAUTHENTICATED = 1024  # connections not yet authenticated, in all
MAX_UNAUTHENTICATED_PER_SOURCE = 64  # ... per source address (IPv6: per /64)
MAX_SESSIONS_PER_TOKEN = 64  # concurrent sessions (clients, providers, connectors) of one token
# Connector ADD in autonomy mode, per provider session: a burst, then a slow rate. Every ADD
# counts, since success against refusal is itself what a name guesser learns from.
CONNECTOR_ADD_BURST = 10
CONNECTOR_ADD_RATE = 1.0  # per second
TOKEN_TAKEN = "token already exists"  # the same whatever kind of token holds the name


@dataclass
class ServerConfig:
    ws_host: str = "0.0.0.0"
    ws_port: int = 8765
    connect_timeout: float = 10.0  # dialing a target (forward mode)
    auth_timeout: float = 15.0
    max_message: int = 32 << 20
    window: int = DEFAULT_WINDOW  # flow-control credit granted to trisocks peers (0: off)
    ping_interval: float = 30.0
    provider_ping_interval: float = 10.0  # providers are pinged more often: liveness for load balancing
    idle_timeout: float = 90.0
    # reverse mode
    socks_host: str = "127.0.0.1"
    socks_nowait: bool = False  # open a reverse token's SOCKS5 port before any provider is there
    provider_wait: float = 10.0  # a SOCKS5 request waits this long for a provider
    provider_answer: float = 20.0  # ...and this long for the provider's ConnectResponse
    fast_open: bool = False
    dialer: object = field(default=direct_dialer)
    tls_cert: str = ""  # PEM certificate chain; with tls_key the server speaks wss:// itself
    tls_key: str = ""
    preauth_timeout: float = PREAUTH_TIMEOUT
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE
    max_sessions_per_token: int = MAX_SESSIONS_PER_TOKEN
    # reverse proxies (CIDRs) whose X-Forwarded-For names the client
    trusted_proxies: tuple[str, ...] = ()


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context, or a ValueError saying what is wrong with the files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for path in (cert, key):
        if path and not os.path.isfile(path):
            raise ValueError(f"TLS: cannot read {path}: no such file")
    try:
        ctx.load_cert_chain(cert, key or None)
    except OSError as exc:
        raise ValueError(f"TLS: cannot read {exc.filename or cert}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise ValueError(f"TLS: certificate {cert} / key {key}: {exc.reason or exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _no_events(kind: str, **fields) -> None:
    pass


class Server:
    """The server. Two hooks connect it to a management plane:

    ``events(kind, **fields)`` hears what happens: ``auth_success`` (role, token, account,
    peer), ``auth_failure`` (peer, how), ``session_closed`` (role, token, account, peer,
    reason), for every role (forward, reverse = providers, connector).

    ``http_app(transport, request)`` answers every HTTP request that is not a WebSocket
    upgrade on /socket (the management API, health, metrics); without it the server
    answers ``GET /`` and 404 itself.

    What management may use besides (nothing else): ``ready``, ``port``, ``scheme``,
    ``host``, ``serve``, the token methods, :meth:`session_tokens`,
    :meth:`close_sessions_of`, :meth:`provider_count`, :meth:`reverse_port`,
    :attr:`socks_credentials_hook`, :meth:`client_address`, :attr:`trusts_proxies`,
    :meth:`add_listener` and :meth:`check_socks_port`.
    """

    def __init__(self, config: ServerConfig, tokens: TokenTable, *, events=None,
                 http_app=None) -> None:
        self.config = config
        self.tokens = tokens
        self.events = events or _no_events
        self.http_app = http_app
        # wrong tokens per address: after 10 in a minute, upgrades get 429 for a while
        self.auth_limiter = FailureLimiter()
        self.started_at = time.monotonic()
        self.port = config.ws_port
        self.sessions: dict[Session, TokenInfo] = {}
        self._channel_groups: dict[str, ChannelGroup] = {}
        self.services: dict[str, ReverseService] = {}
        self.egress = Egress(dialer=config.dialer, connect_timeout=config.connect_timeout)
        # the tunnel must not lead back into this process (its API above all)
        self.egress.own_listeners = self._own_listeners
        # (host, port) of other listeners of this process (the management API's --api-bind)
        self.extra_listeners: list[tuple[str, int]] = []
        self.admission = Admission(config.max_unauthenticated, config.max_unauthenticated_per_source)
        self.trusted_proxies = _networks(config.trusted_proxies)
        self._token_sessions: dict[str, int] = {}  # token -> sessions open
        self._nursery: trio.Nursery | None = None
        self._socks_credentials_hook = None
        self.ready = trio.Event()
        self.tls = tls_server_context(config.tls_cert, config.tls_key) if config.tls_cert else None

    # -- the interface management uses ------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "ws" if self.tls is None else "wss"

    @property
    def host(self) -> str:
        """The configured listen host of the WebSocket port."""
        return self.config.ws_host

    def session_tokens(self) -> list[TokenInfo]:
        """The TokenInfo of every open session, one entry per session."""
        return list(self.sessions.values())

    def close_sessions_of(self, account: object, reason: str) -> int:
        """Close (1008) every session of ``account``; returns how many."""
        doomed = [session for session, info in list(self.sessions.items()) if info.account is account]
        for session in doomed:
            session.close(1008, reason)
        return len(doomed)

    def provider_count(self, token: str) -> int:
        service = self.services.get(token)
        return len(service.pool) if service is not None else 0

    def reverse_port(self, token: str) -> int | None:
        """A reverse token's SOCKS5 port; None in autonomy mode (it has none) or for a token
        without a service (unknown, or the server is not serving yet)."""
        service = self.services.get(token)
        if service is None or service.autonomy:
            return None
        return service.socks.port

    @property
    def socks_credentials_hook(self):
        """``hook(own) -> credentials``: what every reverse token's SOCKS5 port checks, built
        from the token's own pair (``own``, a Credentials or None). None: the own pair alone."""
        return self._socks_credentials_hook

    @socks_credentials_hook.setter
    def socks_credentials_hook(self, hook) -> None:
        self._socks_credentials_hook = hook
        for service in list(self.services.values()):
            service.socks.credentials = self.socks_credentials(service.own_credentials)

    def socks_credentials(self, own: Credentials | None):
        """The credentials checker of a reverse token's SOCKS5 port whose own pair is ``own``."""
        hook = self._socks_credentials_hook
        return own if hook is None else hook(own)

    @property
    def trusts_proxies(self) -> bool:
        return bool(self.trusted_proxies)

    def add_listener(self, host: str, port: int) -> None:
        """Another listener of this process (the API's --api-bind): the tunnel refuses to dial it."""
        self.extra_listeners.append((host, port))

    def check_socks_port(self, port: int) -> None:
        """Raise OSError if a reverse token's SOCKS5 port ``port`` cannot be bound on the
        configured SOCKS5 host now. The error keeps the system's errno and strerror and names
        the address (``host:port``) as its filename."""
        host = self.config.socks_host
        try:
            sock = bind_tcp(host, port)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, exc.strerror or str(exc), where) from None
        sock.close()

    def _own_listeners(self) -> list[tuple[str, int]]:
        """Where this process listens: its WebSocket port, every reverse token's SOCKS5 port,
        and whatever the management plane added (``extra_listeners``)."""
        own = [(self.config.ws_host, self.port)]
        own += [(s.socks.host, s.socks_port) for s in list(self.services.values()) if s.socks_port]
        return own + list(self.extra_listeners)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lsock = listen_on(self.config.ws_host, self.config.ws_port, "the server")
        self.started_at = time.monotonic()
        try:
            self.port = lsock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for info in self.tokens.of_kind(REVERSE):
                    await self._start_service(info)
                log.info("trisocks %s listening on %s:%d (%s, WebSocket path /socket)", __version__,
                         self.config.ws_host, self.port, "TLS" if self.tls else "plain HTTP")
                self.ready.set()
                task_status.started(self.port)
                await accept_loop(lsock, self._handle, nursery, log, "WebSocket connection")
        finally:
            close_socket(lsock)

    # -- tokens --------------------------------------------------------------------------
    async def add_reverse_token(self, token: str | None = None, *, port: int | None = None,
                                username: str = "", password: str = "",
                                allow_manage_connector: bool = False) -> TokenInfo:
        """Add a reverse token at run time; its SOCKS5 port is bound at once and reported."""
        info = self.tokens.add(TokenInfo(token or generate(), REVERSE, port=port, username=username,
                                         password=password,
                                         allow_manage_connector=allow_manage_connector))
        if self._nursery is not None:
            await self._start_service(info)
        return info

    def add_connector_token(self, token: str | None, reverse_token: str, owner: bytes = b"") -> TokenInfo:
        rev = self.tokens.get(reverse_token)
        if rev is None or rev.kind != REVERSE:
            raise ValueError("reverse token not found")
        info = self.tokens.add(TokenInfo(token or generate(), CONNECTOR, reverse_token=reverse_token,
                                         owner=owner))
        return info

    def remove_token(self, token: str) -> TokenInfo | None:
        """Forget a token, disconnect its clients and (reverse) close its SOCKS5 port."""
        info = self.tokens.remove(token)
        if info is None:
            return None
        doomed = [info]
        if info.kind == REVERSE:
            doomed += self.tokens.connectors_of(info.token)
            for c in doomed[1:]:
                self.tokens.remove(c.token)
            service = self.services.pop(info.token, None)
            if service is not None:
                service.stop()
        for session, owner in list(self.sessions.items()):
            if any(owner is d for d in doomed):
                session.close(1008, "token removed")
        return info

    async def _start_service(self, info: TokenInfo) -> None:
        service = ReverseService(self, info)
        self.services[info.token] = service
        port = await self._nursery.start(service.run)
        if port is not None:  # None: autonomy mode, no port (info.port keeps what was asked)
            info.port = port

    # -- front door ------------------------------------------------------------------
    async def _handle(self, sock, addr) -> None:
        peer = _fmt(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) and addr else peer
        # behind a trusted proxy the client's own address is known only from the request head
        ticket = self.admission.enter(None if self._trusts(ip) else address_key(ip))
        if ticket is None:
            await self._busy(sock, peer)
            return
        transport = None
        try:
            # the whole life before authentication (TLS, request head, Auth) has one deadline;
            # whoever authenticates or goes to the API app leaves it (and the admission count)
            with trio.CancelScope(deadline=trio.current_time() + self.config.preauth_timeout) as front:
                transport = await self._open(sock, peer)
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

    async def _open(self, sock, peer: str):
        """The connection as a transport (after the TLS handshake when we speak TLS), or None."""
        if self.tls is None:
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
            await _reply(transport, error_response(exc.status, exc.message))
            return
        if req is None:
            return
        client = self.client_address(ip, req.headers)
        req.peer = (client, addr[1] if client == ip else 0)
        if client != ip:
            peer = f"{client} (via {peer})"
        if ticket.source is None and not ticket.claim(address_key(client)):
            log.info("client %s: too many connections waiting to authenticate", peer)
            await _reply(transport, error_response(503, "too many connections waiting to authenticate"))
            return
        if req.path in WS_PATHS:
            await self._websocket(transport, req, peer, client, ticket, front)
        elif self.http_app is not None:
            ticket.leave()
            front.deadline = math.inf
            await self.http_app(transport, req)
        elif req.path == "/" and req.method in ("GET", "HEAD"):
            body = f"trisocks {__version__} is running\n"
            await _reply(transport, response(200, "" if req.method == "HEAD" else body))
        elif req.method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            await _reply(transport, error_response(405, "method not allowed"))
        else:
            await _reply(transport, error_response(404, "not found"))

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

    def _trusts(self, ip: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)

    def _client_ip(self, ip: str, req: Request) -> str:
        # kept for callers that still pass a request (the management plane, until it moves)
        return self.client_address(ip, req.headers)

    def client_address(self, peer_ip: str, headers: dict[str, str]) -> str:
        """The client's address: the TCP peer's, or behind a trusted proxy the rightmost
        X-Forwarded-For entry that is not a trusted proxy (entries left of it could be made
        up by the client itself). ``headers`` has lower-case names."""
        ip = peer_ip
        if not self._trusts(ip):
            return ip
        for entry in reversed(headers.get("x-forwarded-for", "").split(",")):
            entry = entry.strip().strip("[]")
            if not entry:
                continue
            if not self._trusts(entry):
                try:
                    return str(ipaddress.ip_address(entry))
                except ValueError:
                    return ip  # not an address: nothing to go by but the proxy's own
        return ip

    async def _websocket(self, transport, req: Request, peer: str, ip: str, ticket: Ticket,
                         front: trio.CancelScope) -> None:
        wait = self.auth_limiter.retry_after(ip)
        if wait:
            # too many wrong tokens from this address lately: no upgrade, no token check
            await _reply(transport, response(429, "too many failed authentications\n",
                                             headers=[("Retry-After", str(wait))]))
            return
        try:
            answer, peer_window = accept_websocket(req, window=self.config.window)
        except HandshakeError as exc:
            await _reply(transport, error_response(exc.status, exc.message))
            return
        await transport.send_all(answer)

        if "token" in req.query:
            digest_param = req.query["token"]
            info = self.tokens.get_by_digest(digest_param) if len(digest_param) == 64 else None
            reverse = req.query.get("reverse", "false").lower() in ("true", "1")
            instance = _parse_instance(req.query.get("instance", ""))
            how, rest = "URL", req.leftover
        else:
            try:
                first, rest = await self._read_auth(transport, req.leftover)
                msg = protocol.parse(first)
            except ProtocolError as exc:
                log.info("client %s broke the WebSocket framing before authenticating: %s",
                         peer, exc.reason)
                await self._close(transport, exc.close_code, exc.reason)
                return
            except (trio.TooSlowError, EOFError, MessageError, OSError) as exc:
                log.info("client %s did not authenticate: %s", peer, exc or "timeout")
                await self._refuse(transport, "invalid auth message")
                return
            if not isinstance(msg, protocol.Auth):
                await self._refuse(transport, "invalid auth message")
                return
            info = self.tokens.get(msg.token)
            reverse, instance = msg.reverse, msg.instance
            how = "Auth message"

        role = _role(info, reverse)
        if role is None:
            log.warning("authentication failed from %s (%s)", peer, how)
            self.events("auth_failure", peer=peer, how=how)
            self.auth_limiter.failed(ip)
            await self._refuse(transport, "invalid token")
            return
        refused = info.account.refuse_reason() if info.account is not None else None
        if not refused and self._token_sessions.get(info.token, 0) >= self.config.max_sessions_per_token:
            refused = "too many sessions for this token"
        if refused:
            log.warning("client %s refused: %s", peer, refused)
            self.events("auth_failure", peer=peer, how=how, reason=refused, account=info.account)
            await self._refuse(transport, refused)
            return
        service = None
        if role != FORWARD:
            service = self.services.get(info.token if role == REVERSE else info.reverse_token)
            if service is None:
                await self._refuse(transport, "invalid token")
                return
        decoder = Decoder(expect_masked=True, max_message=self.config.max_message,
                          buffer_size=RECV_BUFFER)
        decoder.feed_bytes(rest)
        if role == FORWARD:
            handler: Handler = self.egress
        elif role == REVERSE:
            handler = ProviderSide(service, instance)
        else:
            handler = ConnectorSide(service, info)
        session = Session(
            transport, decoder, client_side=False, handler=handler,
            name=f"{'provider' if role == REVERSE else role} {peer}", peer_window=peer_window,
            half_close=offers_eof(req.headers.get(FLOW_HEADER)),
            recv_window=self.config.window,
            ping_interval=(self.config.provider_ping_interval if role == REVERSE
                           else self.config.ping_interval),
            idle_timeout=self.config.idle_timeout,
        )
        session.account = info.account
        session.group = self._channel_group(info)
        self._token_sessions[info.token] = self._token_sessions.get(info.token, 0) + 1
        try:
            if role == REVERSE:
                # ready means ready: a provider hears it is in only once the port it serves accepts
                await service.port_open()
                if service.stopped:
                    await self._refuse(transport, "invalid token")
                    return
            ticket.leave()
            front.deadline = math.inf
            await self._run_session(session, service, role, instance, info, peer, ip)
        finally:
            left = self._token_sessions.pop(info.token) - 1
            if left:
                self._token_sessions[info.token] = left

    async def _run_session(self, session: Session, service: ReverseService | None, role: str,
                           instance: bytes, info: TokenInfo, peer: str, ip: str) -> None:
        session.send(protocol.AuthResponse(True))
        log.info("%s authenticated (token %s%s)", session, redact(info.token),
                 ", trisocks flow control" if session.peer_window else "")
        self.sessions[session] = info
        self.events("auth_success", role=role, token=info.token, account=info.account, peer=peer)
        self.auth_limiter.succeeded(ip)
        try:
            if service is None:
                await session.run()
            else:
                await service.serve_session(session, role, instance, info)
        finally:
            del self.sessions[session]
            log.info("%s gone: %s", session, session.close_reason or "closed")
            self.events("session_closed", role=role, token=info.token, account=info.account,
                        peer=peer, reason=session.close_reason or "closed")

    async def _read_auth(self, transport, leftover: bytes) -> tuple[bytes, bytes]:
        """The first message, which must be Auth, read with a small decoder; returns it and the
        bytes that followed it (for the session's full decoder). Only a few pings may come
        first: Data, text, a message over a few KiB or too many control frames are refused."""
        if len(leftover) > PREAUTH_BUFFER:
            raise MessageError("too many bytes before Auth")
        decoder = Decoder(expect_masked=True, max_message=PREAUTH_MAX_MESSAGE, buffer_size=PREAUTH_BUFFER)
        decoder.feed_bytes(leftover)
        controls = 0
        with trio.fail_after(self.config.auth_timeout):
            while True:
                ev = decoder.next_event()
                if decoder.ignored:
                    raise MessageError("a text message before Auth")
                if ev == MESSAGE:
                    if decoder.data[1:2] != bytes((protocol.T_AUTH,)):
                        raise MessageError("a message other than Auth before Auth")
                    return decoder.data, decoder.take_unparsed()
                if ev == NEED_DATA:
                    n = await transport.recv_into(decoder.get_buffer())
                    if n == 0:
                        raise EOFError("connection closed")
                    decoder.feed(n)
                elif ev in (PING, PONG):
                    controls += 1
                    if controls > PREAUTH_CONTROL_FRAMES:
                        raise MessageError("too many control frames before Auth")
                    if ev == PING:
                        await transport.send_all(encode_frame(OP_PONG, decoder.data))
                elif ev == CLOSE:
                    raise EOFError(f"closed by peer ({decoder.close_reason or decoder.close_code})")
                else:
                    raise MessageError("Data before Auth")

    def _channel_group(self, info: TokenInfo) -> ChannelGroup:
        """The open channels of every session of one token together, against its limit."""
        group = self._channel_groups.get(info.token)
        if group is None:
            group = self._channel_groups[info.token] = ChannelGroup(MAX_CHANNELS_PER_TOKEN)
        return group

    async def _refuse(self, transport, error: str) -> None:
        """Failed authentication: an AuthResponse saying why, then close (policy violation)."""
        reply = encode_frame(OP_BINARY, protocol.pack(protocol.AuthResponse(False, error)))
        await self._close(transport, 1008, error, before=reply)

    async def _close(self, transport, code: int, reason: str, before: bytes = b"") -> None:
        try:
            with trio.move_on_after(5):
                await transport.send_all(
                    before + encode_frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])
                )
        except OSError:
            pass


def _role(info: TokenInfo | None, reverse: bool) -> str | None:
    """What a client may be with this token and this reverse flag (None: refused)."""
    if info is None:
        return None
    if info.kind == FORWARD and not reverse:
        return FORWARD
    if info.kind == REVERSE and reverse:
        return REVERSE
    if info.kind == CONNECTOR and not reverse:
        return CONNECTOR
    return None


class ReverseService:
    """One reverse token: its providers, its SOCKS5 port, and the connectors that reach them."""

    def __init__(self, server: Server, info: TokenInfo) -> None:
        cfg = server.config
        self.server = server
        self.info = info
        self.pool = SessionPool(f"providers of {redact(info.token)}")
        self.by_instance: dict[bytes, SessionPool] = {}  # autonomy: each provider's own pool
        self.connectors: dict[Session, TokenInfo] = {}  # connector sessions and their tokens
        self.instances: dict[Session, bytes] = {}  # provider sessions and their instance ids
        self.ingress = Ingress(self.pool, wait_timeout=cfg.provider_wait,
                               connect_timeout=cfg.provider_answer, fast_open=cfg.fast_open,
                               name=f"SOCKS5 of {redact(info.token)}")
        # the token's own pair; management may widen it (see Server.socks_credentials_hook)
        self.own_credentials = Credentials(info.username, info.password) if info.username else None
        creds = server.socks_credentials(self.own_credentials)
        # In autonomy mode (as both peers define it) the token has no SOCKS5 port at all: its
        # providers are reached only through the connector tokens each one registered. The
        # SocksServer object stays (never bound) for code that reads its settings.
        self.autonomy = info.allow_manage_connector
        self.socks = SocksServer(cfg.socks_host, 0 if self.autonomy else info.port or 0,
                                 on_connect=self.ingress.on_connect, on_udp=self.ingress.on_udp,
                                 credentials=creds, name=f"SOCKS5 of {redact(info.token)}")
        self.socks_port: int | None = None  # while the port is ours (bound or listening)
        self.stopped = False
        self._wanted = trio.Event()  # a provider waits for the port to open
        self._open = trio.Event()  # the port accepts connections (or there is none)
        self._scope = trio.CancelScope()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            if self.autonomy:
                log.info("reverse token %s: autonomy mode, no SOCKS5 port (providers are reached "
                         "through their own connector tokens)", redact(self.info.token))
                self._open.set()
                task_status.started(None)
                await trio.sleep_forever()
            nowait = self.server.config.socks_nowait
            port = self.socks_port = self.socks.bind()  # its error names the address and the token
            log.info("reverse token %s: SOCKS5 port %s:%d%s", redact(self.info.token),
                     self.socks.host, port, "" if nowait else " (opens when a provider connects)")
            task_status.started(port)
            try:
                if not nowait:
                    await self._wanted.wait()
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.socks.serve)
                    if not nowait:
                        log.info("reverse token %s: a provider is here, SOCKS5 port %d open",
                                 redact(self.info.token), port)
                    self._open.set()
            finally:
                self.socks_port = None
                self.socks.close()

    async def port_open(self) -> None:
        """Return once this token's SOCKS5 port accepts connections, opening it for the first
        provider (or at once: no port in autonomy mode, or the token was removed)."""
        self._wanted.set()
        await self._open.wait()

    def stop(self) -> None:
        self.stopped = True
        self._open.set()
        self._scope.cancel()
        for session in list(self.pool) + list(self.connectors):
            session.close(1008, "token removed")

    async def serve_session(self, session: Session, role: str, instance: bytes, info: TokenInfo) -> None:
        if role == REVERSE:
            own = self.by_instance.setdefault(instance, SessionPool("provider instance"))
            self.pool.add(session)
            own.add(session)
            self.instances[session] = instance
            self._tell_partners()
            try:
                await session.run()
            finally:
                # The instance's pool stays: connectors of tokens it created wait for it to
                # come back (a provider reconnecting keeps its connector tokens).
                self.pool.remove(session)
                own.remove(session)
                self.instances.pop(session, None)
                self._tell_partners()
        else:
            self.connectors[session] = info
            self._tell_partners()
            try:
                await session.run()
            finally:
                self.connectors.pop(session, None)
                self._tell_partners()

    def pool_for(self, connector: TokenInfo) -> SessionPool:
        if connector.owner:
            return self.by_instance.setdefault(connector.owner, SessionPool("provider instance"))
        return self.pool

    def _tell_partners(self) -> None:
        """Tell each connector how many providers its token reaches, and each provider how
        many connectors reach it (in autonomy mode a token reaches only its creator)."""
        for session, info in list(self.connectors.items()):
            session.send_if_open(protocol.Partners(len(self.pool_for(info))))
        for session, instance in list(self.instances.items()):
            count = sum(1 for info in self.connectors.values() if info.owner in (b"", instance))
            session.send_if_open(protocol.Partners(count))

    def owner_gone(self, instance: bytes) -> bool:
        """True when no session of this provider instance is connected any more."""
        return not len(self.by_instance.get(instance, ()))


class ProviderSide(Handler):
    """A provider's session, seen from the server: it answers our Connects and may manage tokens."""

    def __init__(self, service: ReverseService, instance: bytes) -> None:
        self.service = service
        self.instance = instance
        self.adds = TokenBucket(CONNECTOR_ADD_BURST, CONNECTOR_ADD_RATE)

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        session.send(protocol.ConnectResponse(False, msg.channel, "providers do not open channels"))

    def on_connector(self, session: Session, msg: protocol.Connector) -> None:
        service = self.service
        server = service.server
        if not service.info.allow_manage_connector:
            session.send(protocol.ConnectorResponse(msg.channel, False, "connector management not allowed"))
            return
        if msg.operation == protocol.ADD:
            if not self.adds.take():
                session.send(protocol.ConnectorResponse(msg.channel, False, "rate limited"))
                return
            existing = server.tokens.get(msg.token) if msg.token else None
            if (existing is not None and existing.kind == CONNECTOR and existing.owner
                    and existing.reverse_token == service.info.token
                    and existing.owner != self.instance and service.owner_gone(existing.owner)):
                # its creator is gone (a restarted provider has a new instance id): take it over
                existing.owner = self.instance
                service._tell_partners()
            if existing is not None and not (existing.kind == CONNECTOR and existing.owner == self.instance):
                session.send(protocol.ConnectorResponse(msg.channel, False, TOKEN_TAKEN))
                return
            try:
                info = existing or server.add_connector_token(msg.token or None, service.info.token,
                                                              owner=self.instance)
            except ValueError as exc:  # never which kind of token holds the name
                text = TOKEN_TAKEN if "exists" in str(exc) else str(exc)
                session.send(protocol.ConnectorResponse(msg.channel, False, text))
                return
            log.info("%s added connector token %s", session, redact(info.token))
            session.send(protocol.ConnectorResponse(msg.channel, True, token=info.token))
        else:
            info = server.tokens.get(msg.token)
            if info is None or info.kind != CONNECTOR or info.owner != self.instance:
                session.send(protocol.ConnectorResponse(msg.channel, False, "token not found"))
                return
            server.remove_token(info.token)
            log.info("%s removed connector token %s", session, redact(info.token))
            session.send(protocol.ConnectorResponse(msg.channel, True))


class ConnectorSide(Handler):
    """A connector's session: its channels are relayed to a provider."""

    def __init__(self, service: ReverseService, info: TokenInfo) -> None:
        self.service = service
        self.info = info

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        refused = session.refuse_reason()
        if refused:
            session.send(protocol.ConnectResponse(False, msg.channel, refused))
            return
        target = f"{msg.address}:{msg.port}" if msg.protocol == protocol.TCP else "udp"
        bridge = Bridge(session, msg.channel, target)
        session.register(bridge.connector)
        session.spawn(self._link, session, bridge, msg, unit="bridge")

    async def _link(self, session: Session, bridge: Bridge, msg: protocol.Connect) -> None:
        pool = self.service.pool_for(self.info)
        provider = await pool.wait_pick(self.service.server.config.provider_wait)
        if bridge.connector.state:
            return  # the connector gave up meanwhile
        if provider is None:
            session.send_if_open(protocol.ConnectResponse(False, msg.channel, "no provider available"))
            bridge.connector.finish()
            return
        if msg.channel in provider.channels:
            session.send_if_open(protocol.ConnectResponse(False, msg.channel, "channel id in use"))
            bridge.connector.finish()
            return
        provider.send_if_open(msg)  # the Connect goes first, then any bytes the connector sent early
        bridge.attach_provider(provider)


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


def _networks(cidrs) -> tuple:
    """--trusted-proxy values as networks; a ValueError names a bad one."""
    nets = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxy {text!r}: not an address or CIDR") from None
    return tuple(nets)


def _parse_instance(text: str) -> bytes:
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        return uuid.uuid4().bytes


async def _reply(transport, data: bytes) -> None:
    try:
        await transport.send_all(data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _fmt(addr) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
