"""The management plane: users, tokens, events, the store and the API, in the server's process.

:class:`Management` wires small services over one :class:`~.state.PlaneState`:
``user_api`` (users.py), ``token_api`` (tokens.py, LinkSocks-compatible), ``observer``
(observe.py: server events, stats, health, metrics), ``subscriptions`` (subscribe.py),
``webhooks`` (webhooks.py: events posted to URLs),
``access`` (access.py: who may call the API) and ``loops`` (loops.py: restore, flush,
enforce). It talks to the tunnel server only through the :class:`~.tunnel.Tunnel`
Protocol. ``run()`` restores what the store kept, then runs the tunnel server, the ASGI
app's lifespan, the counter flusher and the enforcer in one nursery.
"""

from __future__ import annotations

import logging
import signal

import trio

from ..net.notify import Notifier
from ..tunnel.server import DEFAULT_GRACE, STOP_SIGNALS, stop_gracefully
from ..wire.names import hostport
from . import schemas as s
from .access import Access
from .cluster import Cluster
from .keys import ApiKey, FailureLimiter
from .loops import Loops
from .model import ManagedTokenTable, SocksUsers
from .observe import Observer
from .policies import PolicyService
from .state import PlaneState
from .store import Store, StoreInUse
from .subscribe import Subscriptions
from .tokens import TokenService
from .usage import UsageService
from .users import UserService, new_user_key
from .webhooks import WebhookService

__all__ = ["Management", "new_user_key"]

log = logging.getLogger("trisocks.management")


class Management:
    def __init__(self, store: Store, *, api_key: ApiKey | None = None, allow_remote: bool = False,
                 api_bind: tuple[str, int] | None = None, public_url: str = "",
                 flush_interval: float = 1.0, limiter: FailureLimiter | None = None,
                 handle_signals: bool = False, metrics_per_owner: int = 0) -> None:
        self.api_bind = api_bind
        self.handle_signals = handle_signals
        # the token table reports to the observer, which needs the state: hence the lambdas
        tokens = ManagedTokenTable(on_added=lambda info: self.observer.token_added(info),
                                   on_removed=lambda info: self.observer.token_removed(info))
        self.state = state = PlaneState(store, tokens)
        state.metrics_per_owner = metrics_per_owner
        self.webhooks = WebhookService(state)
        self.loops = Loops(state, flush_interval=flush_interval, webhooks=self.webhooks)
        if store.shared:  # other processes write the store too: follow them (cluster.py)
            state.cluster = Cluster(state, loops=self.loops, webhooks=self.webhooks,
                                    node_url=lambda: getattr(state.server, "node_url", "") or "")
        self.observer = Observer(state, self.loops.flush)
        self.access = Access(state.events, api_key=api_key, allow_remote=allow_remote, limiter=limiter)
        self.user_api = UserService(state)
        self.token_api = TokenService(state)
        self.policy_api = PolicyService(state)
        self.usage_api = UsageService(state)
        self.subscriptions = Subscriptions(state, self.access, public_url=public_url,
                                           api_bound=api_bind is not None)
        self.api_port: int | None = None  # with api_bind: the port the API listens on
        self._asgi = None
        self._app = None
        self._config = None  # the server's configuration, as create_server() was given it
        # with handle_signals: seconds open channels get after SIGTERM/SIGINT (the CLI's --grace)
        self.grace = DEFAULT_GRACE
        # () -> awaitable dict: re-reads --config (cli/reload.py); None without a file
        self.reloader = None
        self.notifier = Notifier.from_environment() if handle_signals else Notifier()
        self._api_scope = trio.CancelScope()
        self._outcome = ""  # how the stop went, for the last log line

    # -- what callers and tests read ------------------------------------------------------------
    store = property(lambda self: self.state.store)
    tokens = property(lambda self: self.state.tokens)
    users = property(lambda self: self.state.users)
    events = property(lambda self: self.state.events)
    server = property(lambda self: self.state.server)
    api_key = property(lambda self: self.access.api_key)
    limiter = property(lambda self: self.access.limiter)

    @property
    def resolve_client(self):
        return self.access.resolve_client

    @resolve_client.setter
    def resolve_client(self, hook) -> None:
        self.access.resolve_client = hook

    async def _flush(self) -> None:
        await self.loops.flush()

    # -- what the routes call: one method per operation, the services do the work ------------------
    def token_status(self) -> s.StatusResponse:
        return self.token_api.status()

    async def add_token(self, req: s.TokenRequest) -> s.TokenResult:
        return await self.token_api.add(req)

    async def remove_token(self, token: str) -> s.TokenResult:
        return await self.token_api.remove(token)

    def server_status(self) -> s.ServerStatus:
        return self.user_api.server_status()

    def list_users(self, q: s.UsersQuery | None = None) -> s.UserList:
        return self.user_api.list(q)

    async def remove_users(self, req: s.UsersRemove) -> s.Removed:
        return await self.user_api.remove(req)

    def get_user(self, key: str) -> s.User:
        return self.user_api.get(key)

    async def create_user(self, req: s.UserCreate) -> s.User:
        return await self.user_api.create(req)

    async def delete_user(self, key: str) -> s.Deleted:
        return await self.user_api.delete(key)

    async def update_user(self, key: str, **changes) -> s.User:
        return await self.user_api.update(key, **changes)

    async def reset_user(self, key: str) -> s.User:
        return await self.user_api.reset(key)

    async def rotate_user(self, key: str) -> s.User:
        return await self.user_api.rotate(key)

    def token_detail(self, token: str) -> s.TokenDetail:
        return self.policy_api.get_token(token)

    async def patch_token(self, token: str, change: s.TokenPatch) -> s.TokenDetail:
        return await self.policy_api.patch_token(token, change)

    def subscription(self, key: str, client: str, host: str) -> s.Subscription:
        return self.subscriptions.get(key, client, host)

    async def server_usage(self, q: s.UsageQuery) -> s.Usage:
        return await self.usage_api.of_server(q)

    async def user_usage(self, key: str, q: s.UsageQuery) -> s.Usage:
        return await self.usage_api.of_user(key, q)

    async def reload(self) -> s.ReloadResult:
        """Re-read the configuration file (SIGHUP, POST /api/reload)."""
        if self.reloader is None:
            return s.ReloadResult(success=False, applied=[], restart_needed=[], error=(
                "no configuration file to reload: start the server with --config FILE"))
        self.notifier.status("reloading")
        try:
            return s.ReloadResult(**await self.reloader())
        except Exception as exc:  # a bug in the reload must not stop the server
            log.exception("reload failed")
            self.state.events.add("config_rejected", detail=f"internal error: {exc}")
            return s.ReloadResult(success=False, applied=[], restart_needed=[],
                                  error=f"internal error: {exc}")
        finally:
            self.notifier.status("serving")

    def subscription_headers(self, key: str) -> dict[str, str]:
        return self.subscriptions.headers(key)

    def stats(self) -> s.Stats:
        return self.observer.stats()

    def query_events(self, q: s.EventsQuery) -> s.Events:
        return self.observer.events(q)

    async def health(self) -> s.Health:
        return await self.observer.health()

    def metrics_text(self) -> str:
        return self.observer.metrics_text()

    def cluster(self) -> s.Cluster:
        return self.observer.cluster()

    # -- wiring ------------------------------------------------------------------------------------
    @property
    def app(self):
        if self._app is None:
            from .app import create_app

            self._app = create_app(self)
        return self._app

    def create_server(self, config):
        """The tunnel server, with this plane's token table and hooks."""
        from ..tunnel.server import Server

        self._config = config
        http_app = None
        if self.api_key is not None and self.api_bind is None:
            from .serving import AsgiHandoff

            self._asgi = AsgiHandoff(self.app, tls=bool(config.tls_cert))
            http_app = self._asgi
        server = Server(config, self.state.tokens, events=self.observer.on_server_event,
                        http_app=http_app)
        # users' name + key open every reverse token's SOCKS5 port, next to its own pair
        users_by_name = self.state.users_by_name
        server.socks_credentials_hook = lambda own: SocksUsers(users_by_name, own)
        self.state.server = server
        # a cluster: SOCKS5 clients and connectors here reach providers on the other nodes
        server.peers = self.state.cluster
        server.cluster_secret = self.state.cluster_secret
        return server

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Restore, then serve until cancelled; a last flush on the way out.

        With ``handle_signals`` (the plane is the process): READY=1 to the service manager
        once everything is up (see :mod:`trisocks.net.notify`); SIGTERM and SIGINT stop
        gracefully (every listener closes, open channels get ``grace`` seconds, see
        :func:`~trisocks.tunnel.server.stop_gracefully`), SIGHUP at once."""
        if not self.handle_signals:
            await self._run(None, task_status)
            return
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
            await self._run(signals, task_status)
        if self._outcome:
            saved = "counters saved" if self.state.store_error is None else "the last save failed"
            log.info("stopped: %s; %s", self._outcome, saved)

    async def _run(self, signals, task_status) -> None:
        st = self.state
        self._api_scope = trio.CancelScope()
        assert st.server is not None, "create_server() first"
        try:
            snapshot = await st.store.open()
        except StoreInUse as exc:
            if not self.handle_signals:
                raise
            # this plane is the process (the command line): a configuration error, which
            # exits 2 before anything starts, in one line
            log.error("%s", exc)
            raise SystemExit(2) from None
        try:
            await self.loops.restore(snapshot)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.webhooks.run)
                if signals is not None:
                    nursery.start_soon(self._stop_on_signals, signals, nursery.cancel_scope)
                    self.notifier.start_watchdog(nursery)
                if self._asgi is not None:
                    await nursery.start(self._asgi.run_lifespan)
                port = await nursery.start(self._serve_tunnel)
                await self.loops.save_moved_ports()
                nursery.start_soon(self.loops.flush_loop)
                nursery.start_soon(self.loops.enforce_loop)
                if st.cluster is not None:
                    await nursery.start(st.cluster.run)
                if self.api_key is not None and self.api_bind is not None:
                    await self._serve_api(nursery)
                log.info("management plane on: %s%s", st.store.description, self._api_where())
                self.webhooks.server_started(f"listening on {hostport(st.server.host, port)}")
                if signals is not None:
                    self.notifier.ready(f"listening on {hostport(st.server.host, port)}"
                                        f"{self._api_where()}")
                task_status.started(port)
        finally:
            with trio.CancelScope(shield=True):  # posted while the flush below saves it
                self.webhooks.server_stopping(self._outcome or "stopped")
                await self.webhooks.drain()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.loops.flush()
                await st.store.close()

    async def _serve_api(self, nursery: trio.Nursery) -> None:
        """--api-bind: the app on a listener of its own."""
        from .serving import serve_bound

        server = self.state.server
        self.api_port = await nursery.start(self._api_listener, serve_bound)
        # the tunnel must not lead to the API's own listener either
        server.add_listener(self.api_bind[0], self.api_port)
        if self.access.resolve_client is None and server.trusts_proxies:
            # behind a --trusted-proxy: the client as the front door would name it (on the
            # tunnel port the front door has done this already, see serving.py)
            self.access.resolve_client = server.client_address

    def _api_where(self) -> str:
        api_key = self.api_key
        if api_key is None:
            return "; API off (no -k/--api-key)"
        where = (f"http://{self.api_bind[0]}:{self.api_port}" if self.api_bind
                 else "the WebSocket port")
        remote = "any address" if self.access.allow_remote else "loopback clients only"
        return f"; API on {where} ({remote}; key {api_key.scheme})"

    async def _serve_tunnel(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        st = self.state
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(st.server.serve)
                st.listening = True
                task_status.started(port)
        finally:
            st.listening = False

    async def _api_listener(self, serve_bound, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._api_scope:  # cancelled when stopping begins: the listener closes
            await serve_bound(self.app, self.api_bind, self._config, task_status=task_status)

    async def _stop_on_signals(self, signals, scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:  # re-read --config; the tunnels go on
                if self.reloader is None:
                    log.warning("SIGHUP: no --config file to reload; ignored")
                else:
                    await self.reload()
                continue
            self.webhooks.server_stopping(f"on {signal.Signals(signum).name}")
            self.state.listening = False  # /healthz on a kept-alive connection: not serving
            self._api_scope.cancel()
            self._outcome = await stop_gracefully(
                self.state.server, signals, signum, scope, grace=self.grace,
                notifier=self.notifier, note=" (counters are being saved)")
            return
