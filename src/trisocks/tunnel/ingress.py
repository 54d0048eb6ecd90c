"""Ingress: where traffic enters. SOCKS5 requests become channels over a pool of sessions.

A forward-mode client (its SOCKS5 port, its connections to the server), a
reverse-mode server (one SOCKS5 port per reverse token, its providers) and a
connector all do this: pick a session, send Connect, wait for the answer,
reply to the SOCKS5 program, relay. With fast open the SOCKS5 program hears
"succeeded" at once and its first bytes travel with the Connect; a failure
that comes back later closes the channel.

A SOCKS5 client may go away at any moment, and browsers reset (SO_LINGER 0) a tab's
connections as it closes, often between the request and our reply. Every write to the
SOCKS5 socket here treats a refused write as "this connection is over": the channel is
closed and the far end is told with Disconnect, nothing is raised.
"""

from __future__ import annotations

import logging

import trio

from ..net.channel import Channel
from ..net.transport import send_quietly, sock_sendall
from ..wire import protocol, socks5
from .pool import SessionPool

log = logging.getLogger("trisocks.ingress")


class Ingress:
    def __init__(self, pool: SessionPool, *, wait_timeout: float, connect_timeout: float = 20.0,
                 fast_open: bool = False, udp_idle_timeout: float = 60.0,
                 name: str = "SOCKS5") -> None:
        self.pool = pool
        # how a request waits for a session when none is ready: the pool's own, or on a
        # server of a cluster also a bridge to another node's providers (nodes.py)
        self.wait_carrier = pool.wait_pick
        self.udp_idle_timeout = udp_idle_timeout
        self.wait_timeout = wait_timeout  # for a session to appear (reconnects, no provider yet)
        self.connect_timeout = connect_timeout  # for the peer's ConnectResponse
        self.fast_open = fast_open
        self.name = name
        self.opened = 0
        self.failed = 0
        self.events = _no_events  # the server's hook: policy_refused for limits of an account

    def _refused(self, account, sock, request: socks5.Request, reason: str) -> None:
        log.info("%s: request for %s:%d refused: %s", self.name, request.host, request.port,
                 reason)
        if reason.startswith("not allowed"):  # a policy limit, not disabled/expired/quota
            peer = _peer_of(sock)
            self.events("policy_refused", account=account, peer=peer,
                        target=f"{request.host}:{request.port}", reason=reason)

    async def _carrier(self, sock, request: socks5.Request, account):
        """The session to carry a request once the account admits it; None after replying
        to the SOCKS5 client with why not."""
        refused = account.admit() if account is not None else None
        if refused:
            self._refused(account, sock, request, refused)
            await _send_reply(sock, socks5.NOT_ALLOWED)
            return None
        session = await self.wait_carrier(self.wait_timeout)
        if session is None:
            self.failed += 1
            log.info("%s: no connection to carry a request for %s:%d", self.name, request.host,
                     request.port)
            await _send_reply(sock, socks5.NETWORK_UNREACHABLE)
        return session

    async def on_connect(self, sock, request: socks5.Request, early: bytes, account=None) -> None:
        session = await self._carrier(sock, request, account)
        if session is None:
            return
        ch = session.open_channel(f"{request.host}:{request.port}", account)
        try:
            if self.fast_open:
                await self._relay_fast(session, ch, sock, request, early)
            else:
                await self._relay(session, ch, sock, request, early)
        except trio.ClosedResourceError:
            pass  # the session ended under us; the channel was aborted with it
        except OSError as exc:  # the SOCKS5 client is gone: end the channel at both ends
            log.debug("%s: %r: the SOCKS5 client went away: %s", self.name, ch, exc)
            ch.fail(_reason(exc))
        finally:
            ch.finish()

    async def on_udp(self, sock, request: socks5.Request, early: bytes, account=None) -> None:
        """SOCKS5 UDP ASSOCIATE: a UDP relay next to this TCP connection, for as long as it lasts."""
        from ..net.udp import associate

        session = await self._carrier(sock, request, account)
        if session is None:
            return
        try:
            await associate(session, sock, request, connect_timeout=self.connect_timeout,
                            idle_timeout=self.udp_idle_timeout, account=account)
        except trio.ClosedResourceError:
            pass

    async def _relay(self, session, ch: Channel, sock, request, early: bytes) -> None:
        session.send(protocol.Connect(protocol.TCP, ch.id, request.host, request.port))
        resp = await ch.wait_response(self.connect_timeout)
        if resp is None or not resp.success:
            self.failed += 1
            if resp is None:
                alive = not session.closed.is_set() and not session.close_reason
                code = socks5.TTL_EXPIRED if alive else socks5.NETWORK_UNREACHABLE
                session.send_if_open(protocol.Disconnect(ch.id, "connect timeout"))
            else:
                code = socks5.reply_for_error_text(resp.error)
            log.debug("%s: CONNECT %s failed: %s", self.name, ch.target,
                      resp.error if resp else "no answer")
            await _send_reply(sock, code)
            return
        self.opened += 1
        await sock_sendall(sock, socks5.reply(socks5.SUCCEEDED))  # OSError: on_connect ends it
        ch.attach(sock)
        if early:
            await ch.send_early(early)
        await ch.run()

    async def _relay_fast(self, session, ch: Channel, sock, request, early: bytes) -> None:
        session.send(protocol.Connect(protocol.TCP, ch.id, request.host, request.port))
        await sock_sendall(sock, socks5.reply(socks5.SUCCEEDED))
        ch.attach(sock)
        if early:
            await ch.send_early(early)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_response, ch, nursery.cancel_scope)
            await ch.run()
            nursery.cancel_scope.cancel()

    async def _watch_response(self, ch: Channel, scope: trio.CancelScope) -> None:
        resp = await ch.wait_response(self.connect_timeout)
        if resp is not None and resp.success:
            self.opened += 1
            return
        self.failed += 1
        log.debug("%s: fast-open CONNECT %s failed: %s", self.name, ch.target,
                  resp.error if resp else "no answer")
        ch.fail(resp.error if resp else "connect timeout")


async def _send_reply(sock, code: int) -> None:
    """A failure reply; the connection closes after it anyway, so a refused write is no news."""
    await send_quietly(sock, socks5.reply(code))


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc) or "connection lost").lower()


def _no_events(kind: str, **fields) -> None:
    pass


def _peer_of(sock) -> str | None:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError, TypeError):
        return None
    return f"{host}:{port}"
