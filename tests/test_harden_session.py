"""Sessions and channels under hostile or unlucky peers, against real processes (issue 9 rows 6-10,
issue 17 row 5).

Every test runs another user's download through the same processes while the attack goes on,
and asserts that it arrives intact, that the processes are alive, and where memory is at stake
that their RSS stays under a stated bound.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from contextlib import contextmanager

import pytest

from trisocks.wire import codec, protocol

from .support import curl, payload_sha256
from .support.peers import (
    start_pywssocks_client,
    start_pywssocks_server,
    start_trisocks_client,
    start_trisocks_provider,
    start_trisocks_reverse_server,
    start_trisocks_server,
)
from .support.socks import handshake

TOKEN = "harden-session-token"
OTHER = 24 << 20  # the other user's download


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- targets ----------------------------------------------------------------------------------

class Target:
    """A TCP server on 127.0.0.1 running ``serve(conn)`` in a thread per connection."""

    def __init__(self, serve) -> None:
        self.serve = serve
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        self.lsock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@contextmanager
def target(serve):
    t = Target(serve)
    try:
        yield t
    finally:
        t.close()


def answer_after_eof(size: int):
    """Reads the request until EOF, then answers ``size`` bytes (the request's sha256 first) and closes."""
    def serve(conn):
        digest = hashlib.sha256()
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            digest.update(data)
        conn.sendall(digest.hexdigest().encode())
        block = os.urandom(1 << 16)
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            conn.sendall(piece)
            sent += len(piece)
        conn.close()
    return serve


def answer_after(request_size: int, size: int):
    """Reads a request of known length (as an HTTP server would), then answers like answer_after_eof."""
    inner = answer_after_eof(size)

    def serve(conn):
        got = b""
        while len(got) < request_size:
            data = conn.recv(request_size - len(got))
            if not data:
                break
            got += data
        conn.shutdown(socket.SHUT_RD)
        inner(_Replay(conn, got))
    return serve


class _Replay:
    """A socket whose recv gives ``data`` once, then EOF."""

    def __init__(self, conn, data: bytes) -> None:
        self.conn, self.data = conn, data

    def recv(self, n: int) -> bytes:
        data, self.data = self.data, b""
        return data

    def sendall(self, data) -> None:
        self.conn.sendall(data)

    def close(self) -> None:
        self.conn.close()


def firehose(conn) -> None:
    block = b"x" * (1 << 16)
    while True:
        conn.sendall(block)


def idle(conn) -> None:
    while conn.recv(4096):
        pass


# -- helpers ----------------------------------------------------------------------------------

class Download(threading.Thread):
    """The other user's download, through ``socks`` (host:port), checked by sha256."""

    def __init__(self, payload_server, socks: str, size: int = OTHER, seed: int = 7) -> None:
        super().__init__(daemon=True)
        self.url = payload_server.bytes_url(size, seed=seed)
        self.socks, self.size, self.seed = socks, size, seed
        self.result = None
        self.start()

    def run(self) -> None:
        self.result = curl(self.url, socks=self.socks, timeout=60)

    def check(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the other user's download did not finish"
        r = self.result
        assert r.returncode == 0 and r.http_code == 200, f"other download failed: {r.stderr}"
        assert r.size == self.size and r.sha256 == payload_sha256(self.size, self.seed)


def socks_open(port: int, host: str, dport: int) -> socket.socket:
    hs = handshake(("127.0.0.1", port), host, dport, keep_open=True)
    assert hs.reply == 0 and hs.sock is not None, f"SOCKS5 reply {hs.reply}"
    return hs.sock


def recv_all(sock: socket.socket, timeout: float = 30.0) -> tuple[bytes, float]:
    """Everything until EOF, and the time from the last byte to the EOF."""
    sock.settimeout(timeout)
    chunks = []
    last = time.monotonic()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks), time.monotonic() - last
        chunks.append(data)
        last = time.monotonic()


def alive(*procs) -> None:
    for p in procs:
        assert p.alive(), f"{p.name} died\n{p.describe()}"


def forward(procs, extra_client=()):
    server = start_trisocks_server(procs, tokens=[TOKEN])
    client = start_trisocks_client(procs, server.url, TOKEN, extra=extra_client)
    return server, client


def reverse(procs):
    server, socks_port = start_trisocks_reverse_server(procs, TOKEN)
    provider = start_trisocks_provider(procs, server.url, TOKEN)
    server.proc.wait_for_port(socks_port)
    return server, provider, socks_port


# -- row 10: half-close is not close ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("request_size,response_size", [(1 << 10, 1 << 10), (8 << 20, 32 << 20)])
def test_half_closed_request_gets_whole_response(procs, payload_server, mode, request_size,
                                                 response_size):
    if mode == "forward":
        server, client = forward(procs)
        port, others = client.port, (server.proc, client.proc)
    else:
        server, provider, port = reverse(procs)
        others = (server.proc, provider)
    other = Download(payload_server, f"127.0.0.1:{port}")
    request = os.urandom(request_size)
    with target(answer_after_eof(response_size)) as t:
        sock = socks_open(port, "127.0.0.1", t.port)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # as nc -N and socat do
        body, _ = recv_all(sock)
        sock.close()
    assert body[:64] == hashlib.sha256(request).hexdigest().encode(), "the request was cut short"
    assert len(body) == 64 + response_size, f"response cut: {len(body) - 64} of {response_size}"
    other.check()
    alive(*others)


def test_half_closed_request_with_a_pywssocks_server(procs, payload_server):
    """With a peer that has no half-close the EOF cannot reach the destination, but a response
    to a complete request (HTTP) still arrives whole: the channel waits for the far end as long
    as bytes keep coming."""
    server = start_pywssocks_server(procs, TOKEN)
    client = start_trisocks_client(procs, server.url, TOKEN)
    with target(answer_after(len(b"request"), 4 << 20)) as t:
        sock = socks_open(client.port, "127.0.0.1", t.port)
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        body, _ = recv_all(sock)
        sock.close()
    assert body[:64] == hashlib.sha256(b"request").hexdigest().encode()
    assert len(body) == 64 + (4 << 20)
    alive(client.proc)


# -- issue 17 row 5: a close-delimited response closes on time --------------------------------

def test_close_delimited_response_closes_on_time_with_pywssocks_client(procs):
    size = 100 << 20
    server = start_trisocks_server(procs, tokens=[TOKEN])
    client = start_pywssocks_client(procs, server.url, TOKEN)
    with target(answer_after(len(b"GET"), size)) as t:
        sock = socks_open(client.port, "127.0.0.1", t.port)
        sock.sendall(b"GET")
        body, tail = recv_all(sock, timeout=60)
        sock.close()
    assert len(body) == 64 + size, f"{len(body) - 64} of {size} bytes"
    assert tail < 1.0, f"the close came {tail:.2f} s after the last byte"


def test_close_delimited_response_closes_at_once_between_trisocks_peers(procs):
    server, client = forward(procs)
    with target(answer_after_eof(32 << 20)) as t:
        sock = socks_open(client.port, "127.0.0.1", t.port)
        sock.shutdown(socket.SHUT_WR)
        body, tail = recv_all(sock)
        sock.close()
    assert len(body) == 64 + (32 << 20)
    assert tail < 0.5, f"the close came {tail:.2f} s after the last byte"


# -- row 7: stalled readers do not stop the others --------------------------------------------

@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_stalled_readers_do_not_stop_other_users(procs, payload_server, mode):
    if mode == "forward":
        server, client = forward(procs)
        port, holder = client.port, client.proc  # the client holds what its users do not read
    else:
        server, provider, port = reverse(procs)
        holder = server.proc
    base = rss_mib(holder.pid)
    stalled = []
    with target(firehose) as t:
        for _ in range(9):
            stalled.append(socks_open(port, "127.0.0.1", t.port))  # and never read
        # let the firehoses fill every buffer on the way, then another user downloads
        deadline = time.monotonic() + 10
        while rss_mib(holder.pid) - base < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        other = Download(payload_server, f"127.0.0.1:{port}")
        other.check(timeout=30)
        took = time.monotonic() - started
        grown = rss_mib(holder.pid) - base
        for s in stalled:
            s.close()
    assert took < 15, f"the other user's download took {took:.1f} s next to stalled readers"
    # 9 stalled channels hold at most their windows: the session's growth budget (64 MiB) and
    # an initial window each, not 9 x 16 MiB
    assert grown < 130, f"{holder.name} grew by {grown:.0f} MiB"
    alive(holder)


# -- row 6: a peer that never reads its WebSocket ---------------------------------------------

def _raw_session(port: int, flow: bool = False, rcvbuf: int = 0) -> socket.socket:
    """An authenticated WebSocket to a trisocks server, by hand (optionally without flow
    control). ``rcvbuf``: a small receive buffer for a peer that does not read, set before
    connecting (set afterwards, the window already offered shrinks, and loopback TCP could
    stall both ways: the server then saw a silent peer and closed it after 90 s)."""
    import base64

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "X-Trisocks-Flow: window=131072\r\n" if flow else ""
    sock.sendall((f"GET /socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(_frame(protocol.pack(protocol.Auth(TOKEN, False, os.urandom(16)))))
    return sock


def _frame(payload: bytes, opcode: int = codec.OP_BINARY) -> bytes:
    return codec.encode_frame(opcode, payload, struct.unpack("I", os.urandom(4))[0])


def test_peer_that_never_reads_its_websocket_costs_bounded_memory(procs, payload_server):
    server, client = forward(procs)
    base = rss_mib(server.proc.pid)
    other = Download(payload_server, client.socks)
    with target(firehose) as t:
        sock = _raw_session(server.port, rcvbuf=4096)
        connects = b"".join(
            _frame(protocol.pack(protocol.Connect(protocol.TCP, os.urandom(16), "127.0.0.1", t.port)))
            for _ in range(1000))
        sock.sendall(connects)
        deadline = time.monotonic() + 20
        while t.accepted < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.accepted == 1000, f"only {t.accepted} channels opened"
        peak = 0.0
        for _ in range(40):  # two seconds of the firehoses pushing at a peer that does not read
            peak = max(peak, rss_mib(server.proc.pid) - base)
            time.sleep(0.05)
        other.check()
        sock.close()
    assert peak < 100, f"server grew by {peak:.0f} MiB for 1000 unread channels"
    alive(server.proc, client.proc)


# -- row 8: pings whose pongs are never read ---------------------------------------------------

def test_ping_flood_without_reading_pongs_costs_bounded_memory(procs, payload_server):
    server, client = forward(procs)
    other = Download(payload_server, client.socks)
    sock = _raw_session(server.port, rcvbuf=4096)
    base = rss_mib(server.proc.pid)
    ping = _frame(b"p" * 125, codec.OP_PING)
    block = ping * ((1 << 20) // len(ping))
    for _ in range(100):  # 100 MiB of pings, none of the pongs read
        sock.sendall(block)
    grown = rss_mib(server.proc.pid) - base
    other.check()
    sock.close()
    assert grown < 30, f"server grew by {grown:.0f} MiB answering pings nobody reads"
    alive(server.proc, client.proc)


# -- row 9: file descriptors stay for everyone else -------------------------------------------

def test_idle_channels_cannot_take_every_file_descriptor(procs, payload_server):
    from .support.peers import trisocks_server_argv
    from .support.tools import clean_env

    argv = ["prlimit", "--nofile=400:400", *trisocks_server_argv([TOKEN])]
    server = start_trisocks_server(procs, argv=argv, env=clean_env())
    with target(idle) as t:
        sessions = [_raw_session(server.port, flow=True) for _ in range(2)]
        for sock in sessions:
            sock.sendall(b"".join(
                _frame(protocol.pack(protocol.Connect(protocol.TCP, os.urandom(16), "127.0.0.1",
                                                      t.port)))
                for _ in range(400)))
        deadline = time.monotonic() + 20
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < 1.0:
            if t.accepted != last:
                last, since = t.accepted, time.monotonic()
            time.sleep(0.05)
        assert t.accepted < 400, f"{t.accepted} channels: no reserve of file descriptors kept"
        # a new client still connects and authenticates (the reserve), its CONNECTs get a clear
        # refusal rather than a hang while the attacker holds every channel...
        client = start_trisocks_client(procs, server.url, TOKEN)
        refused = handshake(("127.0.0.1", client.port), "127.0.0.1", t.port)
        assert refused.reply not in (0, None), "a channel beyond the limit was opened"
        for sock in sessions:
            sock.close()
        # ...and once the attacker is gone (the server notices the closed WebSockets), everyone's
        # channels work again
        deadline = time.monotonic() + 10
        while handshake(("127.0.0.1", client.port), "127.0.0.1", t.port).reply != 0:
            assert time.monotonic() < deadline, "channels stayed refused after the attacker left"
            time.sleep(0.05)
        Download(payload_server, client.socks, size=4 << 20).check()
    alive(server.proc, client.proc)
