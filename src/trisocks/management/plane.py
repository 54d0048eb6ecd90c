"""The management plane: tokens, users, counters, events and the API, in the server's process.

:class:`Management` owns the server's token table (every token gets a meter), the users,
the event log and the store. ``run()`` restores what the store kept, then runs the tunnel
server, the ASGI app's lifespan, the counter flusher and the enforcer in one nursery.

Every change made through the API is serialised by one lock and committed to the store
before it takes effect and before the API answers; the flusher takes the same lock, so a
counter flush never overwrites a reset or a rotation it raced with.

Enforcement: the data path refuses new channels (``refuse_reason``) and cuts a channel
whose charge crosses the limit. Everything else that must close live traffic is done here:
an API change (disable, limit lowered, expiry in the past, rotate, delete) closes the
user's channels, and sessions where the key no longer works, at once; the enforcer wakes
at every expiry and at least twice a second to close what a passing expiry or an idle
channel of an over-quota user left open.
"""

from __future__ import annotations

import logging
import re
import secrets
import signal
import time
from collections import Counter
from types import SimpleNamespace
from urllib.parse import urlsplit

import trio

from .._version import __version__
from ..net import guard
from ..net.transport import bind_tcp
from ..tunnel.socks_server import Credentials
from ..tunnel.tokens import CONNECTOR, FORWARD, RESERVED, REVERSE, TokenInfo, generate, redact
from . import schemas as s
from .app import ApiError
from .dates import rfc3339
from .events import EventLog
from .keys import ApiKey, FailureLimiter, LogBudget
from .model import (
    DISABLED,
    REASON_DISABLED,
    REASON_EXPIRED,
    REASON_LIMIT,
    ManagedTokenTable,
    Meter,
    SocksUsers,
    TokenMeter,
    UserAccount,
)
from .store import Counters, Snapshot, Store, StoreError, StoreInUse, TokenRecord, UserRecord

log = logging.getLogger("trisocks.management")

ENFORCE_INTERVAL = 0.5
DEFAULT_SOCKS_PORT = 9870
# a Host header fit for a URL: a name or IPv4 address, or a bracketed IPv6 one, and a port
_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def new_user_key() -> str:
    return generate(24)  # 32 characters, 192 bits


def _usable_host(host: str) -> str:
    """The Host header if it can go into a URL; else "" (the bound address is used)."""
    if not _HOST_HEADER.fullmatch(host):
        return ""
    try:
        port = urlsplit(f"//{host}").port  # a port over 65535 or a bad IPv6 address raise
    except ValueError:
        return ""
    return host if port != 0 else ""


class Management:
    def __init__(self, store: Store, *, api_key: ApiKey | None = None, allow_remote: bool = False,
                 api_bind: tuple[str, int] | None = None, public_url: str = "",
                 flush_interval: float = 1.0, limiter: FailureLimiter | None = None,
                 handle_signals: bool = False) -> None:
        self.store = store
        self.api_key = api_key
        self.allow_remote = allow_remote
        self.api_bind = api_bind
        self.public_url = public_url.rstrip("/")
        self.flush_interval = flush_interval
        self.limiter = limiter or FailureLimiter()
        self.handle_signals = handle_signals
        self.tokens = ManagedTokenTable(on_added=self._token_added, on_removed=self._token_removed)
        self.users: dict[str, UserAccount] = {}  # by key
        self.users_by_name: dict[str, UserAccount] = {}
        self.events = EventLog()
        self.lock = trio.Lock()
        self.server = None
        self.started_at = time.time()
        self.store_error: str | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.listening = False
        self.api_port: int | None = None  # with api_bind: the port the API listens on
        self._wake = trio.Event()
        self._moved: list[tuple[TokenInfo, int | None]] = []
        self._asgi = None
        self._app = None
        # (peer address, request headers) -> the caller's address; None: the peer itself.
        # Failed keys are counted and logged per its answer. On the tunnel port the front
        # door has resolved --trusted-proxy already (serving.py); run() sets it for --api-bind.
        self.resolve_client = None
        self._auth_log = LogBudget()

    # -- wiring --------------------------------------------------------------------------------
    @property
    def app(self):
        if self._app is None:
            from .app import create_app

            self._app = create_app(self)
        return self._app

    def create_server(self, config):
        """The tunnel server, with this plane's token table and hooks."""
        from ..tunnel.server import Server

        http_app = None
        if self.api_key is not None and self.api_bind is None:
            from .serving import AsgiHandoff

            self._asgi = AsgiHandoff(self.app, tls=bool(config.tls_cert))
            http_app = self._asgi
        self.server = Server(config, self.tokens, events=self.on_server_event, http_app=http_app)
        return self.server

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Restore, then serve until cancelled; a last flush on the way out."""
        assert self.server is not None, "create_server() first"
        try:
            snapshot = await self.store.open()
        except StoreInUse as exc:
            if not self.handle_signals:
                raise
            # this plane is the process (the command line): a configuration error, which
            # exits 2 before anything starts, in one line
            log.error("%s", exc)
            raise SystemExit(2) from None
        try:
            await self._restore(snapshot)
            async with trio.open_nursery() as nursery:
                if self.handle_signals:
                    nursery.start_soon(self._stop_on_signals, nursery.cancel_scope)
                if self._asgi is not None:
                    await nursery.start(self._asgi.run_lifespan)
                port = await nursery.start(self._serve_tunnel)
                self._install_socks_users()
                for info, stored in self._moved:  # a restored reverse token on another port now
                    if info.port != stored and self.tokens.get(info.token) is info:
                        await self.store.put_token(self._token_record(info))
                self._moved.clear()
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._enforce_loop)
                if self.api_key is not None and self.api_bind is not None:
                    from .serving import serve_bound

                    self.api_port = await nursery.start(
                        serve_bound, self.app, self.api_bind, self.server.config)
                    # the tunnel must not lead to the API's own listener either
                    self.server.extra_listeners.append((self.api_bind[0], self.api_port))
                    if self.resolve_client is None and self.server.trusted_proxies:
                        self.resolve_client = self._forwarded_client
                log.info("management plane on: %s%s", self.store.description,
                         self._api_where())
                task_status.started(port)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._flush()
                await self.store.close()

    def _forwarded_client(self, peer: str, headers) -> str:
        """--api-bind behind a --trusted-proxy: the client as the front door would name it
        (on the tunnel port the front door has done this already, see serving.py)."""
        return self.server._client_ip(peer, SimpleNamespace(headers=headers))

    def _api_where(self) -> str:
        if self.api_key is None:
            return "; API off (no -k/--api-key)"
        where = (f"http://{self.api_bind[0]}:{self.api_port}" if self.api_bind
                 else "the WebSocket port")
        remote = "any address" if self.allow_remote else "loopback clients only"
        return f"; API on {where} ({remote}; key {self.api_key.scheme})"

    async def _serve_tunnel(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(self.server.serve)
                self.listening = True
                task_status.started(port)
        finally:
            self.listening = False

    async def _stop_on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: stopping (counters are being saved)", signal.Signals(signum).name)
                scope.cancel()
                return

    # -- restoring ---------------------------------------------------------------------------------
    async def _restore(self, snap: Snapshot) -> None:
        self.events.restore(snap.events)
        by_kind = {REVERSE: 0, FORWARD: 1, CONNECTOR: 2}
        known = {rec.token for rec in snap.tokens}
        stale: list[str] = []
        for rec in sorted(snap.tokens, key=lambda r: by_kind.get(r.kind, 3)):
            counters = {"bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down,
                            "total_connections": rec.total_connections}
            existing = self.tokens.get(rec.token)
            if existing is not None:  # also given on the command line: that one wins
                if existing.kind == rec.kind and isinstance(existing.account, TokenMeter):
                    m = existing.account
                    m.done_up, m.done_down = rec.bytes_up, rec.bytes_down
                    m.used = rec.bytes_up + rec.bytes_down
                    m.total_connections = rec.total_connections
                    m.created_at = rec.created_at
                    m.flushed = (rec.bytes_up, rec.bytes_down, rec.total_connections, None)
                continue
            if rec.origin != "api":
                continue  # a command-line token no longer given: its row waits for its return
            info = TokenInfo(rec.token, rec.kind)
            if rec.kind == REVERSE:
                info.port = self._free_or_any(rec)
                self._moved.append((info, rec.port))
                info.username, info.password = rec.username, rec.password
                info.allow_manage_connector = rec.allow_manage_connector
            elif rec.kind == CONNECTOR:
                rev = self.tokens.get(rec.reverse_token)
                if rev is None or rev.kind != REVERSE:
                    log.warning("connector token %s: its reverse token is gone; dropped",
                                redact(rec.token))
                    stale.append(rec.token)
                    continue
                info.reverse_token = rec.reverse_token
            elif rec.kind != FORWARD:
                continue
            info.account = TokenMeter(info, origin="api", created_at=rec.created_at, **counters)
            try:
                self.tokens.add(info)
            except ValueError as exc:
                log.warning("stored token %s not restored: %s", redact(rec.token), exc)
        if stale:
            await self.store.delete_tokens(stale)
        # command-line tokens get a row, so that their counters are kept too
        for info in self.tokens:
            meter = info.account
            if isinstance(meter, TokenMeter) and meter.origin == "runtime" and not info.owner:
                meter.origin = "cli"
                if info.token not in known:
                    await self.store.put_token(self._token_record(info))
        for rec in snap.users:
            user = UserAccount(id=rec.id, key=rec.key, name=rec.name, limit_bytes=rec.limit_bytes,
                               expires_at=rec.expires_at, status=rec.status,
                               created_at=rec.created_at, bytes_up=rec.bytes_up,
                               bytes_down=rec.bytes_down, total_connections=rec.total_connections,
                               last_seen=rec.last_seen)
            user.quota_noted = user.refuse_reason() == REASON_LIMIT
            user.expiry_noted = user.refuse_reason() == REASON_EXPIRED
            user.on_quota = self._quota_reached
            self.users[user.key] = user
            self.users_by_name[user.name] = user
            if self.tokens.get(user.key) is not None:
                log.error("user %s: its key is also given as a -t token; the user cannot "
                          "authenticate until one of them changes", user.name)
                continue
            self.tokens.add(TokenInfo(user.key, FORWARD, account=user))
        if snap.tokens or snap.users:
            log.info("restored %d token(s) and %d user(s) from %s", len(snap.tokens), len(snap.users),
                     self.store.description)

    def _free_or_any(self, rec: TokenRecord) -> int:
        """The SOCKS5 port a stored reverse token had, or any free one if that is taken now."""
        if not rec.port:
            return 0
        if any(info.port == rec.port for info in self.tokens.of_kind(REVERSE)):
            log.warning("reverse token %s: its SOCKS5 port %d is given to a -t token now; it "
                        "gets another one", redact(rec.token), rec.port)
            return 0
        try:
            sock = bind_tcp(self.server.config.socks_host, rec.port)
        except OSError as exc:
            log.warning("reverse token %s: its SOCKS5 port %d is taken (%s); it gets another one",
                        redact(rec.token), rec.port, exc.strerror or exc)
            return 0
        sock.close()
        return rec.port

    # -- server hooks ----------------------------------------------------------------------------------
    def on_server_event(self, kind: str, **f) -> None:
        account = f.get("account")
        user = account.name if isinstance(account, UserAccount) else None
        token = None if user is not None else f.get("token")
        peer, role = f.get("peer"), f.get("role")
        if kind == "auth_success":
            if isinstance(account, Meter):
                account.last_seen = time.time()
            self.events.add("auth_success", token=token, user=user, peer=peer, role=role)
            if role == REVERSE:
                self.events.add("provider_joined", token=token, peer=peer, role=role)
        elif kind == "auth_failure":
            reason = f.get("reason") or "invalid token"
            self.events.add("auth_failure", user=user, peer=peer, detail=f"{f.get('how', '')}: {reason}")
        elif kind == "session_closed":
            self.events.add("session_closed", token=token, user=user, peer=peer, role=role,
                            detail=f.get("reason"))
            if role == REVERSE:
                self.events.add("provider_left", token=token, peer=peer, role=role,
                                detail=f.get("reason"))

    def _token_added(self, info: TokenInfo) -> None:
        if info.owner:  # a provider's own connector token (autonomy mode)
            self.events.add("token_added", token=info.token, role=info.kind,
                            detail="added by a provider")

    def _token_removed(self, info: TokenInfo) -> None:
        meter = info.account
        if isinstance(meter, TokenMeter) and meter.origin == "runtime":
            self.events.add("token_removed", token=info.token, role=info.kind,
                            detail="removed with its provider's token" if not info.owner
                            else "removed by a provider")

    def _quota_reached(self, user: UserAccount) -> None:
        self.events.add("quota_exceeded", user=user.name, detail=f"limit {user.limit_bytes} bytes")
        log.info("user %s reached the traffic limit", user.name)

    def note_api_auth_failure(self, address: str) -> None:
        self.events.add("api_auth_failure", peer=address)
        self.note_failed_key(address, "a wrong or missing API key")

    def note_failed_key(self, address: str, what: str) -> None:
        """Count a failed key against ``address`` and log it: a warning per attempt (at most
        LogBudget's rate, so a flood from many addresses cannot flood the log), and once
        when the address's lock-out starts (it was not locked out, or it would have had 429)."""
        self.limiter.failed(address)
        dropped = self._auth_log.take()
        if dropped is not None:
            more = f" ({dropped} more not logged)" if dropped else ""
            log.warning("API: %s from %s%s", what, address, more)
        wait = self.limiter.retry_after(address)
        if wait:
            log.warning("API: %s is locked out for %d s after repeated failed keys", address, wait)

    def note_rate_limited(self, address: str) -> None:
        self.events.add("api_rate_limited", peer=address)

    def _install_socks_users(self) -> None:
        """Users' name + key open every reverse token's SOCKS5 port (next to its own pair)."""
        for service in list(self.server.services.values()):
            creds = service.socks.credentials
            if not isinstance(creds, SocksUsers):
                own = creds if isinstance(creds, Credentials) else None
                service.socks.credentials = SocksUsers(self.users_by_name, own)

    # -- background tasks -------------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(self.flush_interval)
            await self._flush()

    @staticmethod
    def _growth(meter: Meter, owner: str, ident: str, state: tuple, out: list) -> None:
        """Note what ``meter`` grew by since the store last heard of it."""
        base = meter.flushed
        if state == base:
            return
        out.append((meter, state, Counters(
            owner=owner, ident=ident, bytes_up=state[0] - base[0], bytes_down=state[1] - base[1],
            total_connections=state[2] - base[2], last_seen=state[3])))

    def _collect(self, now: float) -> list[tuple[Meter, tuple, Counters]]:
        out: list = []
        for info in self.tokens:
            meter = info.account
            if isinstance(meter, TokenMeter):
                up, down = meter.sample(now)
                if meter.origin != "runtime":
                    self._growth(meter, "token", info.token,
                                 (up, down, meter.total_connections, None), out)
        for user in list(self.users.values()):
            before = user._sample
            up, down = user.sample(now)
            if before is not None and (up, down) != before[1:]:
                user.last_seen = now
            self._growth(user, "user", user.id, (up, down, user.total_connections, user.last_seen),
                         out)
        return out

    async def _flush(self) -> None:
        async with self.lock:
            grown = self._collect(time.time())
            events = self.events.take_unsaved()
            try:
                await self.store.flush([c for _, _, c in grown], events)
            except StoreError as exc:
                # the baselines stay: the next flush writes this growth and whatever comes
                self.flush_failures += 1
                self.events.put_back(events)
                if self.store_error != str(exc):
                    log.error("cannot save counters and events: %s", exc)
                    self.events.add("store_error", detail=str(exc))
                self.store_error = str(exc)
                return
            for meter, state, _ in grown:
                meter.flushed = state
            if self.store_error is not None:
                log.info("the store works again")
            self.store_error = None
            self.flushes += 1

    async def _enforce_loop(self) -> None:
        while True:
            now = time.time()
            wait = ENFORCE_INTERVAL
            for user in list(self.users.values()):
                if user.expires_at is not None:
                    if now >= user.expires_at:
                        if not user.expiry_noted:
                            user.expiry_noted = True
                            user.update_allow(now)
                            self.events.add("user_expired", user=user.name)
                            log.info("user %s expired", user.name)
                            self._cut(user, REASON_EXPIRED, sessions=True)
                    else:
                        user.expiry_noted = False
                        wait = min(wait, user.expires_at - now)
                reason = user.refuse_reason(now)
                if reason is not None and user.channels:
                    user.close_channels(reason)
            self._install_socks_users()
            with trio.move_on_after(max(wait, 0.001)):
                await self._wake.wait()
            self._wake = trio.Event()

    def _cut(self, user: UserAccount, reason: str, *, sessions: bool) -> None:
        """Close the user's open channels, and with ``sessions`` their WebSocket sessions."""
        user.close_channels(reason)
        if sessions and self.server is not None:
            for session, info in list(self.server.sessions.items()):
                if info.account is user:
                    session.close(1008, reason)

    # -- LinkSocks token API -------------------------------------------------------------------------
    def _clients(self) -> Counter:
        return Counter(id(info) for info in self.server.sessions.values())

    def token_status(self) -> s.StatusResponse:
        clients = self._clients()
        reverse, forward = [], []
        for info in self.tokens:
            if isinstance(info.account, UserAccount):
                continue
            if info.kind == REVERSE:
                port = self._reverse_port(info)
                # as LinkSocks does: connector_tokens only when there are some
                connectors = [c.token for c in self.tokens.connectors_of(info.token)]
                reverse.append(s.TokenStatus(
                    token=info.token, type="reverse", clients_count=clients[id(info)], port=port,
                    connector_tokens=connectors or s.UNSET))
            elif info.kind == FORWARD:
                forward.append(s.TokenStatus(token=info.token, type="forward",
                                             clients_count=clients[id(info)]))
        return s.StatusResponse(version=__version__, tokens=reverse + forward)

    def _reverse_port(self, info: TokenInfo) -> int:
        """A reverse token's SOCKS5 port; -1 in autonomy mode, which has none (as LinkSocks
        reports it: providers are reached through their own connector tokens)."""
        if info.allow_manage_connector:
            return -1
        service = self.server.services.get(info.token)
        return service.socks.port if service is not None else (info.port or 0)

    async def _persist(self, awaitable) -> None:
        try:
            await awaitable
        except StoreError as exc:
            log.error("database write failed: %s", exc)
            raise ApiError(503, "database unavailable") from None

    def _token_record(self, info: TokenInfo) -> TokenRecord:
        meter = info.account
        up, down = meter.totals() if isinstance(meter, Meter) else (0, 0)
        return TokenRecord(
            token=info.token, kind=info.kind,
            origin=meter.origin if isinstance(meter, TokenMeter) and meter.origin != "runtime" else "api",
            port=info.port, username=info.username, password=info.password,
            allow_manage_connector=info.allow_manage_connector, reverse_token=info.reverse_token,
            created_at=getattr(meter, "created_at", time.time()), bytes_up=up, bytes_down=down,
            total_connections=getattr(meter, "total_connections", 0))

    async def add_token(self, req: s.TokenRequest) -> s.TokenResult:
        kind = req.type
        if kind not in (FORWARD, REVERSE, CONNECTOR):
            raise ApiError(400, "invalid token type")
        if kind == CONNECTOR and not req.reverse_token:
            raise ApiError(400, "reverse_token is required for connector token")
        token = req.token or generate()
        if token == RESERVED:
            raise ApiError(400, f"'{RESERVED}' is reserved and cannot be used as a token")
        if len(token.encode()) > 255:
            raise ApiError(400, "a token must be 1 to 255 bytes long")
        if kind == REVERSE and bool(req.username) != bool(req.password):
            raise ApiError(400, "username and password go together")
        for name in ("username", "password"):  # SOCKS5 carries 255 bytes at most
            if len(getattr(req, name).encode()) > 255:
                raise ApiError(422, f"Expected at most 255 bytes (UTF-8) - at `$.{name}`", field=name)
        async with self.lock:
            existing = self.tokens.get(token)
            if existing is not None:
                if (kind == CONNECTOR and existing.kind == CONNECTOR
                        and existing.reverse_token == req.reverse_token):
                    return s.TokenResult(token=token)  # idempotent, as in LinkSocks
                raise ApiError(409, "token already exists")
            if kind == FORWARD:
                info = TokenInfo(token, FORWARD)
                info.account = TokenMeter(info, origin="api")
                await self._persist(self.store.put_token(self._token_record(info)))
                self.tokens.add(info)
                result = s.TokenResult(token=token)
            elif kind == CONNECTOR:
                rev = self.tokens.get(req.reverse_token)
                if rev is None or rev.kind != REVERSE:
                    raise ApiError(400, "reverse token does not exist")
                info = TokenInfo(token, CONNECTOR, reverse_token=req.reverse_token)
                info.account = TokenMeter(info, origin="api")
                await self._persist(self.store.put_token(self._token_record(info)))
                self.tokens.add(info)
                result = s.TokenResult(token=token)
            else:
                try:
                    info = await self.server.add_reverse_token(
                        token, port=req.port or None, username=req.username,
                        password=req.password, allow_manage_connector=req.allow_manage_connector)
                except OSError as exc:
                    self.server.remove_token(token)
                    log.warning("reverse token via API: port %s: %s", req.port or "any",
                                exc.strerror or exc)
                    raise ApiError(409, f"cannot allocate port: {req.port or 0}") from None
                info.account.origin = "api"
                self._install_socks_users()
                try:
                    await self._persist(self.store.put_token(self._token_record(info)))
                except ApiError:
                    self.server.remove_token(token)
                    raise
                result = s.TokenResult(token=token, port=self._reverse_port(info))
        self.events.add("token_added", token=token, role=kind, detail="API")
        log.info("API: %s token %s added%s", kind, redact(token),
                 f" (SOCKS5 port {result.port})" if kind == REVERSE else "")
        return result

    async def remove_token(self, token: str) -> s.TokenResult:
        async with self.lock:
            info = self.tokens.get(token)
            if info is None or isinstance(info.account, UserAccount):
                raise ApiError(404, "token not found")
            doomed = [token]
            if info.kind == REVERSE:
                doomed += [c.token for c in self.tokens.connectors_of(token) if not c.owner]
            await self._persist(self.store.delete_tokens(doomed))
            self.server.remove_token(token)
        for t in doomed:
            self.events.add("token_removed", token=t, detail="API" if t == token
                            else "removed with its reverse token")
        log.info("API: %s token %s removed", info.kind, redact(token))
        return s.TokenResult(token=token)

    # -- users ------------------------------------------------------------------------------------------
    def _user(self, key: str) -> UserAccount:
        user = self.users.get(key)
        if user is None:
            raise ApiError(404, "user not found")
        return user

    def _user_record(self, user: UserAccount, **override) -> UserRecord:
        up, down = user.totals()
        rec = UserRecord(id=user.id, key=user.key, name=user.name, limit_bytes=user.limit_bytes,
                         expires_at=user.expires_at, status=user.status, created_at=user.created_at,
                         last_seen=user.last_seen, bytes_up=up, bytes_down=down,
                         total_connections=user.total_connections)
        for name, value in override.items():
            setattr(rec, name, value)
        return rec

    def user_view(self, user: UserAccount, clients: Counter | None = None) -> s.User:
        up, down = user.totals()
        if clients is None:
            clients = Counter(info.account.id for info in self.server.sessions.values()
                              if isinstance(info.account, UserAccount))
        return s.User(key=user.key, name=user.name, id=user.id, bytes_up=up, bytes_down=down,
                      connections=len(user.channels), total_connections=user.total_connections,
                      clients=clients.get(user.id, 0),
                      limit_bytes=user.limit_bytes, expires_at=rfc3339(user.expires_at),
                      status=user.status, blocked=user.refuse_reason(),
                      created_at=rfc3339(user.created_at), last_seen=rfc3339(user.last_seen))

    def server_status(self) -> s.ServerStatus:
        return s.ServerStatus(version=__version__, uptime_seconds=round(time.time() - self.started_at, 3),
                              total_users=len(self.users), status="running")

    def list_users(self) -> s.UserList:
        clients = Counter(info.account.id for info in self.server.sessions.values()
                          if isinstance(info.account, UserAccount))
        users = [self.user_view(u, clients) for u in self.users.values()]
        return s.UserList(users=users, total=len(users))

    def get_user(self, key: str) -> s.User:
        return self.user_view(self._user(key))

    async def create_user(self, req: s.UserCreate) -> s.User:
        user_id = secrets.token_hex(8)
        key = req.key if req.key is not s.UNSET else new_user_key()
        name = req.name if req.name is not s.UNSET else f"user-{user_id[:8]}"
        if key == RESERVED:
            raise ApiError(400, f"'{RESERVED}' is reserved and cannot be used as a key")
        async with self.lock:
            if key in self.users or self.tokens.get(key) is not None:
                raise ApiError(409, "key already exists")
            if name in self.users_by_name:
                raise ApiError(409, "name already exists")
            user = UserAccount(id=user_id, key=key, name=name, limit_bytes=req.limit_bytes,
                               expires_at=req.expires_at.timestamp() if req.expires_at else None,
                               status=req.status)
            user.on_quota = self._quota_reached
            await self._persist(self.store.put_user(self._user_record(user)))
            self.users[key] = user
            self.users_by_name[name] = user
            self.tokens.add(TokenInfo(key, FORWARD, account=user))
            self._wake.set()
        self.events.add("user_created", user=name)
        log.info("API: user %s created", name)
        return self.user_view(user)

    async def delete_user(self, key: str) -> s.Deleted:
        async with self.lock:
            user = self._user(key)
            await self._persist(self.store.delete_user(user.id))
            del self.users[key]
            self.users_by_name.pop(user.name, None)
            self.tokens.remove(key)
            user.status = DISABLED
            user.update_allow()
            self._cut(user, "user deleted", sessions=True)
        self.events.add("user_deleted", user=user.name)
        log.info("API: user %s deleted", user.name)
        return s.Deleted(key=key)

    async def update_user(self, key: str, **changes) -> s.User:
        """Change status, name, limit_bytes and/or expires_at; cut live traffic they forbid."""
        async with self.lock:
            user = self._user(key)
            fields = {}
            if "status" in changes:
                fields["status"] = changes["status"]
            if "name" in changes and changes["name"] != user.name:
                if changes["name"] in self.users_by_name:
                    raise ApiError(409, "name already exists")
                fields["name"] = changes["name"]
            if "limit_bytes" in changes:
                fields["limit_bytes"] = changes["limit_bytes"]
            if "expires_at" in changes:
                when = changes["expires_at"]
                fields["expires_at"] = when.timestamp() if when is not None else None
            await self._persist(self.store.put_user(self._user_record(user, **fields)))
            if "name" in fields:
                self.users_by_name.pop(user.name, None)
                self.users_by_name[fields["name"]] = user
            for name, value in fields.items():
                setattr(user, name, value)
            user.update_allow()
            if "limit_bytes" in fields:
                user.quota_noted = False  # a new limit: crossing it is news again
            after = user.refuse_reason()
            if after is not None:
                # disabled or expired: the key no longer opens a session either
                self._cut(user, after, sessions=after in (REASON_DISABLED, REASON_EXPIRED))
                if after == REASON_EXPIRED:
                    user.expiry_noted = True
            self._wake.set()
        detail = ", ".join(f"{k}={v}" for k, v in fields.items())
        self.events.add("user_updated", user=user.name, detail=detail or None)
        log.info("API: user %s updated (%s)", user.name, ", ".join(fields) or "no change")
        return self.user_view(user)

    async def reset_user(self, key: str) -> s.User:
        async with self.lock:
            user = self._user(key)
            await self._persist(self.store.reset_user(user.id))
            user.reset()
            user.flushed = (0, 0, *user.flushed[2:])
        self.events.add("user_reset", user=user.name)
        log.info("API: user %s counters reset", user.name)
        return self.user_view(user)

    async def rotate_user(self, key: str) -> s.User:
        async with self.lock:
            user = self._user(key)
            new_key = new_user_key()
            await self._persist(self.store.put_user(self._user_record(user, key=new_key)))
            self.tokens.remove(key)
            del self.users[key]
            self._cut(user, "key rotated", sessions=True)
            user.key = new_key
            self.users[new_key] = user
            self.tokens.add(TokenInfo(new_key, FORWARD, account=user))
        self.events.add("user_rotated", user=user.name)
        log.info("API: user %s has a new key", user.name)
        return self.user_view(user)

    # -- subscribe ---------------------------------------------------------------------------------------
    def tunnel_url(self, scheme: str, host: str) -> str:
        """The WebSocket URL clients should use: --public-url, or what this request came to."""
        if self.public_url:
            return self.public_url
        ws = "wss" if self.server.tls is not None else "ws"
        host = _usable_host(host)
        if self.api_bind is None and host:
            return f"{ws}://{host}"
        hostname = urlsplit(f"//{host}").hostname if host else None
        if not hostname:
            bound = self.server.config.ws_host
            hostname = "127.0.0.1" if bound in ("0.0.0.0", "::", "") else bound
        if ":" in hostname:
            hostname = f"[{hostname}]"
        return f"{ws}://{hostname}:{self.server.port}"

    def subscription(self, key: str, client: str, scheme: str, host: str) -> s.Subscription:
        user = self.users.get(key)
        if user is None:
            self.note_failed_key(client, "an unknown user key in /api/subscribe")
            raise ApiError(404, "unknown key")
        reason = user.refuse_reason()
        if reason in (REASON_DISABLED, REASON_EXPIRED):
            raise ApiError(403, reason)
        url = self.tunnel_url(scheme, host)
        parts = urlsplit(url)
        tls = parts.scheme in ("wss", "https")
        port = parts.port or (443 if tls else 80)
        hostname = parts.hostname or "localhost"
        if ":" in hostname:
            hostname = f"[{hostname}]"
        link = f"trisocks://{user.key}@{hostname}:{port}" + ("?tls=1" if tls else "")
        return s.Subscription(server=url, token=user.key, mode="forward",
                              socks_port=DEFAULT_SOCKS_PORT, share_link=link, name=user.name,
                              expires_at=rfc3339(user.expires_at), limit_bytes=user.limit_bytes)

    # -- observability -------------------------------------------------------------------------------------
    def stats(self) -> s.Stats:
        sessions = self.server.sessions
        clients = self._clients()
        user_clients = Counter(info.account.id for info in sessions.values()
                               if isinstance(info.account, UserAccount))
        tokens, users = [], []
        tot = {"bytes_up": 0, "bytes_down": 0, "rate_up": 0.0, "rate_down": 0.0, "channels": 0}
        for info in self.tokens:
            meter = info.account
            if not isinstance(meter, TokenMeter):
                continue
            up, down = meter.totals()
            fig = s.TokenFigures(token=info.token, type=info.kind, bytes_up=up, bytes_down=down,
                                 rate_up=round(meter.rate_up, 1), rate_down=round(meter.rate_down, 1),
                                 channels=len(meter.channels), clients=clients[id(info)],
                                 total_connections=meter.total_connections)
            if info.kind == REVERSE:
                service = self.server.services.get(info.token)
                fig.providers = len(service.pool) if service is not None else 0
            tokens.append(fig)
        for user in self.users.values():
            up, down = user.totals()
            users.append(s.UserFigures(key=user.key, name=user.name, bytes_up=up, bytes_down=down,
                                       rate_up=round(user.rate_up, 1), rate_down=round(user.rate_down, 1),
                                       channels=len(user.channels), clients=user_clients[user.id],
                                       total_connections=user.total_connections))
        for fig in (*tokens, *users):
            tot["bytes_up"] += fig.bytes_up
            tot["bytes_down"] += fig.bytes_down
            tot["rate_up"] += fig.rate_up
            tot["rate_down"] += fig.rate_down
            tot["channels"] += fig.channels
        totals = s.Figures(clients=len(sessions), **tot)
        return s.Stats(uptime_seconds=round(time.time() - self.started_at, 3), totals=totals,
                       tokens=tokens, users=users, internal_errors=guard.Stats.internal_errors)

    def query_events(self, q: s.EventsQuery) -> s.Events:
        aliases: frozenset[str] = frozenset()
        if q.user is not None and q.user in self.users:
            aliases = frozenset({self.users[q.user].name})
        found = self.events.query(
            limit=q.limit, since=q.since.timestamp() if q.since else None,
            until=q.until.timestamp() if q.until else None, token=q.token, user=q.user,
            type=q.type, user_aliases=aliases)
        return s.Events(events=[
            s.Event(id=e.id, time=rfc3339(e.time), type=e.type, token=e.token, user=e.user,
                    peer=e.peer, role=e.role, detail=e.detail) for e in found])

    async def health(self) -> s.Health:
        database = "ok"
        try:
            with trio.fail_after(3):
                await self.store.check()
        except (StoreError, trio.TooSlowError) as exc:
            database = "error"
            log.warning("health check: database: %s", exc or "no answer in 3 s")
        if database == "ok" and self.store_error is not None:
            await self._flush()  # the last flush failed: retry it now rather than guess
            if self.store_error is not None:
                database = "error"
        listener = "ok" if self.listening and self.server.ready.is_set() else "error"
        status = "ok" if database == listener == "ok" else "error"
        return s.Health(status=status, checks=s.HealthChecks(database=database, listener=listener))

    def metrics_text(self) -> str:
        from .metrics import render

        return render(self)
