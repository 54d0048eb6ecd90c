"""The server's front door, attacked as a stranger would, against real processes (issue 9
rows 4, 5, 11-13, sessions per token; issue 17 items 1 and 3).

Every test runs another user's download (curl through a trisocks peer, sha256 checked)
while the attack goes on, and checks that the server process is alive, the download
intact, the attack refused as it should be and, where memory is at stake, the server's
RSS bounded.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import threading
import time
import urllib.request
from base64 import b64encode
from contextlib import contextmanager

from trisocks.tunnel.throttle import FailureLimiter
from trisocks.wire import codec, protocol
from trisocks.wire.codec import Decoder, encode_frame

from .support.curl import curl
from .support.payload import payload_sha256
from .support.peers import HOST, start_trisocks_client
from .support.tools import clean_env, trisocks_cmd

TOKEN = "harden-user-token-0001"  # the other user's
MiB = 1 << 20


# -- a raw WebSocket client (blocking sockets) -----------------------------------------------

class Raw:
    """A hand-driven WebSocket client, for what a good client never sends."""

    def __init__(self, port: int, *, source: str | None = None, headers: str = "",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        key = b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /socket HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            if not data:
                break
            head += data
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        self.leftover = head.partition(b"\r\n\r\n")[2]
        self._decoder = None  # made when needed: thousands of idle peers need no buffers

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            self._decoder = Decoder(expect_masked=False)
            self._decoder.feed_bytes(self.leftover)
        return self._decoder

    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(encode_frame(opcode, payload, int.from_bytes(os.urandom(4), "big")))

    def send(self, msg) -> None:
        self.send_frame(codec.OP_BINARY, protocol.pack(msg))

    def next(self):
        """('message', parsed) / ('close', code) / ('eof', None); pings and pongs skipped."""
        d = self.decoder
        while True:
            ev = d.next_event()
            if ev == codec.MESSAGE:
                return "message", protocol.parse(d.data)
            if ev == codec.CLOSE:
                return "close", d.close_code
            if ev == codec.NEED_DATA:
                try:
                    n = self.sock.recv_into(d.get_buffer())
                except (ConnectionResetError, TimeoutError):
                    return "eof", None
                if n == 0:
                    return "eof", None
                d.feed(n)

    def auth(self, token: str, reverse: bool = False) -> protocol.AuthResponse:
        self.send(protocol.Auth(token, reverse, os.urandom(16)))
        kind, msg = self.next()
        assert kind == "message", (kind, msg)
        return msg

    def close(self) -> None:
        self.sock.close()


def http_status(port: int, source: str | None = None, headers: str = "") -> int:
    """Status of a WebSocket upgrade request (the connection is then closed)."""
    peer = Raw(port, source=source, headers=headers)
    peer.close()
    return peer.status


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) << 10


@contextmanager
def others_download(socks: str, payload_server, size: int = 32 * MiB, rate: str = "40M"):
    """Another user downloads ``size`` bytes through ``socks`` (rate-limited so that it spans
    the attack); on exit, it must have arrived whole."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=curl(
        payload_server.bytes_url(size, seed=7), socks=socks, extra=["--limit-rate", rate])))
    thread.start()
    try:
        yield
    finally:
        thread.join(120)
    r = result["r"].check()
    assert (r.size, r.sha256) == (size, payload_sha256(size, seed=7)), "the other user's download"


def server_with_user(trisocks_server, trisocks_client, tokens=(TOKEN,), extra=()):
    server = trisocks_server(tokens=tokens, extra=extra)
    client = trisocks_client(server.url, TOKEN)
    return server, client


def assert_alive(*peers) -> None:
    for peer in peers:
        assert peer.proc.alive(), peer.proc.describe()


# -- row 4: a gzip bomb before (and after) authentication --------------------------------------

def test_gzip_bomb_refused_and_server_keeps_answering(trisocks_server, trisocks_client,
                                                      payload_server):
    server, client = server_with_user(trisocks_server, trisocks_client, tokens=(TOKEN, "bomber-token-01"))
    member = gzip.compress(b"")
    bomb = member * ((4 * MiB) // len(member))  # ~200,000 empty members: minutes of work before
    ch = protocol.new_channel_id()
    data = bytes((1, protocol.T_DATA, protocol.TCP)) + ch + b"\x01" + len(bomb).to_bytes(4, "big") + bomb
    with others_download(client.socks, payload_server):
        # before Auth: a message over the small pre-auth cap is refused at its header (1009)
        attacker = Raw(server.port)
        frame = encode_frame(codec.OP_BINARY, data, 0x12345678)
        attacker.sock.sendall(frame[:16384])  # the server stops reading at the header
        assert attacker.next() == ("close", 1009)
        attacker.close()
        # before Auth, a small gzip Data: refused with an AuthResponse error and a close
        small = bytes((1, protocol.T_DATA, protocol.TCP)) + ch + b"\x01" + len(member * 50).to_bytes(4, "big")
        attacker = Raw(server.port)
        attacker.send_frame(codec.OP_BINARY, small + member * 50)
        kind, msg = attacker.next()
        assert kind == "message" and not msg.success and msg.error == "invalid auth message"
        assert attacker.next() == ("close", 1008)
        attacker.close()
        # after Auth the same bomb costs nothing: at most 64 members are looked at
        attacker = Raw(server.port)
        assert attacker.auth("bomber-token-01").success
        attacker.send_frame(codec.OP_BINARY, data)
        # and somebody else is answered at once
        started = time.monotonic()
        other = Raw(server.port, timeout=2)
        assert other.auth(TOKEN).success
        assert time.monotonic() - started < 2
        other.close()
        server.proc.wait_for_log("gzip payload of more than 64 members", timeout=5)
        attacker.close()
    assert_alive(server, client)


# -- row 5: unauthenticated connections cost little and are capped -----------------------------

def test_idle_and_oversized_preauth_connections_are_bounded(trisocks_server, trisocks_client,
                                                           payload_server):
    server, client = server_with_user(trisocks_server, trisocks_client)
    pid = server.proc.pid
    base = rss(pid)
    with others_download(client.socks, payload_server, size=48 * MiB, rate="12M"):
        # per source address: 64 wait, the 65th gets 503
        one = [Raw(server.port, source="127.0.0.200") for _ in range(64)]
        assert {p.status for p in one} == {101}
        assert http_status(server.port, source="127.0.0.200") == 503
        for p in one:
            p.close()
        # 2000 idle WebSockets from 40 addresses: 1024 wait, the rest get 503
        idle = [Raw(server.port, source=f"127.0.1.{i % 40 + 1}") for i in range(2000)]
        statuses = [p.status for p in idle]
        assert statuses.count(101) == 1024 and statuses.count(503) == 976, set(statuses)
        grown = rss(pid) - base
        assert grown < 100 * MiB, f"+{grown >> 20} MiB for 1024 idle pre-auth WebSockets"
        for p in idle:
            p.close()
        # 40 clients announcing 32 MiB messages before Auth: closed at the header (1009)
        for i in range(40):
            p = Raw(server.port, source=f"127.0.2.{i + 1}")
            p.sock.sendall(bytes((0x82, 0xFF)) + (32 * MiB).to_bytes(8, "big") + os.urandom(4))
            try:
                p.sock.sendall(os.urandom(MiB))
            except OSError:
                pass  # closed under our feet, as it should be
            assert p.next() in (("close", 1009), ("eof", None))
            p.close()
        grown = rss(pid) - base
        assert grown < 100 * MiB, f"+{grown >> 20} MiB after 40 oversized pre-auth messages"
        # once they are gone, new clients get in again
        deadline = time.monotonic() + 10
        while http_status(server.port) != 101:
            assert time.monotonic() < deadline, "the admission count did not go back down"
    assert_alive(server, client)


# -- rows 11/12: throttling that success does not reset, and a trusted proxy -------------------

def test_wrong_tokens_between_valid_ones_still_end_in_429(trisocks_server, trisocks_client,
                                                        payload_server):
    server, client = server_with_user(trisocks_server, trisocks_client,
                                      extra=["--trusted-proxy", "127.0.0.0/8"])
    with others_download(client.socks, payload_server):
        guesser = "X-Forwarded-For: 198.51.100.7\r\n"
        failures = 0
        for i in range(10):
            peer = Raw(server.port, headers=guesser)
            assert peer.status == 101
            ok = peer.auth(TOKEN if i == 9 else f"guess-{i}-abcdef").success
            assert ok == (i == 9)
            failures += not ok
            peer.close()
        # the valid auth cleared nothing: the tenth wrong guess hits the limit
        peer = Raw(server.port, headers=guesser)
        assert not peer.auth("guess-last-abcdef").success
        peer.close()
        assert http_status(server.port, headers=guesser) == 429
        # a forged entry to the left changes nothing: the rightmost untrusted entry counts
        assert http_status(server.port, headers="X-Forwarded-For: 203.0.113.1, 198.51.100.7\r\n") == 429
        # another client behind the same proxy, and the proxy itself, are not locked out
        peer = Raw(server.port, headers="X-Forwarded-For: 198.51.100.8\r\n")
        assert peer.status == 101 and peer.auth(TOKEN).success
        peer.close()
        assert http_status(server.port) == 101
    server.proc.wait_for_log(r"authentication failed from 198\.51\.100\.7 \(via 127\.0\.0\.1:\d+\)")
    assert_alive(server, client)
    # IPv6 addresses count per /64, whichever caller asks
    limiter = FailureLimiter(max_failures=3)
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1}")
    assert limiter.retry_after("2001:db8:1:2:ffff::9") > 0
    assert limiter.retry_after("2001:db8:1:3::1") == 0


# -- sessions per token ---------------------------------------------------------------------

def test_sessions_per_token_are_capped(trisocks_server, trisocks_client, payload_server):
    hog = "session-hog-token-01"
    server, client = server_with_user(trisocks_server, trisocks_client, tokens=(TOKEN, hog))
    with others_download(client.socks, payload_server):
        held = []
        for _ in range(64):
            peer = Raw(server.port)
            assert peer.auth(hog).success
            held.append(peer)
        extra = Raw(server.port)
        answer = extra.auth(hog)
        assert not answer.success and answer.error == "too many sessions for this token"
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server sees that close soon: one more session may come in
            peer = Raw(server.port)
            if peer.auth(hog).success:
                break
            peer.close()
            assert time.monotonic() < deadline, "a closed session still counted"
        held.append(peer)
        for peer in held:
            peer.close()
    assert_alive(server, client)


# -- row 13: Connector ADD guessing in autonomy mode ----------------------------------------------

def _connector_answer(provider: Raw, channel: bytes) -> protocol.ConnectorResponse:
    while True:
        kind, msg = provider.next()
        assert kind == "message", (kind, msg)
        if isinstance(msg, protocol.ConnectorResponse) and msg.channel == channel:
            return msg


def _add(provider: Raw, name: str) -> protocol.ConnectorResponse:
    channel = protocol.new_channel_id()
    provider.send(protocol.Connector(channel, name, protocol.ADD))
    return _connector_answer(provider, channel)


def test_connector_add_guessing_is_rate_limited_and_says_nothing(procs, tmp_path, payload_server):
    rev, rev2, conn, fwd, key = ("autonomy-rev-01", "other-rev-0002", "operator-conn-01",
                                 "api-forward-01", "api-key-0123456789abcdef")
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-r", "-a", "-t", rev, "-t", rev2,
            "-c", conn, "-k", key, "--db", str(tmp_path / "t.db")]
    proc = procs.start(argv, name="trisocks-server", env=clean_env())
    port = int(proc.wait_for_log(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)").group(1))
    proc.wait_for_port(port)
    req = urllib.request.Request(f"http://{HOST}:{port}/api/token", method="POST",
                                 data=json.dumps({"type": "forward", "token": fwd}).encode(),
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as answer:
        assert answer.status == 200
    client = start_trisocks_client(procs, f"ws://{HOST}:{port}", fwd)
    with others_download(client.socks, payload_server):
        provider = Raw(port)
        assert provider.auth(rev, reverse=True).success
        # a name taken by a forward, a reverse or an operator's connector token: one answer
        errors = {name: _add(provider, name) for name in (fwd, rev2, conn)}
        assert all(not a.success for a in errors.values())
        assert {a.error for a in errors.values()} == {"token already exists"}
        # guessing fast: past the burst, every ADD is "rate limited", right away
        started = time.monotonic()
        answers = [_add(provider, f"guess-{i:04d}-abcdef") for i in range(40)]
        assert time.monotonic() - started < 3
        limited = [a for a in answers if not a.success and a.error == "rate limited"]
        assert len(limited) >= 40 - 10, [a.error for a in answers]
        assert all(a.success or a.error == "rate limited" for a in answers)
        provider.close()
    assert proc.alive() and client.proc.alive()


# -- issue 17 item 1: autonomy tokens have no SOCKS5 port ------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_autonomy_token_has_no_socks5_port(procs, payload_server):
    rev, port_wanted = "autonomy-only-rev-01", _free_port()
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-r", "-a", "-t", rev,
            "-p", str(port_wanted)]
    proc = procs.start(argv, name="trisocks-server", env=clean_env())
    port = int(proc.wait_for_log(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)").group(1))
    assert re.search(r"reverse token \S+ chars\): autonomy mode, no SOCKS5 port", proc.output())
    assert not re.search(r"SOCKS5 port \S*:\d+", proc.output())
    url = f"ws://{HOST}:{port}"
    providers = []
    for name in ("a", "b"):
        p = procs.start([*trisocks_cmd(), "provider", "-u", url, "-t", rev, "-c", f"conn-of-{name}-0001"],
                        name=f"trisocks-provider-{name}", env=clean_env())
        p.wait_for_log("provider ready on")
        providers.append(p)
    proc.wait_for(lambda: proc.output().count("added connector token") == 2, "both connector tokens")
    connector = start_trisocks_client(procs, url, "conn-of-a-0001")
    with others_download(connector.socks, payload_server, rate="60M"):
        # with a provider there, still nothing listens where the token's port would be
        assert _refused(port_wanted)
        # the reverse token itself opens no way in either
        peer = Raw(port)
        assert not peer.auth(rev).success
        peer.close()
    assert not re.search(r"SOCKS5 port \S*:\d+", proc.output())
    assert proc.alive() and all(p.alive() for p in providers)


# -- issue 17 item 3: a provider hears "in" only once the port accepts -------------------------

def test_provider_auth_answer_comes_after_the_port_accepts(procs, payload_server):
    tokens = [f"r{i:02d}x-reverse-token" for i in range(21)]  # logs show the first 4 characters
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-r", "-p", "0"]
    for token in tokens:
        argv += ["-t", token]
    proc = procs.start(argv, name="trisocks-server", env=clean_env())
    port = int(proc.wait_for_log(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)").group(1))
    socks_ports = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"reverse token (r\d\dx)\.\.\.\(\d+ chars\): SOCKS5 port 127\.0\.0\.1:(\d+)", proc.output())}
    assert len(socks_ports) == 21
    # the other user: a real provider on the last token, curl through its port
    provider = procs.start([*trisocks_cmd(), "provider", "-u", f"ws://{HOST}:{port}", "-t", tokens[20]],
                           name="trisocks-provider", env=clean_env())
    provider.wait_for_log("provider ready on")
    held = []
    with others_download(f"{HOST}:{socks_ports['r20x']}", payload_server):
        for token in tokens[:20]:
            raw = Raw(port)
            assert raw.auth(token, reverse=True).success
            # the moment the provider is told it is in, the port must take a SOCKS5 client
            with socket.create_connection((HOST, socks_ports[token[:4]]), timeout=5) as s:
                s.sendall(b"\x05\x01\x00")
                assert s.recv(2) == b"\x05\x00"
            held.append(raw)
    assert len(re.findall(r"a provider is here, SOCKS5 port \d+ open", proc.output())) == 21
    for raw in held:
        raw.close()
    assert proc.alive() and provider.alive()
