"""The SOCKS5 edge and the dial path under attack, against real processes (issue 9 rows 1, 2, 3, 11).

Every test runs another user's download through the processes under attack and then asserts
that it arrived intact, that every process is alive, and that the attacker got the SOCKS5 reply
(or ConnectResponse) it should; the ``procs`` fixture adds that no trisocks log holds a
traceback. Attacks come from 127.0.0.2, so the per-address throttles see another source than
the victim's 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from trisocks.net.dial import is_own_listener
from trisocks.wire import protocol

from .support import curl, payload_sha256
from .support.peers import (
    start_trisocks_client,
    start_trisocks_provider,
    start_trisocks_reverse_server,
    start_trisocks_server,
)
from .support.socks import recv_exact

TOKEN = "harden-socks-token-0123"
CONNECTOR = "harden-socks-connector-0123"
USER, PASSWORD = "alice", "wonderland-42"
ATTACKER = "127.0.0.2"
OTHER = 32 << 20  # the other user's download, paced so that it runs during the attack
PACE = "24M"

# Each row of issue 9's table 3: a name no resolver may be handed (raw bytes as sent).
BAD_NAMES = {
    "nul": b"a\x00b.example",
    "empty-label": b"a..b",
    "long-label": b"x" * 70 + b".example",
    "long-name": b"a." * 127 + b"a",  # 255 characters
    "not-idna": "☃.example".encode(),
    "not-utf8": b"\xff\xfe.example",
}


# -- the other user ---------------------------------------------------------------------------

class Download(threading.Thread):
    """The other user's download through ``port``, checked by sha256."""

    def __init__(self, payload_server, port: int, proxy_user: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url = payload_server.bytes_url(OTHER, seed=11)
        self.socks, self.proxy_user = f"127.0.0.1:{port}", proxy_user
        self.result = None
        self.start()

    def run(self) -> None:
        self.result = curl(self.url, socks=self.socks, proxy_user=self.proxy_user, timeout=60,
                           extra=["--limit-rate", PACE])

    def check(self) -> None:
        self.join(60)
        assert not self.is_alive(), "the other user's download did not finish"
        r = self.result
        assert r.returncode == 0 and r.http_code == 200, f"other download failed: {r.stderr}"
        assert r.size == OTHER and r.sha256 == payload_sha256(OTHER, 11), "other download corrupted"


def alive(*procs) -> None:
    for p in procs:
        assert p.alive(), f"{p.name} died\n{p.describe()}"


# -- raw SOCKS5 -------------------------------------------------------------------------------

def _connect(port: int, src: str = ATTACKER) -> socket.socket:
    s = socket.socket()
    s.settimeout(15)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s


def domain(name: bytes, port: int) -> bytes:
    return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)


def ipv4(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def greet(s: socket.socket, auth: tuple[bytes, bytes] | None = None) -> int | None:
    """Greeting (and RFC 1929 exchange); the auth status, or None without auth."""
    s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
    ver, method = recv_exact(s, 2)
    assert ver == 5 and method == (2 if auth else 0), f"method {method}"
    if not auth:
        return None
    user, password = auth
    s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    return recv_exact(s, 2)[1]


def request(port: int, address: bytes, *, cmd: int = 1, auth=None, src: str = ATTACKER) -> int:
    """One SOCKS5 request; the reply code."""
    with _connect(port, src) as s:
        greet(s, auth)
        s.sendall(bytes([5, cmd, 0]) + address)
        return recv_exact(s, 3)[1]


def login(port: int, user: bytes, password: bytes, src: str = ATTACKER) -> int:
    """The RFC 1929 status for these credentials; the connection is then closed by the server
    on failure (checked)."""
    with _connect(port, src) as s:
        status = greet(s, (user, password))
        if status != 0:
            assert s.recv(1) == b"", "connection left open after a failed login"
        return status


def reset_after(port: int, cmd: int, address: bytes) -> None:
    """Send a request and reset the connection at once (SO_LINGER 0), as a closing tab does."""
    s = _connect(port)
    greet(s)
    s.sendall(bytes([5, cmd, 0]) + address)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# -- a target that counts its connections and their ends -------------------------------------

class Target:
    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        self.ended = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
        with self._lock:
            self.ended += 1

    def wait_all_ended(self, expected: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.accepted >= expected and self.ended == self.accepted:
                return
            time.sleep(0.01)
        raise AssertionError(f"target: {self.accepted} connections, {self.ended} closed; the "
                             f"tunnel did not close what the reset SOCKS5 clients left behind")

    def close(self) -> None:
        self.lsock.close()


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


# -- raw LinkSocks peer (to reach a server's or a provider's dial path directly) -------------

class RawPeer:
    """A hand-driven LinkSocks client over a plain socket: sends what no good client would."""

    def __init__(self, port: int, token: str) -> None:
        self.s = _connect(port)
        self.s.sendall((f"GET /socket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.s.recv(4096)
            assert chunk, "closed during the upgrade"
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.send(protocol.Auth(token, False, os.urandom(16)))
        assert self.expect(protocol.AuthResponse).success

    def send(self, msg) -> None:
        payload = protocol.pack(msg)
        key = os.urandom(4)
        n = len(payload)
        head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        self.s.sendall(head + key + masked)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError("the server closed the WebSocket")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _frame(self) -> tuple[int, bytes]:
        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._take(2), "big")
        elif n == 127:
            n = int.from_bytes(self._take(8), "big")
        return b0 & 0x0F, self._take(n)

    def expect(self, kind, channel: bytes | None = None):
        """The next message of ``kind`` (for ``channel``), skipping everything else."""
        while True:
            opcode, payload = self._frame()
            if opcode != 2:
                continue
            msg = protocol.parse(payload)
            if isinstance(msg, kind) and (channel is None or msg.channel == channel):
                return msg

    def connect(self, host: str, port: int) -> protocol.ConnectResponse:
        cid = protocol.new_channel_id()
        self.send(protocol.Connect(protocol.TCP, cid, host, port))
        return self.expect(protocol.ConnectResponse, cid)

    def close(self) -> None:
        self.s.close()


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
            except OSError:
                return


def udp_through_peer(peer: RawPeer, echo_port: int) -> None:
    """Datagrams to every bad name are dropped; the association still carries a good one."""
    cid = protocol.new_channel_id()
    peer.send(protocol.Connect(protocol.UDP, cid))
    assert peer.expect(protocol.ConnectResponse, cid).success
    for name in BAD_NAMES.values():
        text = name.decode(errors="ignore")
        if len(text.encode()) <= 255:
            peer.send(protocol.Data(protocol.UDP, cid, b"bad", target_address=text, target_port=9))
    peer.send(protocol.Data(protocol.UDP, cid, b"ping", target_address="127.0.0.1",
                            target_port=echo_port))
    answer = peer.expect(protocol.Data, cid)
    assert answer.data == b"ping" and answer.port == echo_port


# -- setups ------------------------------------------------------------------------------------

def forward(procs, client_extra=(), auth: bool = False):
    server = start_trisocks_server(procs, tokens=[TOKEN])
    kw = {"username": USER, "password": PASSWORD} if auth else {}
    client = start_trisocks_client(procs, server.url, TOKEN, extra=client_extra, **kw)
    return server, (server.proc, client.proc), client.port


def reverse(procs, server_extra=()):
    server, socks_port = start_trisocks_reverse_server(procs, TOKEN, connector_tokens=[CONNECTOR],
                                                       extra=server_extra)
    provider = start_trisocks_provider(procs, server.url, TOKEN)
    server.proc.wait_for_port(socks_port)
    return server, (server.proc, provider), socks_port


# -- row 1: credentials that are not UTF-8, and throttled guessing ----------------------------

@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_undecodable_credentials_fail_and_guessing_is_throttled(procs, payload_server, mode):
    if mode == "forward":
        _server, procs_up, port = forward(procs, auth=True)
    else:
        _server, procs_up, port = reverse(procs, ["-n", USER, "-w", PASSWORD])
    other = Download(payload_server, port, f"{USER}:{PASSWORD}")

    for user, password in [(b"\xff", b"\xff"), (USER.encode(), PASSWORD.encode() + b"\xff"),
                           (b"\xff" * 255, b"\xfe" * 255), (b"\xed\xa0\x80", b"\xc3\x28")]:
        assert login(port, user, password) == 1
    # the limiter counts those four: six more wrong ones, and then even the right pair is refused
    for _ in range(6):
        assert login(port, USER.encode(), b"guess") == 1
    assert login(port, USER.encode(), PASSWORD.encode()) == 1, "not throttled"
    # ... for that address only: the user on 127.0.0.1 still gets in and through
    assert login(port, USER.encode(), PASSWORD.encode(), src="127.0.0.1") == 0
    auth = (USER.encode(), PASSWORD.encode())
    assert request(port, ipv4("127.0.0.1", payload_server.port), auth=auth, src="127.0.0.1") == 0

    other.check()
    alive(*procs_up)


# -- row 2: a reset right after CONNECT or UDP ASSOCIATE -------------------------------------

RESETS = 20


@pytest.mark.parametrize("fast_open", [False, True], ids=["plain", "fast-open"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_reset_after_request_closes_the_channel_at_both_ends(procs, payload_server, target, mode,
                                                             fast_open):
    extra = ["-f"] if fast_open else []
    if mode == "forward":
        _server, procs_up, port = forward(procs, client_extra=extra)
    else:
        _server, procs_up, port = reverse(procs, server_extra=extra)
    other = Download(payload_server, port)

    for _ in range(RESETS):
        reset_after(port, 1, ipv4("127.0.0.1", target.port))
        reset_after(port, 3, ipv4("0.0.0.0", 0))
    # each CONNECT reached the target; each must be closed there, since the SOCKS5 side is gone
    target.wait_all_ended(RESETS)
    # and the port still serves
    assert request(port, ipv4("127.0.0.1", target.port)) == 0

    other.check()
    alive(*procs_up)


# -- row 3: names no resolver may be handed ---------------------------------------------------

def test_bad_names_forward(procs, payload_server):
    server, procs_up, port = forward(procs)
    other = Download(payload_server, port)
    echo = UdpEcho()

    for what, name in BAD_NAMES.items():
        assert request(port, domain(name, 80)) == 4, what  # refused by the client, 0x04
    # a peer that sends them anyway reaches the server's dial path: refused there, as text
    # that maps to 0x04, and the session goes on
    peer = RawPeer(server.port, TOKEN)
    for name in BAD_NAMES.values():
        text = name.decode(errors="ignore")
        if len(text.encode()) <= 255:
            resp = peer.connect(text, 80)
            assert not resp.success and resp.error.startswith("invalid host name"), resp
    assert peer.connect("127.0.0.1", payload_server.port).success
    udp_through_peer(peer, echo.port)
    peer.close()

    other.check()
    alive(*procs_up)


def test_bad_names_reverse_and_provider(procs, payload_server):
    server, procs_up, port = reverse(procs)
    other = Download(payload_server, port)
    echo = UdpEcho()

    for what, name in BAD_NAMES.items():
        assert request(port, domain(name, 80)) == 4, what  # refused by the reverse server
    # a connector's Connect goes to the provider as it is: the provider's dial path refuses
    peer = RawPeer(server.port, CONNECTOR)
    for name in BAD_NAMES.values():
        text = name.decode(errors="ignore")
        if len(text.encode()) <= 255:
            resp = peer.connect(text, 80)
            assert not resp.success and resp.error.startswith("invalid host name"), resp
    assert peer.connect("127.0.0.1", payload_server.port).success
    udp_through_peer(peer, echo.port)
    peer.close()

    other.check()
    alive(*procs_up)


# -- row 11: the tunnel does not lead back into the server -----------------------------------

def test_server_own_port_is_not_reachable_through_the_tunnel(procs, payload_server):
    server, procs_up, port = forward(procs)
    other = Download(payload_server, port)

    for address in (ipv4("127.0.0.1", server.port), ipv4("127.0.0.2", server.port),
                    ipv4("0.0.0.0", server.port), domain(b"localhost", server.port)):
        assert request(port, address) == 2  # connection not allowed by ruleset
    peer = RawPeer(server.port, TOKEN)
    resp = peer.connect("127.0.0.1", server.port)
    assert not resp.success and "not allowed" in resp.error
    peer.close()
    assert request(port, ipv4("127.0.0.1", payload_server.port)) == 0  # other ports: as ever

    other.check()
    alive(*procs_up)


def test_own_listener_matching():
    lo = [("127.0.0.1", 8765)]
    assert is_own_listener(("127.0.0.1", 8765), lo)
    assert is_own_listener(("127.9.9.9", 8765), lo)  # any loopback address
    assert is_own_listener(("0.0.0.0", 8765), lo)  # "this host"
    assert is_own_listener(("::ffff:127.0.0.1", 8765, 0, 0), lo)
    assert not is_own_listener(("127.0.0.1", 8766), lo)
    wildcard = [("0.0.0.0", 8765)]
    assert is_own_listener(("::1", 8765, 0, 0), wildcard)
    assert not is_own_listener(("192.0.2.1", 8765), wildcard)  # TEST-NET-1: not this machine
    assert not is_own_listener(("192.0.2.1", 8765), [("10.1.2.3", 8765)])
