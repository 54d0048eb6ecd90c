"""A deliberately small, independent SOCKS5 client (RFC 1928 / RFC 1929) on a blocking socket,
for tests that must see the raw bytes a proxy answers (method choice, auth status, reply code).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
NO_AUTH, USERPASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF


@dataclass
class Handshake:
    method: int | None = None  # the method the proxy chose (0xFF: none acceptable)
    auth_status: int | None = None  # RFC 1929 status (0: success)
    reply: int | None = None  # REP byte of the reply to the request
    bound: tuple[str, int] | None = None
    sock: socket.socket | None = None  # open when the request succeeded (caller closes)
    closed_early: bool = False  # the proxy closed before answering the last step


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or EOFError if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def encode_address(host: str, port: int, atyp: str | None = None) -> bytes:
    """ATYP + address + port; ``atyp`` forces "ipv4", "ipv6" or "domain"."""
    kind = atyp
    if kind is None:
        try:
            kind = "ipv4" if ipaddress.ip_address(host).version == 4 else "ipv6"
        except ValueError:
            kind = "domain"
    if kind == "ipv4":
        return b"\x01" + socket.inet_pton(socket.AF_INET, host) + struct.pack("!H", port)
    if kind == "ipv6":
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host) + struct.pack("!H", port)
    name = host.encode("idna")
    return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)


def _read_address(sock: socket.socket) -> tuple[str, int]:
    atyp = recv_exact(sock, 1)[0]
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    elif atyp == 3:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode("latin-1")
    else:
        raise ValueError(f"bad ATYP {atyp} in reply")
    return host, struct.unpack("!H", recv_exact(sock, 2))[0]


def handshake(proxy: tuple[str, int], host: str, port: int, *, command: int = CONNECT,
              methods: bytes = bytes([NO_AUTH]), username: str | None = None,
              password: str | None = None, atyp: str | None = None,
              timeout: float = 15.0, keep_open: bool = False) -> Handshake:
    """Greet, authenticate if the proxy asks for it, send ``command``, read the reply.

    Stops at the first step the proxy refuses. With ``keep_open`` and a successful reply the
    socket is returned in ``Handshake.sock`` for the caller to use and close."""
    result = Handshake()
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        sock.sendall(b"\x05" + bytes([len(methods)]) + methods)
        try:
            ver, result.method = recv_exact(sock, 2)
        except EOFError:
            result.closed_early = True
            return result
        assert ver == 5, f"method reply version {ver}"
        if result.method == NO_ACCEPTABLE:
            return result
        if result.method == USERPASS:
            user = (username or "").encode()
            pw = (password or "").encode()
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
            try:
                _ver, result.auth_status = recv_exact(sock, 2)
            except EOFError:
                result.closed_early = True
                return result
            if result.auth_status != 0:
                return result
        sock.sendall(b"\x05" + bytes([command, 0]) + encode_address(host, port, atyp))
        try:
            ver, result.reply, _rsv = recv_exact(sock, 3)
            result.bound = _read_address(sock)
        except EOFError:
            result.closed_early = True
            return result
        assert ver == 5, f"reply version {ver}"
        if keep_open and result.reply == 0:
            result.sock, sock = sock, None
        return result
    finally:
        if sock is not None:
            sock.close()


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closes ``sock`` (EOF or reset) within ``timeout`` without sending more."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def http_get(sock: socket.socket, host: str, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over an open socket (the payload server closes after replying)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body
