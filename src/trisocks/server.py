"""The tunnel server: one port for WebSocket clients and plain HTTP.

Front door: every connection's request head is read once (h11). Upgrades on
``/socket`` become sessions; ``GET /`` says the server is running; anything
else gets a plain HTTP error. After the 101 the client authenticates, with
an Auth message or with ``?token=<sha256 hex>`` in the URL, and its session
serves channels: forward clients ask us to dial targets.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import trio

from . import protocol, socks5
from ._version import __version__
from .channel import OPENING
from .codec import OP_BINARY, OP_CLOSE, Decoder, ProtocolError, encode_frame
from .dial import dial_tcp
from .errors import MessageError
from .handshake import HandshakeError, Request, accept_websocket, error_response, read_request, response
from .session import DEFAULT_WINDOW, Handler, Session, read_message
from .tokens import FORWARD, TokenTable, redact
from .transport import SocketTransport, accept_loop, close_socket, listen_tcp, sock_sendall

log = logging.getLogger("trisocks.server")

WS_PATHS = ("/socket", "/socket/")


@dataclass
class ServerConfig:
    ws_host: str = "0.0.0.0"
    ws_port: int = 8765
    connect_timeout: float = 10.0
    auth_timeout: float = 15.0
    max_message: int = 32 << 20
    window: int = DEFAULT_WINDOW  # flow-control credit granted to trisocks peers (0: off)
    ping_interval: float = 30.0
    idle_timeout: float = 90.0


class Server:
    def __init__(self, config: ServerConfig, tokens: TokenTable) -> None:
        self.config = config
        self.tokens = tokens
        self.port = config.ws_port
        self.sessions: set[Session] = set()
        self.forward = ForwardHandler(self)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lsock = listen_tcp(self.config.ws_host, self.config.ws_port)
        try:
            self.port = lsock.getsockname()[1]
            log.info("trisocks %s listening on %s:%d (WebSocket path /socket)",
                     __version__, self.config.ws_host, self.port)
            task_status.started(self.port)
            async with trio.open_nursery() as nursery:
                await accept_loop(lsock, self._handle, nursery, log)
        finally:
            close_socket(lsock)

    # -- front door ------------------------------------------------------------------
    async def _handle(self, sock, addr) -> None:
        peer = _fmt(addr)
        try:
            try:
                req = await read_request(sock)
            except HandshakeError as exc:
                log.debug("bad HTTP request from %s: %s", peer, exc.message)
                await _reply(sock, error_response(exc.status, exc.message))
                return
            if req is None:
                return
            if req.path in WS_PATHS:
                await self._websocket(sock, req, peer)
            elif req.path == "/" and req.method in ("GET", "HEAD"):
                body = f"trisocks {__version__} is running\n"
                await _reply(sock, response(200, "" if req.method == "HEAD" else body))
            elif req.method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                await _reply(sock, error_response(405, "method not allowed"))
            else:
                await _reply(sock, error_response(404, "not found"))
        except OSError as exc:
            log.debug("connection from %s failed: %s", peer, exc)
        finally:
            close_socket(sock)

    async def _websocket(self, sock, req: Request, peer: str) -> None:
        try:
            answer, peer_window = accept_websocket(req, window=self.config.window)
        except HandshakeError as exc:
            await _reply(sock, error_response(exc.status, exc.message))
            return
        transport = SocketTransport(sock, peer)
        await sock_sendall(sock, answer)
        decoder = Decoder(expect_masked=True, max_message=self.config.max_message)
        decoder.feed_bytes(req.leftover)

        info = None
        reverse = False
        if "token" in req.query:
            info = self.tokens.get_by_digest(req.query["token"]) if len(req.query["token"]) == 64 else None
            reverse = req.query.get("reverse", "false").lower() in ("true", "1")
            _parse_instance(req.query.get("instance", ""))
            how = "URL"
        else:
            try:
                first = await read_message(transport, decoder, timeout=self.config.auth_timeout,
                                           client_side=False)
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
            reverse = msg.reverse
            how = "Auth message"
        if info is None or info.kind != FORWARD or reverse:
            log.warning("authentication failed from %s (%s)", peer, how)
            await self._refuse(transport, "invalid token")
            return

        session = Session(
            transport, decoder, client_side=False, handler=self.forward,
            name=f"client {peer}", peer_window=peer_window, recv_window=self.config.window,
            ping_interval=self.config.ping_interval, idle_timeout=self.config.idle_timeout,
        )
        session.send(protocol.AuthResponse(True))
        log.info("forward client %s authenticated (token %s%s)", peer, redact(info.token),
                 ", trisocks flow control" if peer_window else "")
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.info("forward client %s gone: %s", peer, session.close_reason or "closed")

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


class ForwardHandler(Handler):
    """Forward mode: the client asks, we dial the target and relay."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        if msg.protocol != protocol.TCP:
            session.send(protocol.ConnectResponse(False, msg.channel, "udp not supported"))
            return
        ch = session.accept_channel(msg.channel, f"{msg.address}:{msg.port}")
        if ch is not None:
            session.nursery.start_soon(self._dial_and_relay, session, ch, msg)

    async def _dial_and_relay(self, session: Session, ch, msg: protocol.Connect) -> None:
        try:
            try:
                sock = await dial_tcp(msg.address, msg.port, timeout=self.server.config.connect_timeout)
            except (OSError, trio.TooSlowError) as exc:
                code = socks5.reply_for_exception(exc)
                log.debug("%s: connect to %s failed: %s", session, ch.target, exc or "timeout")
                session.send_if_open(protocol.ConnectResponse(False, ch.id, socks5.error_text(code)))
                return
            if ch.state != OPENING:  # the peer gave up while we were dialing
                close_socket(sock)
                return
            session.send(protocol.ConnectResponse(True, ch.id))
            ch.attach(sock)
            await ch.run()
        except trio.ClosedResourceError:
            pass
        finally:
            ch.finish()


def _parse_instance(text: str) -> bytes:
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        return uuid.uuid4().bytes


async def _reply(sock, data: bytes) -> None:
    try:
        await sock_sendall(sock, data)
    except OSError:
        pass


def _fmt(addr) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
