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

This module wires the parts and keeps the tokens: :mod:`.front_door` (accepting, admission,
routing), :mod:`.authenticate` (Auth, roles, sessions per token), :mod:`.reverse` (reverse
services, provider and connector sessions) and :mod:`.server_config` (settings, TLS).
"""

from __future__ import annotations

import logging
import signal
import time

import trio

from .._version import __version__
from ..net.notify import Notifier
from ..net.session import Session
from ..net.transport import accept_loop, bind_tcp, close_socket, listen_on
from ..wire.names import hostport
from .authenticate import MAX_CHANNELS_PER_TOKEN, Authenticator
from .egress import Egress
from .front_door import FrontDoor, networks
from .nodes import ClusterMember, NodeBridges
from .reverse import ReverseService
from .server_config import MAX_SESSIONS_PER_TOKEN, ServerConfig, tls_server_context
from .socks_server import Credentials
from .throttle import FailureLimiter
from .tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable, generate

log = logging.getLogger("trisocks.server")

DEFAULT_GRACE = 5.0  # seconds open channels get to finish after SIGTERM/SIGINT (--grace)
DRAIN_POLL = 0.05  # how often a stopping server looks whether its channels are done
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# the limits too: docs/security.md names them as server.MAX_...
__all__ = ["MAX_CHANNELS_PER_TOKEN", "MAX_SESSIONS_PER_TOKEN", "Server", "ServerConfig", "tls_server_context"]


def _no_events(kind: str, **fields) -> None:
    pass


class Server(ClusterMember):
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
    :meth:`add_listener`, :meth:`check_socks_port`, :attr:`destination_rules`,
    :attr:`refused_destinations`, and for scale-out :attr:`peers`, :attr:`cluster_secret`,
    :attr:`node_url` and :meth:`provider_counts` (see :mod:`.nodes`).
    """

    def __init__(self, config: ServerConfig, tokens: TokenTable, *, events=None,
                 http_app=None) -> None:
        self.config = config
        self.tokens = tokens
        self.started_at = time.monotonic()
        self.port = config.ws_port
        self.services: dict[str, ReverseService] = {}
        self.egress = Egress(dialer=config.dialer, connect_timeout=config.connect_timeout)
        # the tunnel must not lead back into this process (its API above all)
        self.egress.own_listeners = self._own_listeners
        self.egress.rules = config.rules
        self.egress.events = lambda kind, **fields: self.auth.events(kind, **fields)
        # (host, port) of other listeners of this process (the management API's --api-bind)
        self.extra_listeners: list[tuple[str, int]] = []
        self.trusted_proxies = networks(config.trusted_proxies)  # a bad one is named before TLS
        self.tls = tls_server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.auth = Authenticator(config, tokens, self.services, self.egress, events or _no_events)
        self.sessions: dict[Session, TokenInfo] = self.auth.sessions  # the same dict, kept by auth
        self.front = FrontDoor(config, self.tls, self.trusted_proxies, websocket=self.auth.websocket,
                               http_app=http_app)
        self.admission = self.front.admission
        # scale-out: bridges to the providers of other nodes, and theirs to ours (nodes.py)
        self.nodes = NodeBridges(config, tls=self.tls is not None)
        self.auth.nodes = self.nodes
        self._nursery: trio.Nursery | None = None
        self._lsock = None
        self._socks_credentials_hook = None
        self.ready = trio.Event()
        self.stopping = False  # stop_accepting() was called: no new connections

    # the hooks and the failure limiter live with the parts that use them
    @property
    def events(self):
        return self.auth.events

    @events.setter
    def events(self, events) -> None:
        self.auth.events = events

    @property
    def http_app(self):
        return self.front.http_app

    @http_app.setter
    def http_app(self, app) -> None:
        self.front.http_app = app

    @property
    def auth_limiter(self) -> FailureLimiter:
        """Wrong tokens per address: after 10 in a minute, upgrades get 429 for a while."""
        return self.auth.limiter

    @auth_limiter.setter
    def auth_limiter(self, limiter: FailureLimiter) -> None:
        self.auth.limiter = limiter

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

    def client_address(self, peer_ip: str, headers: dict[str, str]) -> str:
        """The client's address: the TCP peer's, or behind a trusted proxy the rightmost
        X-Forwarded-For entry that is not a trusted proxy. ``headers`` has lower-case names."""
        return self.front.client_address(peer_ip, headers)

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
            raise OSError(exc.errno, exc.strerror or str(exc), hostport(host, port)) from None
        sock.close()


    @property
    def destination_rules(self):
        """The server's --allow/--deny rules (a RuleSet), or None; a change (a reload of the
        configuration) applies to the next connection."""
        return self.egress.rules

    @destination_rules.setter
    def destination_rules(self, rules) -> None:
        self.egress.rules = rules

    @property
    def refused_destinations(self) -> int:
        return self.egress.refused

    def _own_listeners(self) -> list[tuple[str, int]]:
        """Where this process listens: its WebSocket port (and node listener), every reverse
        token's SOCKS5 port, and whatever the management plane added (``extra_listeners``)."""
        own = [(self.config.ws_host, self.port)]
        own += self.nodes.listeners()
        own += [(s.socks.host, s.socks_port) for s in list(self.services.values()) if s.socks_port]
        return own + list(self.extra_listeners)


    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; after :meth:`stop_accepting` the sessions go on (see
        :func:`serve_until_signal` for the whole graceful stop)."""
        lsock = self._lsock = listen_on(self.config.ws_host, self.config.ws_port, "the server")
        self.started_at = time.monotonic()
        try:
            self.port = lsock.getsockname()[1]
            self.nodes.listen()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.nodes.bind(nursery)
                for info in self.tokens.of_kind(REVERSE):
                    await self._start_service(info)
                log.info("trisocks %s listening on %s:%d (%s, WebSocket path /socket)", __version__,
                         self.config.ws_host, self.port, "TLS" if self.tls else "plain HTTP")
                self.ready.set()
                task_status.started(self.port)
                if not self.stopping:
                    self.nodes.serve_listener(nursery, self.front.handle)
                    await accept_loop(lsock, self.front.handle, nursery, log, "WebSocket connection")
        finally:
            self.nodes.bind(None)
            close_socket(lsock)
            self.nodes.close_listener()

    # -- stopping ---------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """The first step of a graceful stop: close every listener (the WebSocket port and
        each reverse token's SOCKS5 port); open sessions and their channels go on."""
        self.stopping = True
        close_socket(self._lsock)
        self.nodes.close_listener()
        for service in list(self.services.values()):
            service.socks.close()

    def _all_sessions(self) -> list[Session]:
        """Every session: the clients' (``sessions``) and the bridges to and from other nodes."""
        return list(self.sessions) + self.nodes.sessions()

    def open_channels(self) -> int:
        """Channels open in all sessions (forward, provider, connector and node bridges)."""
        return sum(len(session.channels) for session in self._all_sessions())

    def busy(self) -> bool:
        """Channels still open, or bytes still queued for a peer."""
        return any(session.channels or session.outbox.queued_bytes
                   for session in self._all_sessions())

    async def drain(self, grace: float) -> bool:
        """Wait until no channel is open and every session's outbox is empty, for at most
        ``grace`` seconds; True if that happened."""
        with trio.move_on_after(grace):
            while self.busy():
                await trio.sleep(DRAIN_POLL)  # the stop path only: never on the data path
        return not self.busy()


    # -- tokens --------------------------------------------------------------------------
    async def add_reverse_token(self, token: str | None = None, *, port: int | None = None,
                                username: str = "", password: str = "",
                                allow_manage_connector: bool = False) -> TokenInfo:
        """Add a reverse token at run time; its SOCKS5 port is bound at once and reported."""
        info = self.tokens.add(TokenInfo(token or generate(), REVERSE, port=port, username=username,
                                         password=password,
                                         allow_manage_connector=allow_manage_connector))
        if self._nursery is not None and not self.stopping:
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
        port = await self._nursery.start(self._run_service, service)
        if port is not None:  # None: autonomy mode, no port (info.port keeps what was asked)
            info.port = port

    async def _run_service(self, service: ReverseService, *, task_status=trio.TASK_STATUS_IGNORED
                           ) -> None:
        try:
            await service.run(task_status=task_status)
        except OSError:
            if not self.stopping:
                raise
            # its port was closed for the stop before a provider came to open it


# -- the server as a process: readiness and the graceful stop ------------------------------------

async def serve_until_signal(server: Server, *, grace: float = DEFAULT_GRACE,
                             notifier: Notifier | None = None) -> None:
    """``trisocks server`` without the management plane: serve, tell the service manager
    when every listener accepts (``READY=1``, see :mod:`trisocks.net.notify`), and stop
    gracefully on SIGTERM or SIGINT (:func:`stop_gracefully`). Returns when stopped."""
    notifier = notifier or Notifier.from_environment()
    outcome = "cancelled"
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            notifier.start_watchdog(nursery)
            await nursery.start(server.serve)
            notifier.ready(f"listening on {hostport(server.host, server.port)}")
            async for signum in signals:
                if signum == signal.SIGHUP:  # a reload: what could change lives in the plane
                    log.warning("SIGHUP: nothing to reload without the management plane "
                                "(-k or --db, and --config); ignored")
                    continue
                outcome = await stop_gracefully(server, signals, signum, nursery.cancel_scope,
                                                grace=grace, notifier=notifier)
                break
    log.info("stopped: %s", outcome)


async def stop_gracefully(server: Server, signals, signum: int, scope: trio.CancelScope, *,
                          grace: float, notifier: Notifier, note: str = "") -> str:
    """After the first stop signal ``signum``: no new connections (every listener closed),
    open channels get up to ``grace`` seconds to finish, then ``scope`` is cancelled, which
    closes the sessions (1001 going away). A second signal from ``signals`` cuts the grace
    period short. Returns how it went, for the last log line."""
    name = signal.Signals(signum).name
    sessions = len(server.sessions)
    server.stop_accepting()
    log.info("%s: stopping%s: no new connections, %d session%s get%s up to %g s to finish", name,
             note, sessions, "" if sessions == 1 else "s", "s" if sessions == 1 else "", grace)
    notifier.stopping(f"stopping: {server.open_channels()} channels get up to {grace:g} s to finish")
    started = trio.current_time()
    idle = cut = False
    async with trio.open_nursery() as nursery:
        async def second_signal() -> None:
            nonlocal cut
            async for again in signals:
                cut = True
                log.info("%s during the grace period: stopping at once", signal.Signals(again).name)
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(second_signal)
        idle = await server.drain(grace)
        nursery.cancel_scope.cancel()
    left = server.open_channels()
    scope.cancel()
    if idle:
        return f"every channel finished within {trio.current_time() - started:.1f} s"
    why = "on a second signal" if cut else f"after the grace period of {grace:g} s"
    return f"{left} channel{' still open was' if left == 1 else 's still open were'} closed {why}"
