"""The tunnel client, forward mode: a local SOCKS5 port whose connections leave from the server.

The client keeps ``threads`` WebSocket sessions up (reconnecting with capped,
jittered exponential backoff) and spreads new channels over the live ones.
Each SOCKS5 CONNECT becomes a channel: Connect, wait for the server's
ConnectResponse, answer the SOCKS5 client, then relay. With no live session a
SOCKS5 client gets a prompt failure instead of a hang. A refused token ends
the client: retrying cannot fix it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import trio

from . import protocol, socks5
from .channel import Channel
from .codec import Decoder, ProtocolError
from .dial import dial_tcp
from .errors import AuthError, MessageError, TunnelError
from .handshake import HandshakeError, client_handshake, parse_window
from .session import DEFAULT_WINDOW, Handler, Session, read_message
from .socks_server import Credentials, SocksServer
from .tokens import redact
from .transport import SocketTransport, close_socket, sock_sendall

log = logging.getLogger("trisocks.client")

SESSION_WAIT = 2.0  # how long a SOCKS5 request waits for a (re)connecting session


@dataclass
class ClientConfig:
    url: str = "ws://localhost:8765"
    token: str = "anonymous"
    socks_host: str = "127.0.0.1"
    socks_port: int = 9870
    socks_username: str = ""
    socks_password: str = ""
    socks_wait_server: bool = True  # open the SOCKS5 port only once connected (linksocks default)
    reconnect: bool = True
    threads: int = 1
    connect_timeout: float = 20.0  # waiting for ConnectResponse (the server dials with its own timeout)
    dial_timeout: float = 15.0  # reaching the WebSocket server
    window: int = DEFAULT_WINDOW
    max_message: int = 32 << 20
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    ping_interval: float = 30.0
    idle_timeout: float = 90.0


@dataclass(frozen=True)
class Endpoint:
    """Where the WebSocket server is, parsed from the URL the user gave."""

    scheme: str
    host: str
    port: int
    resource: str  # path and query sent in the GET line

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "wss" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.resource.split('?')[0]}"


def parse_url(url: str) -> Endpoint:
    """Accept ws/wss/http/https URLs (LinkSocks style); an empty path means /socket."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (use ws:// or wss://)")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise ValueError(f"bad port in URL {url!r}") from None
    path = parts.path if parts.path not in ("", "/") else "/socket"
    resource = urlunsplit(("", "", path, parts.query, ""))
    return Endpoint(scheme, parts.hostname, port, resource)


class Client:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.endpoint = parse_url(config.url)
        if self.endpoint.scheme == "wss":
            raise ValueError("wss:// URLs need TLS support, which this build does not have yet")
        self.instance = protocol.new_channel_id()
        self.sessions: list[Session] = []
        self._up = trio.Event()
        self._rr = 0
        self.socks_port: int | None = None
        self.socks: SocksServer | None = None
        self.handler = Handler()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; raises AuthError for a refused token, TunnelError with -R on loss."""
        cfg = self.config
        creds = Credentials(cfg.socks_username, cfg.socks_password) if cfg.socks_username else None
        self.socks = SocksServer(cfg.socks_host, cfg.socks_port, on_connect=self._on_socks_connect,
                                 credentials=creds, name="SOCKS5")
        async with trio.open_nursery() as nursery:
            for slot in range(max(1, cfg.threads)):
                nursery.start_soon(self._keep_connected, slot)
            if cfg.socks_wait_server:
                await self._up.wait()
            self.socks_port = await nursery.start(self.socks.serve)
            log.info("SOCKS5 proxy listening on %s:%d%s", cfg.socks_host, self.socks_port,
                     " (username/password required)" if creds else "")
            task_status.started(self.socks_port)

    # -- sessions --------------------------------------------------------------------
    async def _keep_connected(self, slot: int) -> None:
        cfg = self.config
        delay = cfg.backoff_initial
        while True:
            try:
                session = await self.connect()
            except AuthError:
                raise
            except (OSError, HandshakeError, trio.TooSlowError, EOFError, ProtocolError,
                    MessageError) as exc:
                if not cfg.reconnect:
                    raise TunnelError(f"cannot reach {self.endpoint.display}: {_describe(exc)}") from None
                wait = delay * random.uniform(0.8, 1.2)
                log.warning("cannot reach %s: %s; retrying in %.1f s", self.endpoint.display,
                            _describe(exc), wait)
                await trio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max)
                continue
            delay = cfg.backoff_initial
            self.sessions.append(session)
            self._up.set()
            try:
                await session.run()
            finally:
                self.sessions.remove(session)
                if not self.sessions:
                    self._up = trio.Event()
            if not cfg.reconnect:
                raise TunnelError(f"disconnected from server: {session.close_reason}")
            log.warning("connection %d to server lost (%s); reconnecting", slot, session.close_reason)

    async def connect(self) -> Session:
        """Dial, upgrade and authenticate one WebSocket session."""
        cfg, ep = self.config, self.endpoint
        sock = await dial_tcp(ep.host, ep.port, timeout=cfg.dial_timeout)
        transport = SocketTransport(sock, ep.display)
        try:
            headers, leftover = await client_handshake(transport, ep.host_header, ep.resource,
                                                       window=cfg.window)
            decoder = Decoder(expect_masked=False, max_message=cfg.max_message)
            decoder.feed_bytes(leftover)
            session = Session(
                transport, decoder, client_side=True, handler=self.handler,
                name=f"server {ep.display}", peer_window=parse_window(headers.get("x-trisocks-flow")),
                recv_window=cfg.window, ping_interval=cfg.ping_interval, idle_timeout=cfg.idle_timeout,
            )
            auth = protocol.Auth(cfg.token, False, self.instance)
            from .codec import OP_BINARY, encode_frame

            await transport.send_all(encode_frame(OP_BINARY, protocol.pack(auth), session.mask_key()))
            reply = protocol.parse(await read_message(transport, decoder, timeout=cfg.dial_timeout,
                                                      client_side=True))
        except BaseException:
            close_socket(sock)
            raise
        if not isinstance(reply, protocol.AuthResponse):
            close_socket(sock)
            raise EOFError(f"expected AuthResponse, got {type(reply).__name__}")
        if not reply.success:
            close_socket(sock)
            hint = " (no token given: use -t or TRISOCKS_TOKEN)" if cfg.token == "anonymous" else ""
            raise AuthError(f"server refused token {redact(cfg.token)}: {reply.error or 'invalid token'}{hint}")
        log.info("connected to %s%s", ep.display,
                 " (trisocks flow control)" if session.peer_window else "")
        return session

    def pick_session(self) -> Session | None:
        live = self.sessions
        if not live:
            return None
        self._rr = (self._rr + 1) % len(live)
        return live[self._rr]

    async def wait_session(self, timeout: float) -> Session | None:
        if not self.sessions:
            with trio.move_on_after(timeout):
                await self._up.wait()
        return self.pick_session()

    # -- SOCKS5 ------------------------------------------------------------------------
    async def _on_socks_connect(self, sock, request: socks5.Request, early: bytes) -> None:
        session = await self.wait_session(SESSION_WAIT)
        if session is None:
            await _send_reply(sock, socks5.NETWORK_UNREACHABLE)
            return
        ch = session.open_channel(f"{request.host}:{request.port}")
        try:
            await self._relay(session, ch, sock, request, early)
        except trio.ClosedResourceError:
            pass
        finally:
            ch.finish()

    async def _relay(self, session: Session, ch: Channel, sock, request, early: bytes) -> None:
        session.send(protocol.Connect(protocol.TCP, ch.id, request.host, request.port))
        resp = await ch.wait_response(self.config.connect_timeout)
        if resp is None or not resp.success:
            if resp is None:
                code = socks5.TTL_EXPIRED if session.nursery and not session.closed.is_set() else \
                    socks5.NETWORK_UNREACHABLE
                session.send_if_open(protocol.Disconnect(ch.id, "connect timeout"))
            else:
                code = socks5.reply_for_error_text(resp.error)
            log.debug("CONNECT %s failed: %s", ch.target, resp.error if resp else "no answer")
            await _send_reply(sock, code)
            return
        await sock_sendall(sock, socks5.reply(socks5.SUCCEEDED))
        ch.attach(sock)
        if early:
            await ch.send_early(early)
        await ch.run()


async def _send_reply(sock, code: int) -> None:
    try:
        await sock_sendall(sock, socks5.reply(code))
    except OSError:
        pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        return exc.message
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


__all__ = ["Client", "ClientConfig", "parse_url"]
