"""A fast HTTP/1.1 payload server for end-to-end tests, and its byte generator.

``GET /bytes/<n>?seed=<s>``  n deterministic pseudo-random bytes (see :func:`payload_chunks`)
``POST|PUT /upload``         reads the whole body (Content-Length or chunked) and answers
                             JSON ``{"length": N, "sha256": "..."}``
``GET /``                    a small text page (:data:`INDEX_BODY`)

Every response carries ``Connection: close``. Bodies are sent as large memoryview slices of a
pre-generated random pool, so one thread pushes hundreds of MB/s over loopback, and the expected
sha256 of any ``/bytes`` response is computed locally by :func:`payload_sha256` without the
network. Bind it to 127.0.0.1 (or ::1) on port 0 and read the port back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Self
from urllib.parse import parse_qs, urlsplit

INDEX_BODY = b"trisocks test payload server\n"

# The byte stream for (n, seed) is a sequence of SEGMENT-sized windows into a random pool, each
# window starting at a different offset, so that the stream is not periodic: swapped, repeated
# or dropped chunks inside a tunnel change the digest.
_POOL_SIZE = (8 << 20) + 4093
SEGMENT = 256 << 10
_STEP = 1_000_003  # odd and larger than SEGMENT: consecutive windows start far apart


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> memoryview:
    return memoryview(random.Random(seed).randbytes(_POOL_SIZE))


def payload_chunks(n: int, seed: int = 0) -> Iterator[memoryview]:
    """The bytes of ``GET /bytes/<n>?seed=<seed>`` as zero-copy memoryview chunks."""
    if n < 0:
        raise ValueError("n must be >= 0")
    pool = _pool(seed)
    span = _POOL_SIZE - SEGMENT
    index = 0
    left = n
    while left > 0:
        start = (index * _STEP + seed * 7919) % span
        size = min(SEGMENT, left)
        yield pool[start:start + size]
        left -= size
        index += 1


def payload_bytes(n: int, seed: int = 0) -> bytes:
    return b"".join(payload_chunks(n, seed))


def payload_sha256(n: int, seed: int = 0) -> str:
    """sha256 hex of ``GET /bytes/<n>?seed=<seed>``, computed without the network."""
    h = hashlib.sha256()
    for chunk in payload_chunks(n, seed):
        h.update(chunk)
    return h.hexdigest()


def write_payload_file(path, n: int, seed: int = 0) -> str:
    """Write the payload for (n, seed) to ``path``; returns its sha256 hex."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in payload_chunks(n, seed):
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


# -- server ------------------------------------------------------------------------------

_RECV_BUF = 1 << 20
_MAX_HEAD = 64 << 10


class _BadRequest(Exception):
    pass


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb", buffering=_RECV_BUF)
        try:
            try:
                method, target, headers = self._read_head(reader)
            except _BadRequest as exc:
                self._respond(sock, 400, "text/plain", str(exc).encode() + b"\n")
                return
            if method is None:
                return
            self.server.requests.append((method, target))
            path = urlsplit(target).path
            if method == "GET" and path.startswith("/bytes/"):
                self._bytes(sock, target)
            elif method in ("POST", "PUT") and path == "/upload":
                self._upload(sock, reader, headers)
            elif method == "GET" and path == "/":
                self._respond(sock, 200, "text/plain", INDEX_BODY)
            else:
                self._respond(sock, 404, "text/plain", b"not found\n")
        except (OSError, _BadRequest):
            pass  # the client went away or sent nonsense; nothing to tell anyone
        finally:
            try:
                reader.close()
            except OSError:
                pass

    # -- parsing ----------------------------------------------------------------------
    @staticmethod
    def _read_head(reader) -> tuple[str | None, str, dict[str, str]]:
        line = reader.readline(_MAX_HEAD)
        if not line:
            return None, "", {}
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest("bad request line")
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = reader.readline(_MAX_HEAD)
            size += len(line)
            if not line or size > _MAX_HEAD:
                raise _BadRequest("truncated or oversized header")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        return parts[0].upper(), parts[1], headers

    # -- endpoints --------------------------------------------------------------------
    def _bytes(self, sock: socket.socket, target: str) -> None:
        parts = urlsplit(target)
        try:
            n = int(parts.path[len("/bytes/"):])
            seed = int(parse_qs(parts.query).get("seed", ["0"])[0])
            if n < 0:
                raise ValueError
        except ValueError:
            self._respond(sock, 400, "text/plain", b"bad size or seed\n")
            return
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {n}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        sock.sendall(head)
        for chunk in payload_chunks(n, seed):
            sock.sendall(chunk)

    def _upload(self, sock: socket.socket, reader, headers: dict[str, str]) -> None:
        if headers.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        h = hashlib.sha256()
        buf = bytearray(_RECV_BUF)
        view = memoryview(buf)
        total = 0

        def read_exactly(count: int) -> None:
            nonlocal total
            while count > 0:
                got = reader.readinto(view[:min(count, _RECV_BUF)])
                if not got:
                    raise _BadRequest("body ended early")
                h.update(view[:got])
                total += got
                count -= got

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = reader.readline(1024)
                if not size_line:
                    raise _BadRequest("chunked body ended early")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while reader.readline(_MAX_HEAD) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                read_exactly(size)
                if reader.readline(8) not in (b"\r\n", b"\n"):
                    raise _BadRequest("bad chunk terminator")
        else:
            read_exactly(int(headers.get("content-length", "0")))
        body = json.dumps({"length": total, "sha256": h.hexdigest()}).encode()
        self.server.uploads.append((total, h.hexdigest()))
        self._respond(sock, 200, "application/json", body)

    @staticmethod
    def _respond(sock: socket.socket, status: int, ctype: str, body: bytes) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        sock.sendall(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, host: str, family: int) -> None:
        self.address_family = family
        self.requests: list[tuple[str, str]] = []
        self.uploads: list[tuple[int, str]] = []
        super().__init__((host, 0), _Handler)


class PayloadServer:
    """The payload server in a background thread. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self._server = _TCPServer(host, family)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"payload-server-{self.port}", daemon=True)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request received so far."""
        return self._server.requests

    @property
    def uploads(self) -> list[tuple[int, str]]:
        """(length, sha256) of every upload received so far."""
        return self._server.uploads

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        """URL of ``path``; ``host`` overrides the host part (e.g. ``localhost``)."""
        if host is None:
            netloc = self.netloc
        else:
            netloc = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        return f"http://{netloc}{path}"

    def bytes_url(self, n: int, seed: int = 0, host: str | None = None) -> str:
        return self.url(f"/bytes/{n}?seed={seed}", host)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
