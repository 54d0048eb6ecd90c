"""Egress: where traffic leaves. The peer sends Connect, we dial the target and relay.

A forward-mode server and a provider (reverse mode) do the same job, so both
use :class:`Egress` as their session handler. TCP channels are dialed with
the configured dialer (direct, or through an upstream proxy); UDP channels
get a socket of their own (see :mod:`trisocks.udp`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from . import protocol, socks5
from .channel import OPENING, Channel
from .dial import dial_tcp
from .session import Handler, Session
from .transport import close_socket

log = logging.getLogger("trisocks.egress")

# dialer(host, port, timeout) -> (connected socket, bytes the target already sent)
Dialer = Callable[[str, int, float], Awaitable[tuple[object, bytes]]]


async def direct_dialer(host: str, port: int, timeout: float):
    return await dial_tcp(host, port, timeout=timeout), b""


def proxy_dialer(proxy) -> Dialer:
    """Reach every target through an upstream SOCKS5 or HTTP CONNECT proxy."""
    from .upstream import open_via

    async def dial(host: str, port: int, timeout: float):
        return await open_via(proxy, host, port, timeout=timeout)

    return dial


class Egress(Handler):
    def __init__(self, *, dialer: Dialer = direct_dialer, connect_timeout: float = 10.0,
                 udp_idle_timeout: float = 60.0) -> None:
        self.dialer = dialer
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.channels_opened = 0
        self.dial_failures = 0

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        refused = session.refuse_reason()
        if refused:
            session.send(protocol.ConnectResponse(False, msg.channel, refused))
            return
        if msg.protocol == protocol.TCP:
            ch = session.accept_channel(msg.channel, f"{msg.address}:{msg.port}")
            if ch is not None:
                session.spawn(self._dial_and_relay, session, ch, msg, unit=f"dial {ch.target}")
        else:
            from .udp import UdpEgress

            UdpEgress.start(session, msg.channel, idle_timeout=self.udp_idle_timeout)

    async def _dial_and_relay(self, session: Session, ch: Channel, msg: protocol.Connect) -> None:
        try:
            try:
                sock, early = await self.dialer(msg.address, msg.port, self.connect_timeout)
            except (OSError, trio.TooSlowError) as exc:
                self.dial_failures += 1
                code = socks5.reply_for_exception(exc)
                log.debug("%s: connect to %s failed: %s", session, ch.target, exc or "timeout")
                session.send_if_open(protocol.ConnectResponse(False, ch.id, socks5.error_text(code)))
                return
            if ch.state != OPENING:  # the peer gave up while we were dialing
                close_socket(sock)
                return
            self.channels_opened += 1
            session.send(protocol.ConnectResponse(True, ch.id))
            ch.attach(sock)
            if early:
                await ch.send_early(early)
            await ch.run()
        except trio.ClosedResourceError:
            pass
        finally:
            ch.finish()
