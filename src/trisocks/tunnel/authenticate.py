"""Authentication: a WebSocket upgrade on /socket until its session runs.

A client authenticates with its first message, an Auth read with a small decoder (a few
KiB, a few pings, one deadline), or with ``?token=<sha256 hex>`` in the URL. Its token and
reverse flag choose the role (forward, provider, connector); a user's account and the
token's sessions cap may still refuse it. The open sessions and the channels of each
token's sessions are counted here.
"""

from __future__ import annotations

import logging
import math
import uuid

import trio

from ..net.handshake import (
    FLOW_HEADER,
    HandshakeError,
    Request,
    accept_websocket,
    error_response,
    offers_eof,
    response,
)
from ..net.session import RECV_BUFFER, ChannelGroup, Handler, Session
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
from .egress import Egress
from .front_door import Ticket, reply
from .nodes import MAX_INCOMING, NodeBridges, is_bridge_token
from .reverse import ConnectorSide, ProviderSide, ReverseService
from .server_config import ServerConfig
from .throttle import FailureLimiter
from .tokens import BRIDGE_PREFIX, CONNECTOR, FORWARD, REVERSE, TokenInfo, TokenTable, redact

log = logging.getLogger("trisocks.server")

# Channels all sessions of one token may have open at once: with sessions per token capped too,
# one token (or user key) cannot take every file descriptor of the server.
MAX_CHANNELS_PER_TOKEN = 10000

# Before authentication a client may send one small Auth message (at most 275 bytes) and a
# few pings, nothing else, within one deadline; it holds a small buffer meanwhile.
PREAUTH_MAX_MESSAGE = 4 << 10
PREAUTH_BUFFER = 4 << 10
PREAUTH_CONTROL_FRAMES = 16


class Authenticator:
    """Upgrades on /socket (``websocket``) up to their sessions, and the open sessions
    (``sessions``: each one's TokenInfo) with their counts per token."""

    def __init__(self, config: ServerConfig, tokens: TokenTable, services: dict[str, ReverseService],
                 egress: Egress, events) -> None:
        self.config = config
        self.tokens = tokens
        self.services = services  # the server's, by reverse token
        self.egress = egress
        self.events = events
        # wrong tokens per address: after 10 in a minute, upgrades get 429 for a while
        self.limiter = FailureLimiter()
        self.sessions: dict[Session, TokenInfo] = {}
        self._token_sessions: dict[str, int] = {}  # token -> sessions open
        self._channel_groups: dict[str, ChannelGroup] = {}
        self.nodes: NodeBridges | None = None  # the server's bridges to other nodes (nodes.py)

    async def websocket(self, transport, req: Request, peer: str, ip: str, ticket: Ticket,
                         front: trio.CancelScope) -> None:
        wait = self.limiter.retry_after(ip)
        if wait:
            # too many wrong tokens from this address lately: no upgrade, no token check
            await reply(transport, response(429, "too many failed authentications\n",
                                             headers=[("Retry-After", str(wait))]))
            return
        try:
            answer, peer_window = accept_websocket(req, window=self.config.window)
        except HandshakeError as exc:
            await reply(transport, error_response(exc.status, exc.message))
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
            if info is None and not reverse and is_bridge_token(msg.token) and self.nodes is not None:
                rev = self.nodes.recognise(msg.token, self.services)
                if rev is not None:  # another node of the cluster, for this node's providers
                    await self._serve_bridge(transport, req, rest, peer_window, self.services[rev],
                                             peer, ip, ticket, front)
                    return
                # anything else is a wrong token: refused and counted like one below

        role = _role(info, reverse)
        if role is None:
            log.warning("authentication failed from %s (%s)", peer, how)
            self.events("auth_failure", peer=peer, how=how)
            self.limiter.failed(ip)
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
        session.peer = peer
        admission = getattr(info.account, "admission", None)
        if admission is not None:  # the account's client and device limits (policy.admission)
            refused, evicted = admission.join(ip, session)
            if refused:
                log.warning("client %s refused: %s", peer, refused)
                self.events("auth_failure", peer=peer, how=how, reason=refused, account=info.account)
                self.events("policy_refused", peer=peer, account=info.account, target="session",
                            reason=refused)
                await self._refuse(transport, refused)
                return
            for old in evicted:
                log.info("%s replaced by a newer device (%s)", old, peer)
                self.events("policy_refused", peer=old.peer, account=info.account,
                            target="session", reason="replaced by a newer device")
                old.close(1008, "replaced by a newer device")
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
            if admission is not None:
                admission.leave(ip, session)

    async def _serve_bridge(self, transport, req: Request, rest: bytes, peer_window: int | None,
                            service: ReverseService, peer: str, ip: str, ticket: Ticket,
                            front: trio.CancelScope) -> None:
        """A bridge session from another node (nodes.py): a connector of ``service``'s token
        whose channels go to this node's providers only. Internal: no account, no per-token
        caps or channel group, no events, not among ``sessions`` (the API's clients)."""
        nodes = self.nodes
        if service.stopped:
            await self._refuse(transport, "invalid token")
            return
        if len(nodes.incoming) >= MAX_INCOMING:
            log.warning("bridge from %s refused: too many bridge sessions", peer)
            await self._refuse(transport, "too many sessions for this token")
            return
        decoder = Decoder(expect_masked=True, max_message=self.config.max_message,
                          buffer_size=RECV_BUFFER)
        decoder.feed_bytes(rest)
        info = TokenInfo(BRIDGE_PREFIX, CONNECTOR, reverse_token=service.info.token)
        session = Session(
            transport, decoder, client_side=False,
            handler=ConnectorSide(service, info, bridged=True),
            name=f"bridge from {peer}", peer_window=peer_window,
            half_close=offers_eof(req.headers.get(FLOW_HEADER)), recv_window=self.config.window,
            ping_interval=self.config.ping_interval, idle_timeout=self.config.idle_timeout,
        )
        session.peer = peer
        ticket.leave()
        front.deadline = math.inf
        session.send(protocol.AuthResponse(True))
        log.info("%s authenticated (node bridge for reverse token %s)", session,
                 redact(service.info.token))
        self.limiter.succeeded(ip)
        nodes.incoming.add(session)
        try:
            await service.serve_bridge(session)
        finally:
            nodes.incoming.discard(session)
            log.info("%s gone: %s", session, session.close_reason or "closed")

    async def _run_session(self, session: Session, service: ReverseService | None, role: str,
                           instance: bytes, info: TokenInfo, peer: str, ip: str) -> None:
        session.send(protocol.AuthResponse(True))
        log.info("%s authenticated (token %s%s)", session, redact(info.token),
                 ", trisocks flow control" if session.peer_window else "")
        self.sessions[session] = info
        self.events("auth_success", role=role, token=info.token, account=info.account, peer=peer)
        self.limiter.succeeded(ip)
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


def _parse_instance(text: str) -> bytes:
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        return uuid.uuid4().bytes
