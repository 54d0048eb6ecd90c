"""The tunnel client: forward client, connector, or provider.

* **forward client / connector**: a local SOCKS5 port; each CONNECT becomes a
  channel on one of our sessions to the server (the server dials the target,
  or, for a connector token, hands the channel to a provider).
* **provider** (``reverse``): no local port; the server sends us Connect
  requests and we dial the targets (:class:`~trisocks.tunnel.egress.Egress`). With
  ``connector_token`` we also register that token with the server (autonomy
  mode).

The client keeps ``threads`` WebSocket sessions up, reconnecting with capped,
jittered exponential backoff, and spreads new channels over the live ones. A
session that fails for any reason, a bug included, is reconnected. A token the
server does not know ends the client: retrying cannot fix it. An account refused
for now (traffic limit reached, expired, disabled, a policy limit such as
"not allowed: device limit (3 in use)") ends it too, unless ``retry_refused`` is
set (the command line sets it): then the client retries with a long backoff
(``refused_backoff_initial``, 30 s, doubling up to ``refused_backoff_max``,
5 min, each wait ±20 %), so that the operator's renewal brings it back.

A ``token=`` in the server URL wins over the configured token and is sent the way
LinkSocks and pywssocks clients send it: as the URL-query auth form
(``?token=<sha256 hex>&reverse=...&instance=...``), with no Auth message.
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass

import trio

from ..net.dial import dial_tcp
from ..net.guard import PEER_ERRORS, report
from ..net.handshake import HandshakeError, client_handshake, offers_eof, parse_window
from ..net.session import DEFAULT_WINDOW, RECV_BUFFER, Handler, Session, read_message
from ..net.transport import SocketTransport, close_socket, tls_wrap
from ..net.upstream import open_via, parse_proxy, proxy_from_env
from ..wire import protocol
from ..wire.codec import OP_BINARY, Decoder, ProtocolError, encode_frame
from ..wire.errors import AuthError, MessageError, TunnelError
from ..wire.names import hostport
from .egress import Egress
from .endpoint import parse_url, split_url_token, tls_client_context, url_auth_resource
from .ingress import Ingress
from .pool import SessionPool
from .socks_server import Credentials, SocksServer
from .tokens import redact

log = logging.getLogger("trisocks.client")

SESSION_WAIT = 2.0  # how long a SOCKS5 request waits for a (re)connecting session


@dataclass
class ClientConfig:
    url: str = "ws://localhost:8765"
    token: str = "anonymous"
    reverse: bool = False  # provider: the server sends us Connect requests
    connector_token: str = ""  # provider: register this connector token (autonomy mode)
    socks_host: str = "127.0.0.1"
    socks_port: int = 9870
    socks_username: str = ""
    socks_password: str = ""
    socks_wait_server: bool = True  # open the SOCKS5 port only once connected (linksocks default)
    reconnect: bool = True
    threads: int = 1
    fast_open: bool = False
    connect_timeout: float = 20.0  # waiting for ConnectResponse (the server dials with its own timeout)
    dial_timeout: float = 15.0  # reaching the WebSocket server
    target_timeout: float = 10.0  # provider: reaching a target
    window: int = DEFAULT_WINDOW
    max_message: int = 32 << 20
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    ping_interval: float = 30.0
    idle_timeout: float = 90.0
    ca_file: str = ""  # trust these CAs for wss:// (default: the system's)
    insecure: bool = False  # wss:// without certificate checks
    upstream_proxy: str = ""  # reach the server through this SOCKS5/HTTP proxy
    env_proxy: bool = True  # else honour HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY
    # an account refused for now (quota, expiry, disabled, policy limits): retry with a long
    # backoff instead of raising; off for embedders, who get the AuthError to decide
    retry_refused: bool = False
    refused_backoff_initial: float = 30.0
    refused_backoff_max: float = 300.0


# AuthResponse errors that retrying can never fix: the token does not exist (or the
# message did not even parse). Every other refusal concerns an account the operator can
# renew, re-enable or free up.
FINAL_REFUSALS = frozenset({"invalid token", "invalid auth message"})


class RefusedForNow(AuthError):
    """The server knows the token but refuses it at the moment (``reason`` says why)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProviderHandler(Egress):
    """A provider's sessions: dial for the server, and hear about connector tokens and partners."""

    def __init__(self, client: Client, **kw) -> None:
        super().__init__(**kw)
        self.client = client

    def on_partners(self, session: Session, count: int) -> None:
        if count != self.client.partners:
            log.info("%d connector client(s) now use this provider's token", count)
        self.client.partners = count

    def on_connector_response(self, session: Session, msg: protocol.ConnectorResponse) -> None:
        self.client.on_connector_response(msg)


class ConnectorHandler(Handler):
    """A forward client's or connector's sessions: the server may tell us how many providers there are."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def on_partners(self, session: Session, count: int) -> None:
        if count != self.client.partners:
            log.info("%d provider(s) behind this connector token", count)
        self.client.partners = count


class Client:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        url, url_token = split_url_token(config.url)
        self.url_auth = url_token is not None  # the token goes in the URL, hashed: no Auth message
        self.token = url_token if url_token is not None else config.token
        self.endpoint = parse_url(url)
        self.proxy = self._choose_proxy()
        self.tls = None
        if self.endpoint.scheme == "wss":
            self.tls = tls_client_context(config.ca_file, config.insecure)
            if config.insecure:
                log.warning("TLS certificate checks are off (--insecure): anyone on the way to "
                            "the server can read and change the tunnel")
        self.instance = protocol.new_channel_id()
        self.pool = SessionPool("server")
        self.partners = 0
        self.socks_port: int | None = None
        self.socks: SocksServer | None = None
        self._ready_before = False  # a readiness line was logged: the next one says "reconnected"
        self._connector_replies: dict[bytes, trio.Event] = {}
        self._connector_results: dict[bytes, protocol.ConnectorResponse] = {}
        if config.reverse:
            self.handler: Handler = ProviderHandler(self, connect_timeout=config.target_timeout)
            self.ingress = None
        else:
            self.handler = ConnectorHandler(self)
            self.ingress = Ingress(self.pool, wait_timeout=SESSION_WAIT,
                                   connect_timeout=config.connect_timeout,
                                   fast_open=config.fast_open)

    def _choose_proxy(self):
        """The proxy to reach the server through: -x, else the environment (unless -E)."""
        cfg, ep = self.config, self.endpoint
        if cfg.upstream_proxy:
            proxy = parse_proxy(cfg.upstream_proxy)
        elif cfg.env_proxy:
            proxy = proxy_from_env(ep.scheme, ep.host, ep.port)
        else:
            proxy = None
        if proxy is not None:
            log.info("reaching the server through %s%s", proxy.display,
                     "" if cfg.upstream_proxy else " (from the environment; -E ignores it)")
        return proxy

    @property
    def sessions(self) -> list[Session]:
        return self.pool.sessions

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; raises AuthError for a refused token, TunnelError with -R on loss.

        ``task_status.started`` gets the SOCKS5 port (forward) or None (provider, once connected).
        """
        cfg = self.config
        async with trio.open_nursery() as nursery:
            for slot in range(max(1, cfg.threads)):
                nursery.start_soon(self._keep_connected, slot)
            if self.ingress is None:
                await self.pool.wait_nonempty()
                task_status.started(None)
                return
            creds = Credentials(cfg.socks_username, cfg.socks_password) if cfg.socks_username else None
            self.socks = SocksServer(cfg.socks_host, cfg.socks_port, on_connect=self.ingress.on_connect,
                                     on_udp=self.ingress.on_udp, credentials=creds, name="SOCKS5")
            if cfg.socks_wait_server:
                await self.pool.wait_nonempty()
            self.socks_port = await nursery.start(self.socks.serve)
            # logged once the port accepts (supervisors and tests wait for this line)
            log.info("SOCKS5 proxy listening on %s%s", self._socks_display(),
                     " (username/password required)" if creds else "")
            self._ready_before = bool(self.pool.sessions)  # with -i: not ready until connected
            task_status.started(self.socks_port)

    def _socks_display(self) -> str:
        return hostport(self.config.socks_host, self.socks_port)

    def _announce_ready(self) -> None:
        """A first session is up (again): say the role can be used, with a stable wording."""
        again = " (reconnected)" if self._ready_before else ""
        if self.ingress is None:
            log.info("provider ready on %s%s", self.endpoint.display, again)
        elif self.socks_port is not None:
            log.info("SOCKS5 proxy ready on %s%s", self._socks_display(), again)
        else:
            return  # the first time, run() says so once the port accepts
        self._ready_before = True

    # -- sessions --------------------------------------------------------------------
    async def _keep_connected(self, slot: int) -> None:
        """One of the ``threads`` connections: connect, serve, and start again whatever ended it.

        Only a refused token (AuthError; with ``retry_refused`` only an unknown one) and,
        with -R, a lost connection end it."""
        cfg = self.config
        delay = cfg.backoff_initial
        refused_delay = cfg.refused_backoff_initial
        while True:
            try:
                session = await self.connect()
            except RefusedForNow as exc:
                if not (cfg.retry_refused and cfg.reconnect):
                    raise
                wait = refused_delay * random.uniform(0.8, 1.2)
                log.warning("%s; retrying in %.0f s (an unknown token would end the client; "
                            "this refusal ends when the account is renewed or freed)", exc, wait)
                await trio.sleep(wait)
                refused_delay = min(refused_delay * 2, cfg.refused_backoff_max)
                continue
            except AuthError:
                raise
            except Exception as exc:
                _note_failure(f"connecting to {self.endpoint.display}", exc)
                if not cfg.reconnect:
                    raise TunnelError(f"cannot reach {self.endpoint.display}: "
                                      f"{describe_failure(exc)}") from None
                wait = delay * random.uniform(0.8, 1.2)
                log.warning("cannot reach %s: %s; retrying in %.1f s", self.endpoint.display,
                            describe_failure(exc), wait)
                await trio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max)
                continue
            refused_delay = cfg.refused_backoff_initial
            started = trio.current_time()
            await self._serve_contained(session, slot)
            if not cfg.reconnect:
                raise TunnelError(f"disconnected from server: {session.close_reason}")
            log.warning("connection %d to server lost (%s); reconnecting", slot,
                        session.close_reason or "closed")
            if trio.current_time() - started < cfg.backoff_max:
                # a session that keeps failing soon after auth must not make a tight loop
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, cfg.backoff_max)
            else:
                delay = cfg.backoff_initial

    async def _serve_contained(self, session: Session, slot: int) -> None:
        """Run one authenticated session; whatever it raises (a bug too) ends it alone."""
        try:
            async with trio.open_nursery() as nursery:
                if self.config.reverse and self.config.connector_token:
                    nursery.start_soon(self._register_connector, session)
                await self._run_session(session)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            session.close_reason = session.close_reason or f"failed: {describe_failure(_leaf(exc))}"
            _note_failure(f"connection {slot} to server", exc)

    async def _run_session(self, session: Session) -> None:
        was_empty = not self.pool.sessions
        self.pool.add(session)
        try:
            if was_empty:
                self._announce_ready()
            await session.run()
        finally:
            self.pool.remove(session)

    async def connect(self) -> Session:
        """Dial, upgrade and authenticate one WebSocket session."""
        cfg, ep = self.config, self.endpoint
        if self.proxy is not None:
            sock, early = await open_via(self.proxy, ep.host, ep.port, timeout=cfg.dial_timeout)
            if early:  # a WebSocket server never speaks first
                close_socket(sock)
                raise OSError(f"upstream proxy {self.proxy.display} sent unexpected data")
        else:
            sock = await dial_tcp(ep.host, ep.port, timeout=cfg.dial_timeout)
        if self.tls is not None:
            try:
                transport = await tls_wrap(sock, self.tls, server_side=False, hostname=ep.host,
                                           timeout=cfg.dial_timeout, peer=ep.display)
            except trio.BrokenResourceError as exc:
                raise OSError(_tls_failure(ep.host, exc.__cause__ or exc)) from None
        else:
            transport = SocketTransport(sock, ep.display)
        try:
            resource = (url_auth_resource(ep.resource, self.token, cfg.reverse, self.instance)
                        if self.url_auth else ep.resource)
            headers, leftover = await client_handshake(transport, ep.host_header, resource,
                                                       window=cfg.window)
            decoder = Decoder(expect_masked=False, max_message=cfg.max_message, buffer_size=RECV_BUFFER)
            decoder.feed_bytes(leftover)
            session = Session(
                transport, decoder, client_side=True, handler=self.handler,
                name=f"server {ep.display}", peer_window=parse_window(headers.get("x-trisocks-flow")),
                recv_window=cfg.window, ping_interval=cfg.ping_interval, idle_timeout=cfg.idle_timeout,
                half_close=offers_eof(headers.get("x-trisocks-flow")),
            )
            if not self.url_auth:
                auth = protocol.Auth(self.token, cfg.reverse, self.instance)
                await transport.send_all(encode_frame(OP_BINARY, protocol.pack(auth), session.mask_key()))
            # every server answers both forms with an AuthResponse, except that pywssocks
            # refuses a URL token by closing with 1008 and no AuthResponse
            reply = protocol.parse(await read_message(transport, decoder, timeout=cfg.dial_timeout,
                                                      client_side=True))
        except EOFError as exc:
            close_socket(sock)
            if decoder.close_code == 1008:
                # pywssocks refusing a URL token: final, as "invalid token" is
                raise self._refused(decoder.close_reason or "policy violation", final=True) from None
            raise exc
        except HandshakeError as exc:
            close_socket(sock)
            if (exc.status == 0 and self.tls is None and "speaks TLS" not in exc.message
                    and await self._speaks_tls()):
                raise HandshakeError(0, f"the server speaks TLS: use wss:// ({exc.message})") from None
            raise
        except BaseException:
            close_socket(sock)
            raise
        if not isinstance(reply, protocol.AuthResponse):
            close_socket(sock)
            raise EOFError(f"expected AuthResponse, got {type(reply).__name__}")
        if not reply.success:
            close_socket(sock)
            raise self._refused(reply.error or "invalid token")
        role = "provider" if cfg.reverse else "client"
        log.info("connected to %s as %s%s", ep.display, role,
                 " (trisocks flow control)" if session.peer_window else "")
        return session

    def _refused(self, reason: str, final: bool = False) -> AuthError:
        hint = " (no token given: use -t or TRISOCKS_TOKEN)" if self.token == "anonymous" else ""
        how = " (sent in the URL)" if self.url_auth else ""
        message = f"server refused token {redact(self.token)}{how}: {reason}{hint}"
        if final or reason in FINAL_REFUSALS:
            return AuthError(message)
        return RefusedForNow(message, reason)

    async def _speaks_tls(self) -> bool:
        """After a ws:// handshake that the server closed: does a TLS handshake work there?

        A TLS server reads our HTTP request as a broken ClientHello and hangs up (or answers
        with an alert); only a probe tells that apart from any other early close."""
        cfg, ep = self.config, self.endpoint
        if self.proxy is not None:
            return False  # a proxy in between: its close says nothing about the server
        probe = tls_client_context(insecure=True)
        try:
            sock = await dial_tcp(ep.host, ep.port, timeout=cfg.dial_timeout)
            transport = await tls_wrap(sock, probe, server_side=False, hostname=ep.host,
                                       timeout=min(cfg.dial_timeout, 5.0), peer=ep.display)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return False
        with trio.move_on_after(1):
            await transport.aclose()
        return True

    # -- autonomy: connector tokens a provider manages ------------------------------------
    async def _register_connector(self, session: Session) -> None:
        ok, detail = await self.manage_connector(session, self.config.connector_token, protocol.ADD)
        if ok:
            log.info("connector token %s registered", redact(detail or self.config.connector_token))
        else:
            log.error("server refused connector token %s: %s", redact(self.config.connector_token),
                      detail)

    async def manage_connector(self, session: Session, token: str, operation: int,
                               timeout: float = 10.0) -> tuple[bool, str]:
        """Ask the server to add or remove a connector token; (success, token or error)."""
        request_id = protocol.new_channel_id()
        done = self._connector_replies[request_id] = trio.Event()
        try:
            session.send(protocol.Connector(request_id, token, operation))
            with trio.move_on_after(timeout):
                await done.wait()
        finally:
            self._connector_replies.pop(request_id, None)
        reply = self._connector_results.pop(request_id, None)
        if reply is None:
            return False, "no answer from server"
        return reply.success, (reply.token if reply.success else reply.error)

    def on_connector_response(self, msg: protocol.ConnectorResponse) -> None:
        done = self._connector_replies.get(msg.channel)
        if done is not None:
            self._connector_results[msg.channel] = msg
            done.set()


# What OpenSSL says when the answer to our ClientHello is no TLS record at all (a plain
# HTTP server answering "HTTP/1.1 400"): the names vary across OpenSSL versions.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                              "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "RECORD_TOO_LARGE"})


def _tls_failure(host: str, exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS certificate of {host} not trusted ({exc.verify_message}); "
                "give its CA with --ca-file, or --insecure to skip the check")
    if isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS:
        return f"the server does not speak TLS: use ws:// (TLS handshake failed: {exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {host} failed: {exc.reason or exc}"
    return f"TLS handshake with {host} failed: {exc}"


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _note_failure(unit: str, exc: BaseException) -> None:
    """What the network or the peer can do is logged by the caller; anything else is a bug,
    reported with its traceback and counted (the client reconnects either way)."""
    leaf = _leaf(exc)
    if not isinstance(leaf, (*PEER_ERRORS, HandshakeError, ProtocolError, MessageError, AuthError)):
        report(unit, leaf)


def describe_failure(exc: BaseException) -> str:
    """A failure to reach or keep a server, in a few words for a log line."""
    if isinstance(exc, HandshakeError):
        return exc.message
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


__all__ = ["Client", "ClientConfig", "parse_url"]
