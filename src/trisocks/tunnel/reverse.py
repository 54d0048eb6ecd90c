"""Reverse mode on the server: one :class:`ReverseService` per reverse token (its SOCKS5
port, its providers, the connectors that reach them), and the handlers of provider and
connector sessions. A provider in autonomy mode may add and remove connector tokens,
rate limited (every ADD counts: success against refusal is what a name guesser learns from).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Protocol

import trio

from ..net.session import Handler, Session
from ..wire import protocol
from .bridge import Bridge
from .ingress import Ingress
from .pool import SessionPool
from .server_config import ServerConfig
from .socks_server import Credentials, SocksServer
from .throttle import TokenBucket
from .tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable, redact

log = logging.getLogger("trisocks.server")

# Connector ADD in autonomy mode, per provider session: a burst, then a slow rate.
CONNECTOR_ADD_BURST = 10
CONNECTOR_ADD_RATE = 1.0  # per second
TOKEN_TAKEN = "token already exists"  # the same whatever kind of token holds the name


class ReverseHost(Protocol):
    """What the reverse side uses of the server that owns it."""

    config: ServerConfig
    tokens: TokenTable

    def socks_credentials(self, own: Credentials | None) -> object: ...

    def add_connector_token(self, token: str | None, reverse_token: str,
                            owner: bytes = b"") -> TokenInfo: ...

    def remove_token(self, token: str) -> TokenInfo | None: ...


class ReverseService:
    """One reverse token: its providers, its SOCKS5 port, and the connectors that reach them."""

    def __init__(self, server: ReverseHost, info: TokenInfo) -> None:
        cfg = server.config
        self.server = server
        self.info = info
        self.pool = SessionPool(f"providers of {redact(info.token)}")
        self.by_instance: dict[bytes, SessionPool] = {}  # autonomy: each provider's own pool
        self.connectors: dict[Session, TokenInfo] = {}  # connector sessions and their tokens
        self.instances: dict[Session, bytes] = {}  # provider sessions and their instance ids
        self.bridges: set[Session] = set()  # bridge sessions from other nodes (nodes.py)
        self.ingress = Ingress(self.pool, wait_timeout=cfg.provider_wait,
                               connect_timeout=cfg.provider_answer, fast_open=cfg.fast_open,
                               name=f"SOCKS5 of {redact(info.token)}")
        self.ingress.events = lambda kind, **fields: server.events(kind, **fields)
        nodes = getattr(server, "nodes", None)
        if nodes is not None:  # a local provider first (one call, as before), else another node's
            self.ingress.wait_carrier = partial(nodes.wait_pick, self.pool, info.token)
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
        for session in list(self.pool) + list(self.connectors) + list(self.bridges):
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

    async def wait_carrier(self, timeout: float, pool: SessionPool | None = None):
        """A session to carry a new channel of this token: a provider of ``pool`` (default:
        all of the token's), or, when this node has none and other nodes of the cluster do,
        a bridge to one of them (:mod:`.nodes`); None when nothing appears within ``timeout``."""
        pool = self.pool if pool is None else pool
        nodes = getattr(self.server, "nodes", None)
        if nodes is None:
            return await pool.wait_pick(timeout)
        return await nodes.wait_pick(pool, self.info.token, timeout)

    async def serve_bridge(self, session: Session) -> None:
        """A bridge session from another node: a connector of this token for that node's
        clients, whose channels go to providers of this node only. Not one of the token's
        connectors (no Partners, not counted)."""
        self.bridges.add(session)
        try:
            await session.run()
        finally:
            self.bridges.discard(session)

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
    """A connector's session: its channels are relayed to a provider. A bridge session from
    another node (``bridged``) reaches this node's providers only: never bridged again."""

    def __init__(self, service: ReverseService, info: TokenInfo, *, bridged: bool = False) -> None:
        self.service = service
        self.info = info
        self.bridged = bridged

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
        service = self.service
        pool = service.pool_for(self.info)
        wait = service.server.config.provider_wait
        if self.bridged or self.info.owner:
            # a bridged channel stays here (no loops); an autonomy token reaches its own
            # creator only, which the other nodes cannot tell apart
            provider = await pool.wait_pick(wait)
        else:
            provider = await service.wait_carrier(wait, pool)
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
