"""A SOCKS5 listener on Trio: the handshake here, what a request leads to elsewhere.

The client (forward mode) and the server (reverse mode) both run one. The
handshake (greeting, optional RFC 1929 username/password, request) uses the
sans-IO parsers in :mod:`trisocks.wire.socks5`; the CONNECT (and later UDP
ASSOCIATE) handler is the role's. A malformed or slow handshake closes only
that connection.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import trio

from ..net.transport import accept_loop, bind_tcp, close_socket, recv_parsed, send_quietly, sock_sendall
from ..wire import socks5
from ..wire.names import hostport
from .throttle import FailureLimiter

log = logging.getLogger("trisocks.socks")

HANDSHAKE_TIMEOUT = 10.0

# on_connect(sock, request, early_bytes, account): account is what the credentials check
# returned when it was an account object, else None.
ConnectHandler = Callable[[object, socks5.Request, bytes, object], Awaitable[None]]


def _raw(value: str | bytes) -> bytes:
    # surrogateescape: a credential given on a command line in another encoding is its bytes
    return value if isinstance(value, bytes) else value.encode(errors="surrogateescape")


class Credentials:
    """One username/password pair, compared as bytes (RFC 1929 credentials are bytes) in
    constant time.

    Anything with a ``check(username, password)`` method can stand in for it: the
    result is falsy to refuse, ``True`` to accept, or an account object to accept
    and meter the connection's channels to (management-plane users). It gets bytes
    when its ``accepts_bytes`` attribute is true, else text (credentials that are not
    UTF-8 then fail without being checked). One whose ``optional`` attribute is true
    also accepts clients that offer no authentication; clients that offer
    username/password are still checked.
    """

    accepts_bytes = True

    def __init__(self, username: str | bytes, password: str | bytes) -> None:
        self.username = _raw(username)
        self.password = _raw(password)

    def check(self, username: str | bytes, password: str | bytes) -> bool:
        ok_user = hmac.compare_digest(self.username, _raw(username))
        ok_pass = hmac.compare_digest(self.password, _raw(password))
        return ok_user and ok_pass


def grant_for(credentials, username: bytes, password: bytes):
    """What ``credentials.check`` says about these bytes; False for text it cannot take."""
    if getattr(credentials, "accepts_bytes", False):
        return credentials.check(username, password)
    try:
        user, pw = username.decode(), password.decode()
    except UnicodeDecodeError:
        return False  # no configured (text) credential is made of these bytes
    return credentials.check(user, pw)


class SocksServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_connect: ConnectHandler,
        credentials: Credentials | None = None,
        on_udp: ConnectHandler | None = None,
        name: str = "SOCKS5",
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_connect = on_connect
        self.on_udp = on_udp
        self.credentials = credentials
        self.name = name
        # wrong username/password per client address, as for tunnel tokens: a guesser is
        # answered "failure" without a check once it passed the limit
        self.limiter = limiter or FailureLimiter()
        self.connections = 0
        self.failures = 0
        self._lsock = None

    def bind(self) -> int:
        """Take the port now (connections are refused until :meth:`serve`); returns it."""
        if self._lsock is None:
            try:
                self._lsock = bind_tcp(self.host, self.port)
            except OSError as exc:
                where = hostport(self.host, self.port)
                raise OSError(exc.errno, f"cannot listen on {where} for {self.name}: "
                              f"{(exc.strerror or str(exc)).lower()}") from None
            self.port = self._lsock.getsockname()[1]
        return self.port

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        lsock = self._lsock
        try:
            lsock.listen(4096)
            task_status.started(self.port)
            async with trio.open_nursery() as nursery:
                await accept_loop(lsock, self._handle, nursery, log, f"{self.name} connection")
        finally:
            self.close()

    def close(self) -> None:
        close_socket(self._lsock)

    async def _handle(self, sock, addr) -> None:
        self.connections += 1
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    request, early, account = await self._handshake(sock, _ip(addr))
            except socks5.Socks5Error as exc:
                self.failures += 1
                log.debug("%s handshake from %s refused: %s", self.name, _fmt(addr), exc)
                if exc.reply is not None:
                    await send_quietly(sock, socks5.reply(exc.reply))
                return
            except (trio.TooSlowError, EOFError, OSError) as exc:
                self.failures += 1
                log.debug("%s handshake from %s failed: %s", self.name, _fmt(addr), exc or "timeout")
                return
            if request is None:
                return
            try:
                await self._dispatch(sock, request, early, account)
            except OSError as exc:  # the client reset or went away: its connection is over
                log.debug("%s connection from %s ended: %s", self.name, _fmt(addr), exc)
        finally:
            close_socket(sock)

    async def _dispatch(self, sock, request: socks5.Request, early: bytes, account) -> None:
        if request.command == socks5.CMD_CONNECT:
            await self.on_connect(sock, request, early, account)
        elif request.command == socks5.CMD_UDP_ASSOCIATE and self.on_udp is not None:
            await self.on_udp(sock, request, early, account)
        else:
            await send_quietly(sock, socks5.reply(socks5.COMMAND_NOT_SUPPORTED))

    async def _handshake(self, sock, ip: str) -> tuple[socks5.Request | None, bytes, object]:
        buf = bytearray()

        def read(parse):
            return recv_parsed(sock, buf, parse, _closed_early)

        (methods,) = await read(socks5.parse_greeting)
        method = socks5.choose_method(methods, self.credentials is not None)
        if method == socks5.NO_ACCEPTABLE and getattr(self.credentials, "optional", False):
            method = socks5.choose_method(methods, False)  # credentials optional: no-auth is fine too
        await sock_sendall(sock, socks5.method_reply(method))
        account = None
        if method == socks5.NO_ACCEPTABLE:
            log.debug("%s: client offered no acceptable auth method", self.name)
            return None, b"", None
        if method == socks5.USERPASS:
            username, password = await read(socks5.parse_userpass)
            grant = self._authenticate(ip, username, password)
            await sock_sendall(sock, socks5.userpass_reply(bool(grant)))
            if not grant:
                return None, b"", None
            if grant is not True:
                account = grant
        (request,) = await read(socks5.parse_request)
        return request, bytes(buf), account

    def _authenticate(self, ip: str, username: bytes, password: bytes):
        """The credentials' verdict, unless this address failed too often lately (then False
        without asking: a throttled guesser learns nothing)."""
        limiter = self.limiter
        if limiter.retry_after(ip):
            log.debug("%s: %s is throttled after failed logins; refused unchecked", self.name, ip)
            return False
        grant = grant_for(self.credentials, username, password) if self.credentials else None
        if grant:
            limiter.succeeded(ip)
            return grant
        limiter.failed(ip)
        wait = limiter.retry_after(ip)
        if wait:
            log.warning("%s: %s is refused for %d s after repeated wrong usernames or passwords",
                        self.name, ip, wait)
        else:
            log.warning("%s: wrong username or password from %s", self.name, ip)
        return False


def _closed_early() -> EOFError:
    return EOFError("client closed during the SOCKS5 handshake")


def _ip(addr) -> str:
    try:
        return str(addr[0])
    except (TypeError, IndexError):
        return str(addr)


def _fmt(addr) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)
