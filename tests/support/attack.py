"""The standing attack harness: real trisocks processes, another user's transfer, hostile input.

:func:`start_stack` starts, as subprocesses on 127.0.0.1,

- ``server``   a forward server with the management API (``-k KEY``, its own ``--db``),
- ``client``   a forward client of that server, SOCKS5 with username/password,
- ``reverse``  a reverse server (``-r``) whose SOCKS5 port leaves through
- ``provider`` a provider,

plus the payload HTTP server and a UDP echo target in threads. :class:`Transfer` is "another
user": curl downloads through the client (or the reverse port) in a loop and checks every byte by
sha256. The attack inputs come from the Hypothesis strategies below and are delivered by the
``hit_*`` functions, one interaction each, over real sockets.

Attack traffic comes from other loopback addresses (127.0.0.2 and up) than the victim's
(127.0.0.1): the per-address throttles of the tunnel and the API then see the attacker as a
different address, as they would on a network, and the attacker's failed keys cannot lock the
victim out.

The input classes of issue 9's table (:data:`KNOWN_CLASSES`, each naming its row) are a
switch: ``known=False`` leaves them out, for a tree where one of those bugs is open again and
the rest of the suite must still gate; ``known=True`` (the default everywhere) puts them in.
"""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from trisocks.wire import protocol

from . import peers
from .curl import curl
from .payload import PayloadServer, payload_sha256
from .procs import ManagedProcess, ProcessFactory, free_port

KEY = "fuzz-api-key-0123456789abcdef"
VICTIM_TOKEN = "victim-token-0123456789"
ATTACKER_TOKEN = "attacker-token-0123456789"
REVERSE_TOKEN = "reverse-token-0123456789"
SOCKS_USER, SOCKS_PASS = "victim", "victim-pass-0123"
HOST = "127.0.0.1"
MiB = 1 << 20

# Whatever the attack, no trisocks process may grow past this resident size (they start at
# 40-70 MiB; a 100 MiB transfer with a 16 MiB window adds a few tens).
RSS_BOUND_MIB = 300

# Source addresses of the attackers, one per kind, all loopback.
SRC = {"socks": "127.0.0.2", "udp": "127.0.0.3", "ws": "127.0.0.4", "ws_auth": "127.0.0.5",
       "api": "127.0.0.6", "api_bad_key": "127.0.0.7", "rsocks": "127.0.0.8"}

# Input classes of the bugs in issue 9's table (fixed since), left out only with known=False.
KNOWN_CLASSES = {
    "creds_ff": "row 1: SOCKS5 username/password with bytes that are not UTF-8 (0xFF)",
    "reset_after_request": "row 2: SO_LINGER 0 reset right after CONNECT / UDP ASSOCIATE",
    "bad_hostnames": "row 3: names with NUL, empty labels, 64+ byte labels, non-IDNA",
    "api_extreme_dates": "row 14: expires_at at year 1 or 9999",
}


# -- process facts ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def tracebacks(proc: ManagedProcess) -> str:
    """The first traceback in a process's output, or ''."""
    out = proc.output()
    at = out.find("Traceback")
    return out[max(0, at - 300):at + 3000] if at >= 0 else ""


class UdpEcho:
    """A UDP echo target on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="udp-echo")
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
                self.count += 1
            except TimeoutError:
                continue
            except OSError:
                if self._halt.is_set():
                    return

    def close(self) -> None:
        self._halt.set()
        self._thread.join(2)
        self.sock.close()


# -- the processes ----------------------------------------------------------------------------


@dataclass
class Stack:
    payload: PayloadServer
    server: peers.Peer
    client: peers.Peer
    reverse: peers.Peer
    reverse_socks: int
    provider: ManagedProcess
    udp_echo: UdpEcho
    closed_port: int  # a port nothing listens on

    def processes(self) -> dict[str, ManagedProcess]:
        return {"server": self.server.proc, "client": self.client.proc,
                "reverse": self.reverse.proc, "provider": self.provider}

    def dead(self) -> list[str]:
        return [name for name, p in self.processes().items() if not p.alive()]

    def sample(self) -> dict[str, tuple[int | None, int | None]]:
        """(RSS KiB, open fds) of every process."""
        return {name: (rss_kib(p.pid), fd_count(p.pid)) for name, p in self.processes().items()}

    def tracebacks(self) -> dict[str, str]:
        return {name: tb for name, p in self.processes().items() if (tb := tracebacks(p))}


def start_stack(factory: ProcessFactory, workdir: Path, payload: PayloadServer) -> Stack:
    server = peers.start_trisocks_server(
        factory, tokens=[VICTIM_TOKEN, ATTACKER_TOKEN],
        extra=["-k", KEY, "--db", str(Path(workdir) / "fuzz.db")])
    client = peers.start_trisocks_client(factory, server.url, VICTIM_TOKEN,
                                         username=SOCKS_USER, password=SOCKS_PASS)
    reverse, reverse_socks = peers.start_trisocks_reverse_server(factory, REVERSE_TOKEN)
    provider = peers.start_trisocks_provider(factory, reverse.url, REVERSE_TOKEN)
    reverse.proc.wait_for_port(reverse_socks, HOST)
    return Stack(payload, server, client, reverse, reverse_socks, provider, UdpEcho(),
                 free_port())


# -- another user's transfer ------------------------------------------------------------------


@dataclass
class TransferResult:
    ok: bool
    size: int
    seconds: float
    detail: str


class Transfer(threading.Thread):
    """Downloads of ``size`` bytes through ``socks`` with curl, checked by sha256, one after
    another until :meth:`stop` (at least one). ``seconds`` paces each download with
    ``--limit-rate`` so that one spans that long (None: full speed)."""

    def __init__(self, payload: PayloadServer, socks: str, *, size: int = 100 * MiB, seed: int = 7,
                 seconds: float | None = None, proxy_user: str | None = None,
                 name: str = "transfer") -> None:
        super().__init__(daemon=True, name=name)
        self.payload, self.socks, self.size, self.seed = payload, socks, size, seed
        self.seconds, self.proxy_user = seconds, proxy_user
        self.results: list[TransferResult] = []
        self.started = threading.Event()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        expected = payload_sha256(self.size, self.seed)
        extra = []
        if self.seconds:
            extra = ["--limit-rate", str(max(64 << 10, int(self.size / self.seconds)))]
        timeout = (self.seconds or 30) * 3 + 60
        while True:
            self.started.set()
            t0 = time.monotonic()
            r = curl(self.payload.bytes_url(self.size, self.seed), socks=self.socks,
                     proxy_user=self.proxy_user, timeout=timeout, extra=extra)
            ok = r.returncode == 0 and r.http_code == 200 and r.size == self.size \
                and r.sha256 == expected
            self.results.append(TransferResult(
                ok, r.size, time.monotonic() - t0,
                "" if ok else f"curl exit {r.returncode}, HTTP {r.http_code}, {r.size} bytes, "
                              f"sha256 {'ok' if r.sha256 == expected else 'WRONG'}: {r.stderr[:300]}"))
            if self._halt.is_set():
                return


# -- sockets ----------------------------------------------------------------------------------


def connect(port: int, src: str, timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect((HOST, port))
    except BaseException:
        s.close()
        raise
    return s


def drain(s: socket.socket, budget: float = 0.2, limit: int = 1 << 16) -> bytes:
    """What the peer sends within ``budget`` seconds (up to ``limit`` bytes, or its EOF)."""
    got = bytearray()
    deadline = time.monotonic() + budget
    while len(got) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        got += data
    return bytes(got)


def read_until(s: socket.socket, want: Callable[[bytes], int | None], budget: float = 3.0,
               limit: int = 1 << 16) -> tuple[bytes, int | None]:
    """Read until ``want(buf)`` gives a length, EOF, or the budget runs out."""
    buf = bytearray()
    deadline = time.monotonic() + budget
    while len(buf) < limit:
        n = want(bytes(buf))
        if n is not None:
            return bytes(buf), n
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        buf += data
    return bytes(buf), None


def finish(s: socket.socket, how: str) -> None:
    """Close: 'close' (FIN), 'half' (SHUT_WR, a short read, close), 'rst' (SO_LINGER 0)."""
    try:
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half":
            s.shutdown(socket.SHUT_WR)
            drain(s, 0.1)
    except OSError:
        pass
    s.close()


# -- strategies: addresses --------------------------------------------------------------------

BAD_NAMES = [b"a\x00b", b"a..b", b"x" * 64 + b".com", b"x" * 70, b".", b"..", b"-", b"a.-b",
             b"xn--", b"xn--zz.com", b"\xff\xfe", b"\xc3\x28", b" ", b"a b", b"localhost\x00.evil",
             b"[::1]", b"127.0.0.1:80", "ex\u00e4mple.com".encode(), "\u2615.com".encode(),
             b"a" * 255, (b"a" * 63 + b".") * 3 + b"a" * 63, b"%00", b"\x00"]
# names every layer must accept (as names) whether or not they resolve
GOOD_NAMES = [b"localhost", b"LOCALHOST", b"localhost.", b"nonexistent.invalid", b"a.invalid",
              b"127.0.0.1", b"::1", b"0x7f.1", b"2130706433"]
LOCAL_IPV4 = ["127.0.0.1", "0.0.0.0", "127.255.255.255", "127.0.0.2"]
LOCAL_IPV6 = ["::1", "::", "::ffff:127.0.0.1", "fe80::1"]


def _valid_name(raw: bytes) -> bool:
    """Roughly what a resolver takes: printable ASCII labels of 1..63 bytes (IDNA aside)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    if not text or len(text) > 253 or "\x00" in text:
        return False
    labels = text.rstrip(".").split(".")
    return all(0 < len(label) <= 63 and re.fullmatch(r"[A-Za-z0-9_-]+", label) for label in labels)


def names(known: bool) -> st.SearchStrategy[bytes]:
    """Domain names as bytes (at most 255). Without ``known``, only names a resolver accepts."""
    pool = GOOD_NAMES + (BAD_NAMES if known else [])
    random_names = st.one_of(
        st.binary(min_size=1, max_size=255),
        st.text(min_size=1, max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")[:255]),
        st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}\.invalid", fullmatch=True)
        .map(str.encode))
    if not known:
        random_names = random_names.filter(_valid_name)
    return st.one_of(st.sampled_from(pool), random_names)


def ports(stack: Stack) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([stack.payload.port, stack.closed_port, stack.udp_echo.port,
                                      0, 1, 65535]), st.integers(0, 65535))


def socks_address(stack: Stack, known: bool) -> st.SearchStrategy[bytes]:
    """ATYP DST.ADDR DST.PORT, valid or not (without ``known``: resolvable names only)."""
    port = ports(stack).map(lambda p: p.to_bytes(2, "big"))
    v4 = st.one_of(st.sampled_from(LOCAL_IPV4), st.integers(0x7F000000, 0x7FFFFFFF)
                   .map(lambda n: str(ipaddress.IPv4Address(n)))).map(
        lambda a: b"\x01" + ipaddress.IPv4Address(a).packed)
    v6 = st.sampled_from(LOCAL_IPV6).map(lambda a: b"\x04" + ipaddress.IPv6Address(a).packed)
    dom = names(known).map(lambda n: b"\x03" + bytes([len(n)]) + n)
    odd = st.one_of(st.binary(max_size=24).map(lambda b: b"\x03\x00" + b),  # empty name
                    st.tuples(st.sampled_from([0, 2, 5, 0xFF]), st.binary(max_size=20))
                    .map(lambda t: bytes([t[0]]) + t[1]))  # unknown ATYP
    address = st.one_of(v4, v6, dom, odd)
    return st.tuples(address, port).map(lambda t: t[0] + t[1])


# -- strategies and delivery: SOCKS5 over TCP -------------------------------------------------


@dataclass
class SocksScript:
    chunks: list[bytes]
    close: str
    read: bool
    note: str = ""

    def __repr__(self) -> str:
        return f"SocksScript(note={self.note!r}, close={self.close!r}, chunks={self.chunks!r})"


def socks_scripts(stack: Stack, *, auth: tuple[str, str] | None, known: bool
                  ) -> st.SearchStrategy[SocksScript]:
    """Greeting, optional RFC 1929 exchange, request, optional data; each possibly broken."""
    methods = st.one_of(st.just(b"\x00\x02"), st.just(b"\x00"), st.just(b"\x02"),
                        st.binary(min_size=0, max_size=255))

    mostly_valid = st.sampled_from([True, True, True, False])

    @st.composite
    def greeting(draw) -> bytes:
        if draw(mostly_valid):
            if auth:
                return b"\x05\x02\x00\x02"
            return draw(st.sampled_from([b"\x05\x01\x00", b"\x05\x02\x00\x02"]))
        m = draw(methods)
        ver = draw(st.sampled_from([5, 5, 5, 4, 0, 0xFF]))
        n = draw(st.one_of(st.just(len(m)), st.integers(0, 255)))
        return bytes([ver, n]) + m

    cred_bytes = st.binary(max_size=255) if known else \
        st.text(max_size=60).map(lambda t: t.encode()[:255])

    @st.composite
    def userpass(draw) -> bytes:
        if auth is not None and draw(mostly_valid):
            return bytes([1, len(auth[0])]) + auth[0].encode() + bytes([len(auth[1])]) + auth[1].encode()
        if auth is not None and draw(st.booleans()):
            u, p = auth[0].encode(), auth[1].encode()
        else:
            u, p = draw(cred_bytes), draw(cred_bytes)
        ver = draw(st.sampled_from([1, 1, 1, 5, 0]))
        ulen = draw(st.one_of(st.just(len(u)), st.integers(0, 255)))
        plen = draw(st.one_of(st.just(len(p)), st.integers(0, 255)))
        return bytes([ver, ulen]) + u + bytes([plen]) + p

    @st.composite
    def request(draw) -> bytes:
        if draw(mostly_valid):
            ver, cmd, rsv = 5, draw(st.sampled_from([1, 1, 1, 2, 3])), 0
        else:
            ver = draw(st.sampled_from([5, 5, 5, 4, 0]))
            cmd = draw(st.sampled_from([1, 1, 1, 2, 3, 3, 0, 4, 0xFF]))
            rsv = draw(st.sampled_from([0, 0, 1, 0xFF]))
        return bytes([ver, cmd, rsv]) + draw(socks_address(stack, known))

    http_get = st.just(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    closes = ["close", "half", "rst"] if known else ["close", "half"]

    @st.composite
    def script(draw) -> SocksScript:
        kind = draw(st.sampled_from(["garbage", "greeting", "auth", "request", "full"]))
        chunks: list[bytes] = []
        if kind == "garbage":
            chunks.append(draw(st.binary(min_size=0, max_size=4096)))
        else:
            chunks.append(draw(greeting()))
            if kind != "greeting":
                if auth is not None:
                    chunks.append(draw(userpass()))
                if kind in ("request", "full"):
                    chunks.append(draw(request()))
                if kind == "full":
                    chunks.append(draw(st.one_of(http_get, st.binary(max_size=2048))))
        if draw(st.booleans()):  # everything in one segment instead of one per step
            chunks = [b"".join(chunks)]
        close = draw(st.sampled_from(closes))
        return SocksScript(chunks, close, draw(st.booleans()), kind)

    return script()


def hit_socks(port: int, script: SocksScript, src: str) -> bytes:
    s = connect(port, src)
    got = b""
    try:
        for chunk in script.chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break
            if script.read:
                got += drain(s, 0.05)
        if script.close != "rst":
            got += drain(s, 0.1)
    finally:
        finish(s, script.close)
    return got


# -- SOCKS5 UDP -------------------------------------------------------------------------------


def socks_handshake(s: socket.socket, auth: tuple[str, str] | None, cmd: int, addr: bytes
                    ) -> tuple[int, bytes]:
    """A well-formed negotiation; returns (reply code, BND part) or raises OSError/ValueError."""
    s.sendall(b"\x05\x02\x00\x02" if auth else b"\x05\x01\x00")
    buf, _ = read_until(s, lambda b: 2 if len(b) >= 2 else None)
    if len(buf) < 2:
        raise ValueError(f"no method reply: {buf!r}")
    if buf[1] == 2:
        assert auth is not None
        u, p = auth[0].encode(), auth[1].encode()
        s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        rep, _ = read_until(s, lambda b: 2 if len(b) >= 2 else None)
        if len(rep) < 2 or rep[1] != 0:
            raise ValueError(f"auth refused: {rep!r}")
    s.sendall(bytes([5, cmd, 0]) + addr)

    def whole(b: bytes) -> int | None:
        if len(b) < 5:
            return None
        n = {1: 10, 4: 22}.get(b[3], 7 + b[4])
        return n if len(b) >= n else None

    rep, n = read_until(s, whole, budget=10.0)
    if n is None:
        raise ValueError(f"no reply: {rep!r}")
    return rep[1], rep[4:n]


@dataclass
class UdpScript:
    datagrams: list[bytes]
    close: str

    def __repr__(self) -> str:
        return f"UdpScript(close={self.close!r}, datagrams={self.datagrams!r})"


def udp_scripts(stack: Stack, known: bool) -> st.SearchStrategy[UdpScript]:
    good = st.binary(max_size=512).map(
        lambda p: b"\x00\x00\x00\x01" + socket.inet_aton(HOST) + stack.udp_echo.port.to_bytes(2, "big")
        + p)
    shaped = st.tuples(st.sampled_from([b"\x00\x00", b"\x00\x01", b"\xff\xff"]),
                       st.sampled_from([0, 0, 1, 0x80, 0xFF]), socks_address(stack, known),
                       st.binary(max_size=1024)).map(lambda t: t[0] + bytes([t[1]]) + t[2] + t[3])
    datagram = st.one_of(good, shaped, st.binary(max_size=1500))
    closes = ["close", "rst"] if known else ["close"]
    return st.builds(UdpScript, st.lists(datagram, min_size=1, max_size=8), st.sampled_from(closes))


def hit_udp(port: int, auth: tuple[str, str] | None, script: UdpScript, src: str) -> int:
    """UDP ASSOCIATE on ``port``, the datagrams to its relay; returns how many came back."""
    s = connect(port, src)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back = 0
    try:
        u.bind((src, 0))
        code, bnd = socks_handshake(s, auth, 3, b"\x01\x00\x00\x00\x00\x00\x00")
        if code != 0:
            return 0
        relay = (socket.inet_ntoa(bnd[1:5]) if bnd[0] == 1 else HOST, int.from_bytes(bnd[-2:], "big"))
        if relay[0] == "0.0.0.0":
            relay = (HOST, relay[1])
        for d in script.datagrams:
            try:
                u.sendto(d, relay)
            except OSError:
                pass
        u.settimeout(0.1)
        for _ in script.datagrams:
            try:
                u.recvfrom(65535)
                back += 1
            except OSError:
                break
    except (OSError, ValueError):
        pass
    finally:
        u.close()
        finish(s, script.close)
    return back


# -- WebSocket --------------------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
             length: int | None = None, key: bytes | None = None) -> bytes:
    """One RFC 6455 frame, with every field under the caller's control (lies included)."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    mbit = 0x80 if masked else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += (n & (1 << 64) - 1).to_bytes(8, "big")
    if masked:
        key = key if key is not None else os.urandom(4)
        head += key
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload)) if len(payload) < 4096 else \
            _mask_big(payload, key)
    return bytes(head) + payload


def _mask_big(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    k = int.from_bytes((key * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def upgrade_request(port: int, path: str = "/socket", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def ws_open(port: int, src: str, extra: str = "") -> tuple[socket.socket, bytes]:
    """A socket past a successful upgrade, and the bytes that followed the 101 head."""
    s = connect(port, src)
    try:
        s.sendall(upgrade_request(port, extra=extra))
        buf, _ = read_until(s, lambda b: b.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in b else None)
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ValueError(f"upgrade refused: {head[:200]!r}")
        return s, rest
    except BaseException:
        s.close()
        raise


def channel_ids() -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(b"\x00" * 16), st.just(b"\xff" * 16), st.binary(min_size=16, max_size=16))


def messages(stack: Stack, known: bool, *, gzip_members: int = 2000) -> st.SearchStrategy[bytes]:
    """LinkSocks messages: valid ones with hostile fields (from protocol.pack), gzip Data made of
    many empty members, and mutations of packed messages (flipped, cut, extended)."""
    text = st.text(max_size=40)
    addr = st.one_of(names(known).map(lambda n: n.decode("utf-8", "replace")[:200]),
                     st.sampled_from(LOCAL_IPV4 + LOCAL_IPV6))
    port = ports(stack)
    proto = st.sampled_from([protocol.TCP, protocol.UDP, 0, 3, 0xFF])
    built = st.one_of(
        st.builds(protocol.Auth, text, st.booleans(), st.binary(min_size=16, max_size=16)),
        st.builds(protocol.Connect, proto, channel_ids(), addr, port),
        st.builds(protocol.Data, st.sampled_from([protocol.TCP, protocol.UDP]), channel_ids(),
                  st.binary(max_size=2048), st.sampled_from([0, 1]), st.just(""), st.just(0),
                  st.one_of(st.just(""), addr), st.one_of(st.just(0), port)),
        st.builds(protocol.Disconnect, channel_ids(), text),
        st.builds(protocol.ConnectResponse, st.booleans(), channel_ids(), text),
        st.builds(protocol.Connector, channel_ids(), text, st.sampled_from([1, 2, 0, 9])),
        st.builds(protocol.Log, st.sampled_from(["info", "error", "x"]), text),
        st.builds(protocol.Partners, st.integers(0, 1 << 31)),
        st.builds(protocol.WindowUpdate, channel_ids(), st.integers(0, (1 << 32) - 1)),
        st.builds(protocol.Eof, channel_ids()),
        st.builds(protocol.Unknown, st.integers(0x0E, 0xFF).filter(
            lambda t: t not in (protocol.T_WINDOW_UPDATE, protocol.T_EOF)), st.binary(max_size=64)),
    )

    def safe_pack(m) -> bytes:
        try:
            return protocol.pack(m)
        except (ValueError, OverflowError):
            return b"\x01\x04"

    packed = built.map(safe_pack)
    bomb = st.integers(1, gzip_members).map(
        lambda n: b"\x01\x04\x01" + b"\x00" * 16 + b"\x01" + _gzip_members(n))

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(packed))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "extend", "version"]))
            if op == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
            elif op == "cut":
                del data[draw(st.integers(0, len(data))):]
            elif op == "extend":
                data += draw(st.binary(max_size=64))
            elif op == "version" and data:
                data[0] = draw(st.sampled_from([0x00, 0x02, 0x10, 0x11, 0xFF]))
        return bytes(data)

    return st.one_of(packed, packed, mutated(), bomb, st.binary(max_size=256))


def _gzip_members(n: int) -> bytes:
    member = gzip.compress(b"", mtime=0)
    return struct.pack(">I", n * len(member)) + member * n


@dataclass
class WsScript:
    frames: list[bytes]
    close: str

    def __repr__(self) -> str:
        return f"WsScript(close={self.close!r}, frames={self.frames!r})"


def frames(stack: Stack, known: bool) -> st.SearchStrategy[bytes]:
    """Frames around LinkSocks messages: proper binary frames, fragmented, wrong opcodes, bad
    RSV bits, unmasked, lying lengths, control frames of every size, close codes, raw bytes."""
    msg = messages(stack, known)

    @st.composite
    def odd(draw) -> bytes:
        payload = draw(st.one_of(msg, st.binary(max_size=300)))
        opcode = draw(st.sampled_from([0, 1, 2, 2, 3, 7, 8, 9, 10, 11, 15]))
        if opcode >= 8:
            payload = payload[:draw(st.sampled_from([0, 2, 125, 126, 200]))]
        length = draw(st.one_of(st.none(), st.sampled_from([0, 125, 126, 65535, 65536, 1 << 32,
                                                             (1 << 63) - 1, 1 << 63])))
        return ws_frame(opcode, payload, fin=draw(st.booleans()), rsv=draw(st.integers(0, 7)),
                        masked=draw(st.sampled_from([True, True, True, False])), length=length)

    fragmented = st.tuples(msg, st.integers(1, 8)).map(lambda t: b"".join(
        ws_frame(2 if i == 0 else 0, t[0][i * len(t[0]) // t[1]:(i + 1) * len(t[0]) // t[1]],
                 fin=i == t[1] - 1) for i in range(t[1])))
    close = st.tuples(st.sampled_from([1000, 1001, 1002, 999, 1005, 1006, 1015, 2999, 3000, 4999, 5000,
                                       0, 65535]), st.binary(max_size=60)).map(
        lambda t: ws_frame(8, t[0].to_bytes(2, "big") + t[1]))
    ping = st.binary(max_size=125).map(lambda p: ws_frame(9, p))
    pong = st.binary(max_size=125).map(lambda p: ws_frame(10, p))
    return st.one_of(msg.map(lambda m: ws_frame(2, m)), msg.map(lambda m: ws_frame(2, m)),
                     fragmented, odd(), close, ping, pong, st.binary(max_size=64))


def ws_scripts(stack: Stack, known: bool, *, max_frames: int = 8) -> st.SearchStrategy[WsScript]:
    closes = ["close", "half", "rst"] if known else ["close", "half"]
    return st.builds(WsScript, st.lists(frames(stack, known), min_size=1, max_size=max_frames),
                     st.sampled_from(closes))


def hit_ws(port: int, script: WsScript, src: str, *, token: str | None) -> bytes:
    """Upgrade, authenticate with ``token`` if given (a proper Auth), send the frames."""
    s, got = ws_open(port, src, extra="X-Trisocks-Flow: window=1048576, eof=1\r\n"
                     if token and script.close == "half" else "")
    try:
        if token is not None:
            s.sendall(ws_frame(2, protocol.pack(protocol.Auth(token, False, os.urandom(16)))))
            buf, _ = read_until(s, lambda b: 1 if len(b) >= 5 else None, budget=5.0)
            if len(buf) < 5 or buf[4] != 1:  # AuthResponse success byte of an unmasked frame
                raise AssertionError(f"the attacker token was refused: {buf[:80]!r}")
            got += buf
        for frame in script.frames:
            try:
                s.sendall(frame)
            except OSError:
                break
        got += drain(s, 0.1)
    finally:
        finish(s, script.close)
    return got


@dataclass
class UpgradeScript:
    head: bytes
    after: bytes
    close: str

    def __repr__(self) -> str:
        return f"UpgradeScript(close={self.close!r}, head={self.head!r}, after={self.after!r})"


def upgrade_scripts(stack: Stack, known: bool) -> st.SearchStrategy[UpgradeScript]:
    """HTTP upgrade requests with odd methods, paths, versions and headers, then frames."""
    method = st.sampled_from(["GET", "GET", "POST", "HEAD", "get", "CONNECT", "G\x00T", ""])
    path = st.one_of(st.sampled_from(["/socket", "/socket/", "/socket?token=" + "0" * 64,
                                      "/socket?token=&reverse=true", "/socket?reverse=maybe",
                                      "*", "/", "/%00", "/socket/../api/status", "x" * 9000]),
                     st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
                     .map(lambda p: "/" + p))
    version = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", ""])
    header_pool = ["Upgrade: websocket", "Upgrade: WebSocket", "Upgrade: h2c", "Connection: Upgrade",
                   "Connection: keep-alive, Upgrade", "Connection: close",
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Key: short",
                   "Sec-WebSocket-Key:", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8",
                   "Sec-WebSocket-Version: 99999999999999999999", "Host: 127.0.0.1",
                   "Host:", "X-Trisocks-Flow: window=0", "X-Trisocks-Flow: window=99999999999999",
                   "X-Trisocks-Flow: window=-1, eof=1", "X-Trisocks-Flow: eof=1",
                   "Content-Length: 5", "Content-Length: -1", "Transfer-Encoding: chunked",
                   "X-Forwarded-For: 10.0.0.1", "Sec-WebSocket-Extensions: permessage-deflate",
                   "Sec-WebSocket-Protocol: a, b", "Bad Header: x", ":", "X: " + "y" * 70000]
    headers = st.lists(st.one_of(st.sampled_from(header_pool),
                                 st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                         max_size=60)), max_size=10)
    after = st.one_of(st.just(b""), frames(stack, known), st.binary(max_size=512))
    closes = ["close", "half", "rst"] if known else ["close", "half"]

    valid = ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]

    @st.composite
    def script(draw) -> UpgradeScript:
        if draw(st.booleans()):  # a valid upgrade with one or two things changed
            lines = ["GET /socket HTTP/1.1", *valid]
            for _ in range(draw(st.integers(1, 2))):
                i = draw(st.integers(0, len(lines) - 1))
                op = draw(st.sampled_from(["drop", "replace", "add"]))
                if op == "drop" and len(lines) > 1:
                    del lines[i]
                elif op == "replace":
                    lines[i] = draw(st.one_of(st.sampled_from(header_pool), path.map(
                        lambda p: f"GET {p} HTTP/1.1")))
                else:
                    lines.append(draw(st.sampled_from(header_pool)))
        else:
            lines = [f"{draw(method)} {draw(path)} {draw(version)}".strip(), *draw(headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        return UpgradeScript(head, draw(after), draw(st.sampled_from(closes)))

    return script()


def hit_upgrade(port: int, script: UpgradeScript, src: str) -> bytes:
    s = connect(port, src)
    try:
        s.sendall(script.head)
        got = drain(s, 0.05)
        if script.after:
            try:
                s.sendall(script.after)
            except OSError:
                pass
        return got + drain(s, 0.1)
    finally:
        finish(s, script.close)


# -- HTTP API ---------------------------------------------------------------------------------


@dataclass
class ApiScript:
    raw: bytes
    good_key: bool

    def __repr__(self) -> str:
        return f"ApiScript(good_key={self.good_key!r}, raw={self.raw!r})"


API_PATHS = ["/api/status", "/api/token", "/api/token/{t}", "/api/users", "/api/users/{k}",
             "/api/users/{k}/limit", "/api/users/{k}/expiry", "/api/users/{k}/reset",
             "/api/users/{k}/rotate", "/api/server/status", "/api/stats", "/api/events",
             "/api/events?limit={n}", "/api/events?since={d}&user={k}&type=auth_success",
             "/api/subscribe/{k}", "/healthz", "/metrics", "/api/openapi.json", "/", "/api/",
             "/api/users/", "/api//users", "/api/users/{k}/%2e%2e", "/api/token/%00",
             "/socket"]
PROTECTED = {VICTIM_TOKEN, ATTACKER_TOKEN, REVERSE_TOKEN}


def api_scripts(known: bool) -> st.SearchStrategy[ApiScript]:
    ident = st.one_of(st.sampled_from(["fuzz-user-0001", "fuzz-user-0002", "fuzz-tok-0001", "x",
                                       "a" * 300, "%ff", "..", "%2F"]),
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~%",
                              min_size=1, max_size=40))
    sane_dates = st.datetimes(min_value=datetime.datetime(1990, 1, 1),
                              max_value=datetime.datetime(2200, 1, 1)).map(
        lambda d: d.isoformat() + "Z")
    odd_dates = st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00",
                                 "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
    dates = st.one_of(sane_dates, st.sampled_from(["", "yesterday", "2030-13-45T99:99:99Z", "null"]),
                      *([odd_dates] if known else []))
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                       st.floats(allow_nan=True), st.text(max_size=30))
    fields = {"key": ident, "name": st.one_of(ident, st.text(max_size=300)),
              "limit_bytes": st.one_of(st.integers(-1, 1 << 64), scalar),
              "expires_at": st.one_of(dates, scalar), "status": st.sampled_from(
                  ["active", "disabled", "", "DELETED"]),
              "type": st.sampled_from(["forward", "reverse", "connector", "", "x"]),
              "token": ident, "reverse_token": ident,
              "port": st.one_of(st.just(0), st.integers(-1, 70000)),
              "username": st.text(max_size=20), "password": st.text(max_size=20),
              "allow_manage_connector": st.one_of(st.booleans(), scalar)}
    json_body = st.fixed_dictionaries({}, optional={k: v for k, v in fields.items()}).map(
        lambda d: json.dumps(d, allow_nan=True).encode())
    body = st.one_of(json_body, json_body, st.just(b""), st.binary(max_size=300),
                     st.just(b"[]"), st.just(b'{"key": '), st.just(b"null"),
                     st.just(b'{"a":' * 200 + b"1" + b"}" * 200))
    method = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "GET", "POST", "OPTIONS",
                              "HEAD", "TRACE", "BREW", "get"])
    extra_headers = st.lists(st.sampled_from([
        "Content-Type: application/json", "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
        "Content-Encoding: gzip", "Accept: text/plain", "Accept: */*", "Expect: 100-continue",
        "Transfer-Encoding: chunked", "Forwarded: for=10.0.0.1", "X-Forwarded-For: 10.0.0.1",
        "Authorization: Bearer " + KEY, "Authorization: Basic Zm9vOmJhcg==", "X-API-Key: ",
        "Cookie: a=b", "Range: bytes=0-1"]), max_size=4)

    @st.composite
    def script(draw) -> ApiScript:
        path = draw(st.sampled_from(API_PATHS)).format(
            t=draw(ident), k=draw(ident), n=draw(st.integers(-5, 10 ** 6)), d=draw(dates))
        if any(p in path for p in PROTECTED):
            path = "/api/status"
        m = draw(method)
        good = draw(st.integers(0, 4)) > 0
        key_line = [f"X-API-Key: {KEY}"] if good else draw(st.sampled_from(
            [[], ["X-API-Key: wrong-key"], ["X-API-Key: " + KEY[:-1]], ["Authorization: Bearer x"]]))
        b = draw(body)
        if any(p.encode() in b for p in PROTECTED):
            b = b"{}"
        hdrs = draw(extra_headers)
        framing = draw(st.sampled_from(["length", "length", "none", "short", "long", "chunked",
                                        "badchunk"]))
        lines = [f"{m} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *key_line, *hdrs]
        if framing == "length" or (framing == "none" and b):
            lines.append(f"Content-Length: {len(b)}")
        elif framing == "short":
            lines.append(f"Content-Length: {max(0, len(b) - 3)}")
        elif framing == "long":
            lines.append(f"Content-Length: {len(b) + 10}")
        elif framing in ("chunked", "badchunk"):
            lines.append("Transfer-Encoding: chunked")
            b = (f"{len(b):x}\r\n".encode() + b + b"\r\n0\r\n\r\n") if framing == "chunked" else \
                (b"zz\r\n" + b + b"\r\n")
        if not good and any(h.startswith("Authorization: Bearer " + KEY) for h in hdrs):
            good = True
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + b
        return ApiScript(raw, good)

    return script()


def hit_api(port: int, script: ApiScript) -> int | None:
    """Send the request; the status code of the answer (None: no answer within 3 s)."""
    s = connect(port, SRC["api"] if script.good_key else SRC["api_bad_key"])
    try:
        try:
            s.sendall(script.raw)
        except OSError:
            pass
        buf, _ = read_until(s, lambda b: 1 if b"\r\n" in b else None, budget=3.0)
    finally:
        finish(s, "close")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return int(m.group(1)) if m else None


# -- bookkeeping ------------------------------------------------------------------------------


@dataclass
class Tally:
    """Inputs tried per listener, the last few of each (to name the culprit), answers seen."""

    tried: Counter = field(default_factory=Counter)
    last: dict[str, deque] = field(default_factory=dict)
    answers: dict[str, Counter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, listener: str, script: object, answer: object = None) -> None:
        with self.lock:
            self.tried[listener] += 1
            self.last.setdefault(listener, deque(maxlen=5)).append(script)
            if answer is not None:
                self.answers.setdefault(listener, Counter())[answer] += 1

    def culprits(self, listener: str) -> str:
        return "\n".join(repr(s)[:2000] for s in self.last.get(listener, ()))


class ProcessDied(AssertionError):
    pass


class ServerError(AssertionError):
    pass


# -- campaigns: one listener, many inputs -----------------------------------------------------

LISTENERS = ["client.socks", "client.udp", "reverse.socks", "reverse.udp", "server.ws_upgrade",
             "server.ws_preauth", "server.ws_authed", "server.api"]
AUTH = (SOCKS_USER, SOCKS_PASS)


_rotation = iter(range(1 << 30))


def rotating_source() -> str:
    n = next(_rotation) % 65000 + 1
    return f"127.1.{n >> 8}.{n & 0xFF}"


def campaign(stack: Stack, listener: str, known: bool
             ) -> tuple[st.SearchStrategy, Callable[[object], object]]:
    """The strategy of inputs for ``listener`` and the function that delivers one."""
    if listener == "client.socks":
        return socks_scripts(stack, auth=AUTH, known=known), \
            lambda s: len(hit_socks(stack.client.port, s, SRC["socks"]))
    if listener == "reverse.socks":
        return socks_scripts(stack, auth=None, known=known), \
            lambda s: len(hit_socks(stack.reverse_socks, s, SRC["rsocks"]))
    if listener == "client.udp":
        return udp_scripts(stack, known), lambda s: hit_udp(stack.client.port, AUTH, s, SRC["udp"])
    if listener == "reverse.udp":
        return udp_scripts(stack, known), lambda s: hit_udp(stack.reverse_socks, None, s, SRC["udp"])
    if listener == "server.ws_upgrade":
        return upgrade_scripts(stack, known), \
            lambda s: hit_upgrade(stack.server.port, s, SRC["ws"])[:12]
    if listener == "server.ws_preauth":
        # every input a failed authentication: spread over 127.1.0.0/16, or the per-address
        # throttle (10 failures a minute, then 429) would answer most of them before any frame
        return ws_scripts(stack, known), \
            lambda s: len(hit_ws(stack.server.port, s, rotating_source(), token=None))
    if listener == "server.ws_authed":
        return ws_scripts(stack, known), \
            lambda s: len(hit_ws(stack.server.port, s, SRC["ws_auth"], token=ATTACKER_TOKEN))
    if listener == "server.api":
        return api_scripts(known), lambda s: hit_api(stack.server.port, s)
    raise KeyError(listener)


def run_campaign(stack: Stack, tally: Tally, listener: str, *, known: bool, max_examples: int,
                 derandomize: bool, deadline: float | None = None) -> None:
    """Up to ``max_examples`` inputs against ``listener`` (fewer once ``deadline``, a monotonic
    time, has passed). Raises ProcessDied / ServerError naming the last inputs. Shrinking is
    off: the processes carry state from one input to the next, so a shrunk input proves nothing
    once a process has died; the report names the last inputs instead."""
    from hypothesis import HealthCheck, Phase, given, settings

    strategy, hit = campaign(stack, listener, known)

    @settings(max_examples=max_examples, derandomize=derandomize, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, print_blob=False)
    @given(strategy)
    def one(script) -> None:
        if deadline is not None and time.monotonic() > deadline:
            return
        try:
            answer = hit(script)
        except ConnectionRefusedError as exc:
            tally.note(listener, script, "refused")
            raise ProcessDied(f"{listener}: connection refused ({exc}); dead: {stack.dead()}; "
                              f"last inputs:\n{tally.culprits(listener)}") from None
        except (OSError, ValueError) as exc:
            answer = type(exc).__name__
        tally.note(listener, script, answer)
        dead = stack.dead()
        if dead:
            raise ProcessDied(f"{', '.join(dead)} exited during {listener}; last inputs:\n"
                              f"{tally.culprits(listener)}")
        # 500 is an unexpected error; 501 is h11 refusing a transfer coding, 503 a store outage
        if listener == "server.api" and answer == 500:
            raise ServerError(f"server.api answered {answer} to:\n{script!r}")

    one()


class Monitor(threading.Thread):
    """Samples RSS and fds of every process each ``interval`` s; keeps the maxima."""

    def __init__(self, stack: Stack, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="monitor")
        self.stack, self.interval = stack, interval
        self.max_rss: dict[str, int] = {}
        self.max_fds: dict[str, int] = {}
        self.first: dict[str, tuple[int | None, int | None]] = stack.sample()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.take()

    def take(self) -> dict[str, tuple[int | None, int | None]]:
        sample = self.stack.sample()
        for name, (rss, fds) in sample.items():
            if rss is not None:
                self.max_rss[name] = max(self.max_rss.get(name, 0), rss)
            if fds is not None:
                self.max_fds[name] = max(self.max_fds.get(name, 0), fds)
        return sample

    def stop(self) -> dict[str, tuple[int | None, int | None]]:
        self._halt.set()
        self.join(5)
        return self.take()


def verdict(stack: Stack, transfers: list[Transfer], monitor: Monitor) -> list[str]:
    """Everything wrong after an attack: exits, broken transfers, RSS over the bound, tracebacks."""
    problems = []
    for name, p in stack.processes().items():
        if not p.alive():
            problems.append(f"{name} exited with status {p.returncode}\n{p.describe()}")
    for t in transfers:
        if not t.results:
            problems.append(f"{t.name}: no download finished")
        for i, r in enumerate(t.results):
            if not r.ok:
                problems.append(f"{t.name} #{i}: {r.detail}")
    for name, kib in monitor.max_rss.items():
        if kib > RSS_BOUND_MIB * 1024:
            problems.append(f"{name}: RSS reached {kib / 1024:.0f} MiB (bound {RSS_BOUND_MIB} MiB)")
    for name, tb in stack.tracebacks().items():
        problems.append(f"{name} logged a traceback:\n{tb}")
    return problems


def summary(stack: Stack, tally: Tally, monitor: Monitor, seconds: float,
            transfers: list[Transfer]) -> str:
    lines = [f"attack run: {sum(tally.tried.values())} inputs in {seconds:.0f} s"]
    for listener in LISTENERS:
        answers = tally.answers.get(listener, Counter())
        top = ", ".join(f"{a}: {n}" for a, n in answers.most_common(4))
        lines.append(f"  {listener:<20} {tally.tried[listener]:>7} inputs   ({top})")
    for name in stack.processes():
        first_rss, first_fds = monitor.first.get(name, (None, None))
        lines.append(f"  {name:<9} RSS {(first_rss or 0) / 1024:6.1f} -> max "
                     f"{monitor.max_rss.get(name, 0) / 1024:6.1f} MiB (bound {RSS_BOUND_MIB}); fds "
                     f"{first_fds} -> max {monitor.max_fds.get(name)}; "
                     f"{'alive' if stack.processes()[name].alive() else 'EXITED'}")
    for t in transfers:
        ok = sum(r.ok for r in t.results)
        lines.append(f"  {t.name}: {ok}/{len(t.results)} downloads of {t.size // MiB} MiB intact")
    return "\n".join(lines)
