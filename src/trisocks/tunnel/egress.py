"""Egress: where traffic leaves. The peer sends Connect, we dial the target and relay.

A forward-mode server and a provider (reverse mode) do the same job, so both
use :class:`Egress` as their session handler. TCP channels are dialed with
the configured dialer (direct, or through an upstream proxy); UDP channels
get a socket of their own (see :mod:`trisocks.net.udp`).

The target comes from a peer: its host is checked (:func:`trisocks.wire.names.host_error`)
before anything resolves it, a dial may fail in any way a bad host allows without
costing more than that channel, and a direct dial never leads back into this process
(``own_listeners``: the management API must not see a tunnel user as a local caller).

Destination rules (trisocks.policy.chain) are checked on every address a dial would try,
after name resolution, and on every UDP datagram's destination; a refusal is the
ConnectResponse "not allowed by ruleset" (SOCKS5 reply 0x02), an event and a counter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..net.channel import OPENING, Channel
from ..net.dial import Refused, dial_tcp, is_own_listener, literal_family, resolve
from ..net.session import Handler, Session
from ..net.transport import close_socket
from ..policy.chain import DENIED, denial, levels_for
from ..wire import protocol, socks5
from ..wire.names import host_error, ip_of

log = logging.getLogger("trisocks.egress")

# Dials in progress in this process, all sessions together. Each holds a socket (and maybe a
# resolver thread's turn) for up to the connect timeout; past this, a Connect is refused at
# once rather than queued, so a flood of Connects to black-holed targets cannot take every
# file descriptor while established channels go on.
MAX_PENDING_DIALS = 1024
TOO_MANY_DIALS = "too many pending connections"

# dialer(host, port, timeout) -> (connected socket, bytes the target already sent)
Dialer = Callable[[str, int, float], Awaitable[tuple[object, bytes]]]
Listeners = Callable[[], Iterable[tuple[str, int]]]


class _Pending:
    dials = 0  # per process: a class attribute, shared by every Egress


async def direct_dialer(host: str, port: int, timeout: float, refuse=None):
    return await dial_tcp(host, port, timeout=timeout, refuse=refuse), b""


def _no_events(kind: str, **fields) -> None:
    pass


def proxy_dialer(proxy) -> Dialer:
    """Reach every target through an upstream SOCKS5 or HTTP CONNECT proxy."""
    from ..net.upstream import open_via

    async def dial(host: str, port: int, timeout: float):
        return await open_via(proxy, host, port, timeout=timeout)

    return dial


class Egress(Handler):
    def __init__(self, *, dialer: Dialer = direct_dialer, connect_timeout: float = 10.0,
                 udp_idle_timeout: float = 60.0, own_listeners: Listeners | None = None) -> None:
        self.dialer = dialer
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        # () -> (host, port) pairs this process listens on (host may be a wildcard): targets
        # that reach one of them are refused, checked after name resolution
        self.own_listeners = own_listeners
        self.channels_opened = 0
        self.dial_failures = 0
        self.rules = None  # the server's --allow/--deny RuleSet (None: none)
        self.events = _no_events  # the server's events hook: policy_refused
        self.refused = 0  # connections and datagrams refused by a rule

    def rule_check(self, account, name: str | None, port: int, proto: str):
        """refuse(sockaddr) -> the refusal text or None, for the destinations of one
        connection (``name``: the host name asked for, None for an IP literal)."""
        levels = levels_for(account, self.rules)
        listeners = self.own_listeners

        def own(ip, port: int) -> bool:
            return listeners is not None and is_own_listener((str(ip), port), listeners())

        def refuse(sockaddr) -> str | None:
            rule = denial(levels, ip_of(str(sockaddr[0])), port, proto, name, own)
            return None if rule is None else f"{DENIED} ({rule.text})"

        return refuse

    def note_refusal(self, session: Session, account, target: str, reason: str) -> None:
        self.refused += 1
        log.info("%s: %s refused: %s", session, target, reason)
        self.events("policy_refused", account=account, peer=session.peer or None,
                    target=target, reason=reason)

    def on_connect(self, session: Session, msg: protocol.Connect) -> None:
        refused = session.refuse_reason()
        if refused is None and msg.protocol == protocol.TCP:
            refused = host_error(msg.address)
            if refused is None and _Pending.dials >= MAX_PENDING_DIALS:
                refused = TOO_MANY_DIALS
        if refused:
            log.debug("%s: Connect to %r refused: %s", session, msg.address, refused)
            if refused.startswith("not allowed"):  # a limit of the account's policy
                self.events("policy_refused", account=session.account, peer=session.peer or None,
                            target=f"{msg.address}:{msg.port}", reason=refused)
            session.send(protocol.ConnectResponse(False, msg.channel, refused))
            return
        if msg.protocol == protocol.TCP:
            ch = session.accept_channel(msg.channel, f"{msg.address}:{msg.port}")
            if ch is not None:
                _Pending.dials += 1  # counted now: one read may bring many Connects at once
                session.spawn(self._dial_and_relay, session, ch, msg, unit=f"dial {ch.target}")
        else:
            from ..net.udp import UdpEgress

            UdpEgress.start(session, msg.channel, idle_timeout=self.udp_idle_timeout,
                            rules=self._udp_rules(session))

    def _udp_rules(self, session: Session):
        """check(name, sockaddr) -> refusal text or None, for each datagram's destination."""
        account = session.account
        reported: set = set()  # one event per destination and association: a flood stays small

        def check(name: str | None, sockaddr) -> str | None:
            reason = self.rule_check(account, name, sockaddr[1], "udp")(sockaddr)
            if reason:
                target = f"udp {name or sockaddr[0]}:{sockaddr[1]}"
                if target in reported or len(reported) >= 64:
                    self.refused += 1
                else:
                    reported.add(target)
                    self.note_refusal(session, account, target, reason)
            return reason

        return check

    async def _dial(self, host: str, port: int, account=None):
        """Dial (the pending count was taken by on_connect and is given back here)."""
        try:
            name = None if literal_family(host.strip("[]")) else host
            refuse = self.rule_check(account, name, port, "tcp")
            if self.dialer is direct_dialer:
                return await direct_dialer(host, port, self.connect_timeout, refuse)
            await self._check_proxied(host, port, name, refuse)
            return await self.dialer(host, port, self.connect_timeout)
        finally:
            _Pending.dials -= 1

    async def _check_proxied(self, host: str, port: int, name: str | None, refuse) -> None:
        """Through an upstream proxy the proxy resolves names: check the name (domain rules),
        and every address our own resolver gives for it, before asking the proxy."""
        if name is None:
            addresses = [(host.strip("[]"), port)]
        else:
            try:
                addresses = [info[4] for info in await resolve(name, port)]
            except OSError:
                addresses = [("", port)]  # unknown here: only domain rules and '*' can decide
        for sockaddr in addresses:
            reason = refuse(sockaddr)
            if reason:
                raise Refused(reason)

    async def _dial_and_relay(self, session: Session, ch: Channel, msg: protocol.Connect) -> None:
        try:
            try:
                sock, early = await self._dial(msg.address, msg.port, ch.account)
            except (OSError, ValueError, trio.TooSlowError) as exc:  # ValueError: UnicodeError too
                self.dial_failures += 1
                if isinstance(exc, Refused):  # a rule (an EACCES from the network is not)
                    self.note_refusal(session, ch.account, ch.target, exc.strerror or "")
                log.debug("%s: connect to %s failed: %s", session, ch.target, exc or "timeout")
                session.send_if_open(protocol.ConnectResponse(False, ch.id, _failure_text(exc)))
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


def _failure_text(exc: BaseException) -> str:
    """The ConnectResponse error for a failed dial: our own refusal as it was worded, else
    the text of its SOCKS5 reply code (which socks5.reply_for_error_text maps back)."""
    if isinstance(exc, PermissionError) and "not allowed" in str(exc.strerror or ""):
        return exc.strerror
    return socks5.error_text(socks5.reply_for_exception(exc))
