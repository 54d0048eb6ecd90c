"""Node-to-node bridges: reverse and agent modes across the nodes of a cluster (scale-out,
docs/scale-out.md).

A provider connects to one node; a SOCKS5 client (at a reverse token's port) or a connector
may arrive at another. When the node a request enters has no provider of the token, but the
management plane (``peers``) names other nodes that have some, the channel goes over a
*bridge*: a WebSocket session from this node to the other node's URL, in the connector role,
authenticated with a token derived from the cluster secret and the reverse token
(:func:`bridge_token`). The receiving node treats it as a connector of that reverse token
whose channels go to its own providers only (a bridged channel is never bridged again).

Nothing here relays bytes: the entering node opens an ordinary channel (Ingress) or a
:class:`~trisocks.tunnel.bridge.Bridge` (a connector) on the bridge session, exactly as it
would on a local provider's session, and the receiving node relays the bridge session's
channels with the agent-mode Bridge. Flow control, half-close and backpressure are theirs.

One bridge session per (peer URL, reverse token) carries every channel between them; it is
opened on demand (once for all requests that wait for it), replaced on demand after it
failed, and closed after ``IDLE_CLOSE`` seconds without channels.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterable
from functools import partial
from typing import Protocol

import trio

from ..net.guard import PEER_ERRORS, report
from ..net.handshake import HandshakeError
from ..net.session import Session
from ..net.transport import accept_loop, close_socket, listen_on
from ..wire.codec import ProtocolError
from ..wire.errors import AuthError, MessageError
from ..wire.names import hostport
from .client import Client, ClientConfig, describe_failure
from .pool import PING_GRACE, SessionPool
from .server_config import ServerConfig
from .tokens import BRIDGE_PREFIX

log = logging.getLogger("trisocks.nodes")

# A bridge token: BRIDGE_PREFIX, then base64url(HMAC-SHA256(cluster secret, reverse token)).
# "~" is outside the alphabet of generated tokens and user keys (url-safe base64), and the
# token table refuses tokens with this prefix, so no token a person holds can look like one.
_HMAC_LABEL = b"trisocks node bridge v1\0"  # domain separation: the secret has other uses

IDLE_CLOSE = 60.0  # a bridge session without channels for this long is closed
IDLE_CHECK = 5.0  # how often an idle bridge session looks at its clock
CONNECT_TIMEOUT = 5.0  # reaching and authenticating at a peer node, at most
DOWN_HOLD = 2.0  # after a failed attempt a peer is skipped this long (no dial per request)
RECHECK = 1.0  # while waiting for a provider: how often the peers are asked again
MAX_LINKS = 256  # outgoing bridge sessions of this node, in all
MAX_WAITERS = 1024  # requests waiting for one bridge session to open
MAX_BRIDGE_CHANNELS = 8192  # channels on one bridge session (the receiver allows 10000)
MAX_INCOMING = 1024  # bridge sessions other nodes may have open to this one


def bridge_token(secret: bytes, reverse_token: str) -> str:
    """What a node presents to another for reverse token ``reverse_token`` (ASCII, 49 bytes)."""
    mac = hmac.new(secret, _HMAC_LABEL + reverse_token.encode(), hashlib.sha256).digest()
    return BRIDGE_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def is_bridge_token(token: str) -> bool:
    return token.startswith(BRIDGE_PREFIX)


class Peers(Protocol):
    """What the management plane tells the tunnel about the other nodes."""

    def providers_elsewhere(self, token: str) -> list[str]:
        """URLs (``ws://host:port``) of the other live nodes that have providers of reverse
        token ``token``, best first."""
        ...


class StaticPeers:
    """Peers from a fixed table (tests, or a hand-made two-node setup): ``{token: [urls]}``,
    or a list of URLs that have providers of every token."""

    def __init__(self, table: dict[str, list[str]] | list[str]) -> None:
        self.table = table

    def providers_elsewhere(self, token: str) -> list[str]:
        if isinstance(self.table, dict):
            return list(self.table.get(token, ()))
        return list(self.table)


class BridgeKeys:
    """Recognises bridge tokens for this node's reverse tokens, in constant time per candidate.

    The expected token of each reverse token is computed once (lazily) and kept by its
    SHA-256, as the token table keeps tokens: a lookup is one dictionary probe and one
    ``compare_digest``. A change of secret forgets everything."""

    def __init__(self) -> None:
        self._secret: bytes | None = None
        self._by_digest: dict[str, tuple[str, str]] = {}  # sha256(expected) -> (expected, reverse)
        self._seen: dict[str, str] = {}  # reverse token -> sha256(expected)

    def recognise(self, secret: bytes | None, token: str, reverse_tokens: Iterable[str]) -> str | None:
        """The reverse token (one of ``reverse_tokens``) whose bridge token ``token`` is, or None."""
        if not secret or not is_bridge_token(token):
            return None
        if secret != self._secret:
            self._secret = secret
            self._by_digest.clear()
            self._seen.clear()
        current = set(reverse_tokens)
        for rev in current:
            if rev not in self._seen:
                expected = bridge_token(secret, rev)
                key = hashlib.sha256(expected.encode()).hexdigest()
                self._by_digest[key] = (expected, rev)
                self._seen[rev] = key
        if len(self._seen) > 2 * len(current) + 64:  # tokens removed meanwhile: forget them
            for rev in [r for r in self._seen if r not in current]:
                self._by_digest.pop(self._seen.pop(rev), None)
        found = self._by_digest.get(hashlib.sha256(token.encode()).hexdigest())
        if found is None:
            return None
        expected, rev = found
        if rev in current and hmac.compare_digest(expected.encode(), token.encode()):
            return rev
        return None


class _Link:
    """The bridge session to one peer node for one reverse token."""

    __slots__ = ("url", "token", "session", "opening", "waiters", "last_used")

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.session: Session | None = None
        self.opening: trio.Event | None = None
        self.waiters = 0
        self.last_used = trio.current_time()


def _usable(session: Session | None, now: float) -> bool:
    return (session is not None and session.responsive(now, PING_GRACE)
            and len(session.channels) < MAX_BRIDGE_CHANNELS)


class ClusterMember:
    """What the management plane sets and reads of a tunnel server for scale-out (a base of
    :class:`~trisocks.tunnel.server.Server`, which has ``nodes`` and ``services``)."""

    nodes: NodeBridges
    services: dict

    @property
    def peers(self) -> Peers | None:
        """Where other nodes have providers (``providers_elsewhere(token) -> [url]``); set by
        the plane, None for a lone server (no bridges)."""
        return self.nodes.peers

    @peers.setter
    def peers(self, peers: Peers | None) -> None:
        self.nodes.peers = peers

    @property
    def cluster_secret(self) -> bytes | None:
        """The secret every node of the cluster shares: bridge tokens are derived from it."""
        return self.nodes.secret

    @cluster_secret.setter
    def cluster_secret(self, secret: bytes | None) -> None:
        self.nodes.secret = secret or None

    @property
    def node_url(self) -> str:
        """Where other nodes reach this one (see :attr:`NodeBridges.url`)."""
        return self.nodes.url

    def provider_counts(self) -> dict[str, int]:
        """Providers connected to this node, per reverse token."""
        return {token: len(service.pool) for token, service in list(self.services.items())}


class NodeBridges:
    """This node's bridges to other nodes (outgoing), its node listener and its bridge keys
    (incoming).

    ``peers`` and ``secret`` are set by the management plane (None: a lone server, and
    nothing here does anything). ``bind(nursery)`` gives the bridge sessions a home."""

    def __init__(self, config: ServerConfig | None = None, *, tls: bool = False) -> None:
        config = config or ServerConfig()
        self.config = config
        self.tls = tls  # the server's port speaks TLS
        self.peers: Peers | None = None
        self.secret: bytes | None = None
        self.lsock = None  # the node listener (config.node_listen), while it is open
        self.port: int | None = None  # ... and its port
        self.keys = BridgeKeys()
        self.links: dict[tuple[str, str], _Link] = {}
        self.incoming: set[Session] = set()  # bridge sessions other nodes opened to us
        self.opened = 0  # bridge sessions opened (outgoing), for tests and metrics
        self.carried = 0  # requests handed to a bridge session
        self._nursery: trio.Nursery | None = None
        self._down: dict[str, float] = {}  # url -> until when it is skipped
        self._failing: dict[str, str] = {}  # url -> the error logged for it (once per peer)
        self._peers_error = ""

    # -- the node listener: the server's front door on a port of this node's own ----------------
    @property
    def plain(self) -> bool:
        """A node listener on loopback speaks plain WebSocket even when the main port speaks
        TLS: only this host reaches it, and its URL names no host a certificate could cover."""
        listen = self.config.node_listen
        return not self.tls or (listen is not None and listen[0] in ("127.0.0.1", "::1", "localhost"))

    @property
    def url(self) -> str:
        """Where other nodes reach this one: --node-url, else the node listener (workers of one
        host: it is on loopback), else "" (not reachable: a lone server)."""
        if self.config.node_url:
            return self.config.node_url
        if self.port is None or self.config.node_listen is None:
            return ""
        host = self.config.node_listen[0]
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"{'ws' if self.plain else 'wss'}://{hostport(host, self.port)}"

    def listen(self) -> None:
        if self.config.node_listen is not None:
            host, port = self.config.node_listen
            self.lsock = listen_on(host, port, "other nodes (node bridges)")
            self.port = self.lsock.getsockname()[1]

    def serve_listener(self, nursery: trio.Nursery, handle) -> None:
        """Accept on the node listener with the server's front door (``handle``)."""
        if self.lsock is not None:
            log.info("node listener on %s (where other nodes reach this one's providers)", self.url)
            nursery.start_soon(accept_loop, self.lsock, partial(handle, plain=self.plain), nursery,
                               log, "node connection")

    def close_listener(self) -> None:
        close_socket(self.lsock)

    def listeners(self) -> list[tuple[str, int]]:
        """The node listener's address, among the server's own (tunnel users may not dial it)."""
        if self.port is None or self.config.node_listen is None:
            return []
        return [(self.config.node_listen[0], self.port)]

    @property
    def active(self) -> bool:
        return self.peers is not None and bool(self.secret) and self._nursery is not None

    def bind(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery

    # -- incoming ---------------------------------------------------------------------------
    def recognise(self, token: str, reverse_tokens: Iterable[str]) -> str | None:
        return self.keys.recognise(self.secret, token, reverse_tokens)

    # -- outgoing ---------------------------------------------------------------------------
    async def wait_pick(self, pool: SessionPool, token: str, timeout: float):
        """A session to carry a new channel of reverse token ``token``: a local provider's
        (``pool``) when there is one, else a bridge to a node the peers name; waiting up to
        ``timeout`` seconds for either. None when nothing can carry it: no provider appeared
        anywhere in time, or the nodes named could not be reached (that fails at once)."""
        session = pool.pick()
        if session is not None:
            return session
        if not self.active:
            return await pool.wait_pick(timeout)
        deadline = trio.current_time() + timeout
        while True:
            urls = self._elsewhere(token)
            if urls:
                left = deadline - trio.current_time()
                session = await self.carrier(token, urls, min(CONNECT_TIMEOUT, max(left, 0.5)))
                if session is not None:
                    self.carried += 1
                return session
            left = deadline - trio.current_time()
            if left <= 0:
                return None
            session = await pool.wait_pick(min(left, RECHECK))
            if session is not None:
                return session

    def _elsewhere(self, token: str) -> list[str]:
        try:
            urls = list(self.peers.providers_elsewhere(token)) if self.peers is not None else []
        except Exception as exc:  # the plane's view is unavailable: no bridges for now
            if repr(exc) != self._peers_error:
                self._peers_error = repr(exc)
                log.warning("node bridges: cannot ask where providers are: %r", exc)
            return []
        own = self.url
        return [url for url in urls if url and url != own]

    async def carrier(self, token: str, urls: list[str], timeout: float) -> Session | None:
        """A bridge session for ``token`` to the first of ``urls`` that works, or None."""
        for url in urls:
            if self._down.get(url, 0.0) > trio.current_time():
                continue
            session = await self._session_for(url, token, timeout)
            if session is not None:
                return session
        return None

    async def _session_for(self, url: str, token: str, timeout: float) -> Session | None:
        now = trio.current_time()
        key = (url, token)
        link = self.links.get(key)
        if link is not None and _usable(link.session, now):
            link.last_used = now
            return link.session
        if link is None:
            if len(self.links) >= MAX_LINKS:
                self._note_failure(url, f"too many bridge sessions ({MAX_LINKS})")
                return None
            link = self.links[key] = _Link(url, token)
        if link.waiters >= MAX_WAITERS:
            return None
        if link.opening is None and not _usable(link.session, now):
            link.opening = trio.Event()
            self._nursery.start_soon(self._run_link, link, timeout)
        opening = link.opening
        if opening is not None:
            link.waiters += 1
            try:
                with trio.move_on_after(timeout):
                    await opening.wait()
            finally:
                link.waiters -= 1
        now = trio.current_time()
        if _usable(link.session, now):
            link.last_used = now
            return link.session
        return None

    async def _run_link(self, link: _Link, timeout: float) -> None:
        """Open the bridge session of ``link``, then serve it until it fails or idles out."""
        try:
            session = await self._open(link, timeout)
        finally:
            event, link.opening = link.opening, None
            if event is not None:
                event.set()
        if session is None:
            if self.links.get((link.url, link.token)) is link and link.session is None:
                del self.links[(link.url, link.token)]
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_idle, link, session)
                try:
                    await session.run()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug: this bridge session ends, the node goes on
            report(f"{session}", exc)
        finally:
            if link.session is session:
                link.session = None
            if (self.links.get((link.url, link.token)) is link and link.session is None
                    and link.opening is None):
                del self.links[(link.url, link.token)]
            reason = session.close_reason or "closed"
            if reason not in ("idle", "shutting down"):
                self._note_failure(link.url, f"bridge session lost: {reason}")
            else:
                log.debug("%s closed: %s", session, reason)

    async def _open(self, link: _Link, timeout: float) -> Session | None:
        secret = self.secret
        if not secret:
            return None
        cfg = self.config
        client = Client(ClientConfig(
            url=link.url, token=bridge_token(secret, link.token), reconnect=False,
            dial_timeout=timeout, window=cfg.window, max_message=cfg.max_message,
            ping_interval=cfg.ping_interval, idle_timeout=cfg.idle_timeout, env_proxy=False))
        try:
            with trio.fail_after(timeout):
                session = await client.connect()
        except (*PEER_ERRORS, HandshakeError, ProtocolError, MessageError, AuthError) as exc:
            self._down[link.url] = trio.current_time() + DOWN_HOLD
            self._note_failure(link.url, describe_failure(exc))
            return None
        except Exception as exc:  # a bug
            self._down[link.url] = trio.current_time() + DOWN_HOLD
            report(f"opening a bridge to {link.url}", exc)
            return None
        session.name = f"bridge to {link.url}"
        self._down.pop(link.url, None)
        self.opened += 1
        if self._failing.pop(link.url, None) is not None:
            log.info("node bridge to %s works again", link.url)
        else:
            log.debug("%s open", session)
        link.session = session
        link.last_used = trio.current_time()
        return session

    async def _close_when_idle(self, link: _Link, session: Session) -> None:
        while True:
            await trio.sleep(min(IDLE_CHECK, IDLE_CLOSE))
            now = trio.current_time()
            if session.channels:
                link.last_used = now
            elif now - link.last_used >= IDLE_CLOSE:
                session.close(1000, "idle")
                return

    def sessions(self) -> list[Session]:
        """Bridge sessions of this node, both ways: channels a graceful stop waits for."""
        out = [link.session for link in list(self.links.values()) if link.session is not None]
        return out + list(self.incoming)

    def _note_failure(self, url: str, error: str) -> None:
        """Log a peer's trouble once, until it works again (not once per channel)."""
        if len(self._failing) >= 4 * MAX_LINKS:  # URLs of nodes long gone (restarted workers)
            now = trio.current_time()
            self._failing.clear()
            self._down = {u: t for u, t in self._down.items() if t > now}
        if self._failing.get(url) is None:
            log.warning("node bridge to %s: %s (channels for its providers fail meanwhile)",
                        url, error)
        self._failing[url] = error
