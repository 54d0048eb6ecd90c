"""HTTP/1.1 around the WebSocket: reading a request head, the upgrade, plain replies.

The server's front door reads one request head with h11 and decides: a
WebSocket upgrade on ``/socket`` goes to the tunnel, anything else gets a plain
HTTP answer (or, with the management API on, goes to the ASGI app). The
client side builds the upgrade request and checks the 101 answer.

trisocks peers also agree here on flow control: the client offers
``X-Trisocks-Flow: window=N`` and a trisocks server answers with its own
window. LinkSocks and pywssocks ignore the header, and never see a
WindowUpdate message.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.utilities import generate_accept_token

from .._version import __version__
from .flow import initial_window

MAX_HEAD = 16 << 10
FLOW_HEADER = "x-trisocks-flow"
_WINDOW_RE = re.compile(r"window=(\d+)")
_EOF_RE = re.compile(r"\beof=1\b")  # the peer speaks half-close (protocol.Eof)
_TLS_RECORD_TYPES = (0x15, 0x16)  # alert, handshake: what a TLS server sends to plain HTTP

_REASONS = {
    101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 426: "Upgrade Required", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}


class HandshakeError(Exception):
    """The HTTP exchange failed; ``status`` is what to answer (server) or what we got (client)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes = b""  # every byte read so far (head, and whatever followed it)
    head_len: int = 0
    peer: tuple = field(default_factory=tuple)

    @property
    def leftover(self) -> bytes:
        return self.raw[self.head_len :]

    def is_websocket(self) -> bool:
        return (
            self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )


async def read_request(transport, *, timeout: float = 10.0) -> Request | None:
    """Read one request head from a transport; None if the peer closed without a word."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    with trio.move_on_after(timeout) as scope:
        while True:
            data = await transport.recv(65536)
            if not data:
                if not raw:
                    return None
                raise HandshakeError(400, "connection closed in the middle of the request")
            raw += data
            try:
                conn.receive_data(data)
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
                raise HandshakeError(status, f"bad HTTP request: {exc}") from None
            if isinstance(event, h11.Request):
                break
    if scope.cancelled_caught:
        raise HandshakeError(408, "request head not received in time")
    end = raw.find(b"\r\n\r\n")
    head_len = end + 4 if end >= 0 else len(raw)
    if head_len > MAX_HEAD:
        raise HandshakeError(431, "request head too large")
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return Request(
        method=event.method.decode("latin-1"),
        target=target,
        path=parts.path,
        query=query,
        headers=headers,
        raw=bytes(raw),
        head_len=head_len,
    )


def response(
    status: int,
    body: bytes | str = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Server: trisocks/{__version__}"]
    if body or status not in (101, 204):
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    for k, v in headers or ():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(status: int, message: str) -> bytes:
    return response(status, message.rstrip("\n") + "\n")


def accept_websocket(req: Request, *, window: int | None) -> tuple[bytes, int | None]:
    """The 101 answer for a valid upgrade request, and the peer's flow window (None: no flow).

    Raises HandshakeError(400/426) for an unusable upgrade request.
    """
    if req.method != "GET":
        raise HandshakeError(405, "WebSocket upgrades use GET")
    if not req.is_websocket():
        raise HandshakeError(426, "this endpoint speaks WebSocket only")
    if req.headers.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(426, "unsupported WebSocket version (13 required)")
    key = req.headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError(400, "bad Sec-WebSocket-Key") from None
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", generate_accept_token(key.encode()).decode()),
    ]
    peer_window = parse_window(req.headers.get(FLOW_HEADER))
    if peer_window and window:
        eof = ", eof=1" if offers_eof(req.headers.get(FLOW_HEADER)) else ""
        headers.append(("X-Trisocks-Flow", f"window={initial_window(window)}{eof}"))
    else:
        peer_window = None
    lines = ["HTTP/1.1 101 Switching Protocols"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), peer_window


def offers_eof(value: str | None) -> bool:
    """Whether a flow header says its sender speaks half-close (only with flow control)."""
    return bool(value and _EOF_RE.search(value) and parse_window(value))


def parse_window(value: str | None) -> int | None:
    if not value:
        return None
    m = _WINDOW_RE.search(value)
    if not m:
        return None
    window = int(m.group(1))
    return window if 64 << 10 <= window <= 1 << 30 else None


# -- client side -----------------------------------------------------------------


def client_headers(host_header: str, *, window: int | None, extra=()) -> tuple[list, str]:
    """Headers of the upgrade request, and the key whose accept token the answer must carry."""
    key = base64.b64encode(os.urandom(16)).decode()
    headers = [
        ("Host", host_header),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
        ("User-Agent", f"trisocks/{__version__}"),
    ]
    if window:
        headers.append(("X-Trisocks-Flow", f"window={initial_window(window)}, eof=1"))
    headers += list(extra)
    return headers, key


async def client_handshake(transport, host_header: str, resource: str, *, window: int | None,
                           timeout: float = 15.0, extra=()) -> tuple[dict[str, str], bytes]:
    """Upgrade over ``transport``; returns the answer's headers and bytes that followed it."""
    headers, key = client_headers(host_header, window=window, extra=extra)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    await transport.send_all(conn.send(h11.Request(method="GET", target=resource, headers=headers)))
    buf = bytearray(65536)
    first = True  # a TLS server's answer starts with a TLS record header, not "HTTP/"
    with trio.move_on_after(timeout) as scope:
        while True:
            n = await transport.recv_into(memoryview(buf))
            if n == 0:
                raise HandshakeError(0, "server closed the connection during the WebSocket handshake")
            if first and n >= 2 and buf[0] in _TLS_RECORD_TYPES and buf[1] == 0x03:
                raise HandshakeError(0, "the server speaks TLS: use wss:// (it answered the "
                                     "HTTP request with a TLS record)")
            first = False
            try:
                conn.receive_data(bytes(buf[:n]))
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HandshakeError(0, f"bad HTTP answer from server: {exc}") from None
            if event is h11.NEED_DATA:
                continue
            break
    if scope.cancelled_caught:
        raise HandshakeError(0, "no WebSocket handshake answer in time")
    answer = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        status = getattr(event, "status_code", 0)
        hint = (f": nothing at {resource.split('?')[0]} there (trisocks, LinkSocks and pywssocks "
                "servers use /socket)" if status == 404 else "")
        raise HandshakeError(status, f"server refused the WebSocket upgrade (HTTP {status}){hint}")
    expected = generate_accept_token(key.encode()).decode()
    if answer.get("sec-websocket-accept") != expected:
        raise HandshakeError(101, "server sent a wrong Sec-WebSocket-Accept")
    leftover, _ = conn.trailing_data
    return answer, bytes(leftover)
