"""A SOCKS5 listener on Trio: the handshake here, what a request leads to elsewhere.

The client (forward mode) and the server (reverse mode) both run one. The
handshake (greeting, optional RFC 1929 username/password, request) uses the
sans-IO parsers in :mod:`trisocks.socks5`; the CONNECT (and later UDP
ASSOCIATE) handler is the role's. A malformed or slow handshake closes only
that connection.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import trio

from . import socks5
from .transport import accept_loop, bind_tcp, close_socket, sock_recv, sock_sendall

log = logging.getLogger("trisocks.socks")

HANDSHAKE_TIMEOUT = 10.0

# on_connect(sock, request, early_bytes, account): account is what the credentials check
# returned when it was an account object, else None.
ConnectHandler = Callable[[object, socks5.Request, bytes, object], Awaitable[None]]


class Credentials:
    """One username/password pair, compared in constant time.

    Anything with a ``check(username, password)`` method can stand in for it: the
    result is falsy to refuse, ``True`` to accept, or an account object to accept
    and meter the connection's channels to (management-plane users). One whose
    ``optional`` attribute is true also accepts clients that offer no authentication;
    clients that offer username/password are still checked.
    """

    def __init__(self, username: str, password: str) -> None:
        self.username = username.encode()
        self.password = password.encode()

    def check(self, username: str, password: str):
        ok_user = hmac.compare_digest(self.username, username.encode())
        ok_pass = hmac.compare_digest(self.password, password.encode())
        return ok_user and ok_pass


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
    ) -> None:
        self.host = host
        self.port = port
        self.on_connect = on_connect
        self.on_udp = on_udp
        self.credentials = credentials
        self.name = name
        self.connections = 0
        self.failures = 0
        self._lsock = None

    def bind(self) -> int:
        """Take the port now (connections are refused until :meth:`serve`); returns it."""
        if self._lsock is None:
            try:
                self._lsock = bind_tcp(self.host, self.port)
            except OSError as exc:
                host = f"[{self.host}]" if ":" in self.host else self.host
                raise OSError(exc.errno, f"cannot listen on {host}:{self.port} for {self.name}: "
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
                    request, early, account = await self._handshake(sock)
            except socks5.Socks5Error as exc:
                self.failures += 1
                log.debug("%s handshake from %s refused: %s", self.name, _fmt(addr), exc)
                if exc.reply is not None:
                    await _try_send(sock, socks5.reply(exc.reply))
                return
            except (trio.TooSlowError, EOFError, OSError) as exc:
                self.failures += 1
                log.debug("%s handshake from %s failed: %s", self.name, _fmt(addr), exc or "timeout")
                return
            if request is None:
                return
            if request.command == socks5.CMD_CONNECT:
                await self.on_connect(sock, request, early, account)
            elif request.command == socks5.CMD_UDP_ASSOCIATE and self.on_udp is not None:
                await self.on_udp(sock, request, early, account)
            else:
                await _try_send(sock, socks5.reply(socks5.COMMAND_NOT_SUPPORTED))
        finally:
            close_socket(sock)

    async def _handshake(self, sock) -> tuple[socks5.Request | None, bytes, object]:
        buf = bytearray()

        async def read(parse):
            while True:
                result = parse(buf)
                if result is not None:
                    del buf[: result[-1]]
                    return result[:-1]
                data = await sock_recv(sock, 4096)
                if not data:
                    raise EOFError("client closed during the SOCKS5 handshake")
                buf.extend(data)

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
            grant = self.credentials.check(username, password) if self.credentials else None
            await sock_sendall(sock, socks5.userpass_reply(bool(grant)))
            if not grant:
                log.warning("%s: wrong username or password from a client", self.name)
                return None, b"", None
            if grant is not True:
                account = grant
        (request,) = await read(socks5.parse_request)
        return request, bytes(buf), account


async def _try_send(sock, data: bytes) -> None:
    try:
        await sock_sendall(sock, data)
    except OSError:
        pass


def _fmt(addr) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)
