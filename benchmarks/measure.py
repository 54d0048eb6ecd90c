"""Measurements with real clients: curl for bulk bytes, hey for request rate (a small
asyncio client when hey is missing), and /proc for RSS and CPU time.

Units: MB/s = 10**6 bytes per second; latency in milliseconds; RSS in bytes.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import statistics
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from procs import cpu_seconds


class ProbeError(Exception):
    """An end-to-end probe request did not succeed."""


# ---- SOCKS5 / HTTP client helpers ------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProbeError("connection closed during SOCKS5 handshake")
        data += chunk
    return data


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """Plain SOCKS5 (no auth) CONNECT to an IPv4 literal over a connected socket."""
    sock.sendall(b"\x05\x01\x00")
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise ProbeError("SOCKS5 greeting refused")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    head = _recv_exact(sock, 4)
    if head[1] != 0:
        raise ProbeError(f"SOCKS5 CONNECT failed with reply {head[1]}")
    atyp = head[3]
    alen = 4 if atyp == 1 else 16 if atyp == 4 else _recv_exact(sock, 1)[0]
    _recv_exact(sock, alen + 2)


def _http_get_1k(sock: socket.socket) -> None:
    """GET /1k and read the answer up to its Content-Length (not up to EOF: some tunnels
    pass the target's close on late)."""
    sock.sendall(b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = b""
    while not _http_complete(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    _check_1k(data)


def _http_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return m is not None and len(body) >= int(m.group(1))


def _check_1k(data: bytes) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or len(body) != 1024:
        raise ProbeError(f"unexpected HTTP answer: {head[:40]!r}, {len(body)} body bytes")


def probe_socks_http(socks_port: int, nginx_port: int, timeout: float = 3.0) -> None:
    with socket.create_connection(("127.0.0.1", socks_port), timeout=timeout) as s:
        socks5_connect(s, "127.0.0.1", nginx_port)
        _http_get_1k(s)


def probe_http(port: int, timeout: float = 3.0) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        _http_get_1k(s)


# ---- payloads ----------------------------------------------------------------------------

@dataclass
class Payload:
    root: Path          # served by nginx
    size: int           # bytes of /big
    streams: int        # parallel streams; each moves size // streams
    big: Path
    part: Path          # upload source for one of the parallel streams

    @property
    def part_size(self) -> int:
        return self.size // self.streams


def make_payload(root: Path, size: int, streams: int, content: str = "zero") -> Payload:
    """Files nginx serves: /big (``size`` bytes), /1k, and ``part`` (size // streams, the
    upload source of one parallel stream). ``content`` is "zero" (a sparse zero-filled
    file, cheap to make) or "random" (incompressible)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    big, part = root / "big", root / "part"
    for path, n in ((big, size), (part, size // streams)):
        with open(path, "wb") as f:
            if content == "zero":
                f.truncate(n)
            else:
                left = n
                while left:
                    chunk = os.urandom(min(16 * 2**20, left))
                    f.write(chunk)
                    left -= len(chunk)
    (root / "1k").write_bytes(os.urandom(1024))
    for p in (big, part, root / "1k"):
        p.chmod(0o644)
    return Payload(root, size, streams, big, part)


def check_upload_sink(curl: str, nginx_port: int, payload: Payload) -> dict:
    """Upload the part file straight to nginx and check curl sent every byte (nginx
    answers /upload early; the body must still be read to the end, not cut short)."""
    proc = subprocess.run([curl, "-s", "-o", "/dev/null", "-H", "Expect:", "-T",
                           str(payload.part), f"http://127.0.0.1:{nginx_port}/upload",
                           "-w", CURL_FMT, "--max-time", "120"],
                          capture_output=True, text=True, timeout=180, check=False)
    try:
        code, _, up, _, _ = _parse_curl(proc.stdout)
    except ValueError:
        code, up = 0, 0
    return {"http_code": code, "uploaded": up, "expected": payload.part_size,
            "ok": proc.returncode == 0 and code == 200 and up == payload.part_size}


# ---- bulk transfers with curl -------------------------------------------------------

CURL_FMT = "%{http_code} %{size_download} %{size_upload} %{speed_download} %{speed_upload}"


@dataclass
class Target:
    """Where clients send their traffic: through a SOCKS5 port, or straight at a relay."""

    kind: str           # "socks" or "relay"
    entry_port: int
    nginx_port: int
    env: dict
    # with several clients (run.py --clients N): each one's SOCKS5 port; stream or load
    # generator i uses ports[i % N]
    ports: tuple[int, ...] = ()

    def url(self, path: str) -> str:
        port = self.nginx_port if self.kind == "socks" else self.entry_port
        return f"http://127.0.0.1:{port}{path}"

    def port(self, i: int = 0) -> int:
        return self.ports[i % len(self.ports)] if self.ports else self.entry_port

    def curl_args(self, i: int = 0) -> list[str]:
        if self.kind == "socks":
            return ["--socks5-hostname", f"127.0.0.1:{self.port(i)}"]
        return []


def _curl_argv(curl: str, target: Target, extra: list[str], max_time: float,
               i: int = 0) -> list[str]:
    return [curl, "-s", "-o", "/dev/null", "--max-time", f"{max_time:.0f}",
            *target.curl_args(i), "-w", CURL_FMT, *extra]


def _parse_curl(out: str) -> tuple[int, int, int, float, float]:
    code, down, up, sdown, sup = out.split()
    return int(code), int(down), int(up), float(sdown), float(sup)


def _max_time(nbytes: int) -> float:
    return max(30.0, nbytes / 2e6)  # never slower than 2 MB/s, or it is an error


def curl_transfer(curl: str, target: Target, direction: str, payload: Payload,
                  streams: int) -> tuple[float | None, str | None]:
    """Move ``payload.size`` bytes in ``streams`` parallel curls; return (MB/s, error).

    One stream: curl's own average speed. Several: total bytes / wall time.
    """
    jobs = []
    for i in range(streams):
        if direction == "down":
            if streams == 1:
                extra, want = [target.url("/" + payload.big.name)], payload.size
            else:
                a = i * payload.part_size
                extra = ["-r", f"{a}-{a + payload.part_size - 1}",
                         target.url("/" + payload.big.name)]
                want = payload.part_size
        else:
            src = payload.big if streams == 1 else payload.part
            want = payload.size if streams == 1 else payload.part_size
            extra = ["-H", "Expect:", "-T", str(src), target.url("/upload")]
        jobs.append((_curl_argv(curl, target, extra, _max_time(payload.size), i), want))
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=target.env, stdin=subprocess.DEVNULL) for argv, _ in jobs]
    try:
        outs = [p.communicate() for p in procs]
    except BaseException:  # interrupted: leave no curl behind
        for p in procs:
            p.kill()
            p.wait()
        raise
    wall = time.perf_counter() - t0
    speed = 0.0
    for (_, want), proc, (out, err) in zip(jobs, procs, outs, strict=True):
        if proc.returncode != 0:
            return None, f"curl exit {proc.returncode}: {err.strip()[:200]}"
        try:
            code, down, up, sdown, sup = _parse_curl(out)
        except ValueError:
            return None, f"unreadable curl output {out[:80]!r}"
        moved = down if direction == "down" else up
        if code not in (200, 206) or moved != want:
            return None, f"HTTP {code}, moved {moved} of {want} bytes"
        speed = sdown if direction == "down" else sup
    if streams == 1:
        return speed / 1e6, None
    return payload.size / wall / 1e6, None


def bulk_warmup(curl: str, target: Target, payload: Payload) -> str | None:
    """One part-sized download and upload, not counted: first-connection costs
    (forks, pools, lazy imports, TCP windows) stay out of the figures."""
    for direction, extra in (("down", [target.url("/part")]),
                             ("up", ["-H", "Expect:", "-T", str(payload.part),
                                     target.url("/upload")])):
        argv = _curl_argv(curl, target, extra, _max_time(payload.part_size))
        proc = subprocess.run(argv, capture_output=True, text=True, env=target.env,
                              stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            return f"warm-up {direction}: curl exit {proc.returncode}"
    return None


def bulk_rep(curl: str, target: Target, payload: Payload, pgids: list[int],
             progress) -> dict:
    """One repetition of the bulk group: 1 stream down, up; N streams down, up."""
    result: dict = {"errors": []}
    cpu0 = cpu_seconds(pgids)
    moved = 0
    for key, direction, streams in (("down", "down", 1), ("up", "up", 1),
                                    ("down_par", "down", payload.streams),
                                    ("up_par", "up", payload.streams)):
        mbps, err = curl_transfer(curl, target, direction, payload, streams)
        result[key] = mbps
        if err:
            result["errors"].append(f"{key}: {err}")
            progress(f"{key:8s} ERROR {err}")
        else:
            moved += payload.size
            progress(f"{key:8s} {mbps:8.1f} MB/s")
    cpu = cpu_seconds(pgids) - cpu0
    result["cpu_seconds"] = cpu
    result["bytes_moved"] = moved
    result["cpu_s_per_gib"] = cpu / (moved / 2**30) if moved else None
    return result


# ---- request rate -----------------------------------------------------------------------

def parse_hey_csv(text: str, n: int, wall: float) -> dict:
    """hey -o csv: one row per answered request. Latency percentiles are computed here
    (nearest rank) because hey's summary drops p99 below 100 requests. Wall time is the
    end of the last request (offset + response time), which leaves hey's start-up out."""
    lat: list[float] = []
    end = 0.0
    non200 = 0
    for line in text.splitlines()[1:]:
        cols = line.split(",")
        if len(cols) < 8:
            continue
        rt, code, offset = float(cols[0]), int(cols[6]), float(cols[7])
        end = max(end, offset + rt)
        if code == 200:
            lat.append(rt)
        else:
            non200 += 1
    total = end or wall
    return {"total_s": total, "wall_s": wall, "ok": len(lat), "errors": n - len(lat),
            "non_200": non200, "rps": len(lat) / total if total else None,
            "p50_ms": percentile(lat, 50) * 1000 if lat else None,
            "p99_ms": percentile(lat, 99) * 1000 if lat else None}


def hey_rate(hey: str, target: Target, n: int, c: int) -> dict:
    """One hey; with several clients (``target.ports``) one hey per client at the same
    time, sharing ``n`` and ``c``, their rows counted as one run."""
    k = max(1, min(len(target.ports), c, n))
    argvs = []
    total = 0
    for i in range(k):
        share_n, share_c = n // k + (i < n % k), c // k + (i < c % k)
        if k > 1:  # hey makes n // c requests per connection: ask for what it will do
            share_n -= share_n % share_c
        total += share_n
        argv = [hey, "-n", str(share_n), "-c", str(share_c), "-disable-keepalive", "-t", "20",
                "-o", "csv"]
        if target.kind == "socks":
            argv += ["-x", f"socks5://127.0.0.1:{target.port(i)}"]
        argvs.append(argv + [target.url("/1k")])
    t0 = time.perf_counter()
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=target.env, stdin=subprocess.DEVNULL) for argv in argvs]
    try:
        outs = [p.communicate(timeout=max(120, n / 20)) for p in runs]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = [line for out, _ in outs for line in out.splitlines()[1:]]
    res = parse_hey_csv("\n".join(["header", *rows]), total, time.perf_counter() - t0)
    res["tool"] = "hey" if k == 1 else f"hey x{k}"
    failed = [err.strip()[:300] for p, (_, err) in zip(runs, outs, strict=True) if p.returncode]
    if failed:
        res["errors"] = total
        res["note"] = failed[0]
    return res


async def _py_request(target: Target, timeout: float, i: int = 0) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", target.port(i)), timeout)
    try:
        if target.kind == "socks":
            writer.write(b"\x05\x01\x00")
            if await reader.readexactly(2) != b"\x05\x00":
                raise ProbeError("greeting refused")
            writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                         + struct.pack("!H", target.nginx_port))
            head = await reader.readexactly(4)
            if head[1] != 0:
                raise ProbeError(f"CONNECT reply {head[1]}")
            alen = {1: 4, 4: 16}.get(head[3]) or (await reader.readexactly(1))[0]
            await reader.readexactly(alen + 2)
        writer.write(b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while not _http_complete(data):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            data += chunk
        _check_1k(data)
    finally:
        writer.close()
    return time.perf_counter() - t0


async def _py_rate(target: Target, n: int, c: int, timeout: float) -> dict:
    lat: list[float] = []
    errors = 0
    remaining = n

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            try:
                lat.append(await _py_request(target, timeout, remaining))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProbeError):
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(c, n))))
    total = time.perf_counter() - t0
    return {"tool": "python", "total_s": total, "ok": len(lat), "errors": errors,
            "rps": len(lat) / total if total else None,
            "p50_ms": percentile(lat, 50) * 1000 if lat else None,
            "p99_ms": percentile(lat, 99) * 1000 if lat else None}


def py_rate(target: Target, n: int, c: int) -> dict:
    """Fallback load generator (asyncio), used when hey is not installed."""
    return asyncio.run(_py_rate(target, n, c, 20.0))


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the value below which pct% of the samples lie)."""
    vals = sorted(values)
    k = max(0, min(len(vals) - 1, math.ceil(pct / 100 * len(vals)) - 1))  # nearest rank
    return vals[k]


# ---- idle channels --------------------------------------------------------------------

class IdleServer:
    """A TCP server (own thread, asyncio) that accepts connections and holds them open
    without sending anything, counting how many are currently open."""

    def __init__(self) -> None:
        self.current = 0
        self.accepted = 0  # ever accepted (monotonic)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("idle server did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.current += 1
        self.accepted += 1
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            self.current -= 1
            writer.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()


async def _open_channel(target: Target, port: int, timeout: float):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", target.entry_port), timeout)
    try:
        if target.kind == "socks":
            writer.write(b"\x05\x01\x00")
            if await asyncio.wait_for(reader.readexactly(2), timeout) != b"\x05\x00":
                raise ProbeError("greeting refused")
            writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                         + struct.pack("!H", port))
            head = await asyncio.wait_for(reader.readexactly(4), timeout)
            if head[1] != 0:
                raise ProbeError(f"CONNECT reply {head[1]}")
            alen = {1: 4, 4: 16}.get(head[3]) or (await reader.readexactly(1))[0]
            await asyncio.wait_for(reader.readexactly(alen + 2), timeout)
    except BaseException:
        writer.close()
        raise
    return writer


async def _open_many(target: Target, port: int, n: int, conc: int = 8):
    sem = asyncio.Semaphore(conc)

    async def one():
        async with sem:
            try:
                return await _open_channel(target, port, 20.0)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProbeError):
                return None

    results = await asyncio.gather(*(one() for _ in range(n)))
    return [w for w in results if w is not None]


async def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


async def _settled_rss(read_rss, timeout: float = 3.0) -> int:
    """RSS once two readings 0.1 s apart agree within 256 KiB (or after ``timeout``)."""
    prev = read_rss()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        cur = read_rss()
        if abs(cur - prev) < 256 * 1024:
            return cur
        prev = cur
    return prev


async def _idle_rep(target: Target, server: IdleServer, n: int, read_rss) -> dict:
    # Warm-up: the first channels may pay one-off costs (session setup, buffers, pools).
    acc0 = server.accepted
    warm = await _open_many(target, server.port, 20)
    await _wait_for(lambda: server.accepted - acc0 >= len(warm), 10)
    for w in warm:
        w.close()
    # Some tunnels pass closes on late; give them a moment, do not insist.
    await _wait_for(lambda: server.current <= 0, 0.5)
    before = await _settled_rss(read_rss)
    acc0, cur0 = server.accepted, server.current
    t0 = time.perf_counter()
    writers = await _open_many(target, server.port, n)
    reached = await _wait_for(lambda: server.accepted - acc0 >= len(writers), 20)
    open_s = time.perf_counter() - t0
    after = await _settled_rss(read_rss)
    held = server.current - cur0
    for w in writers:
        w.close()
    await asyncio.sleep(0)  # let the transports close before the loop goes away
    return {"requested": n, "opened": len(writers), "held_at_target": held,
            "rss_before": before, "rss_after": after, "open_seconds": open_s,
            "bytes_per_channel": (after - before) / len(writers) if writers else None,
            "errors": n - len(writers) + (0 if reached else 1)}


def idle_rep(target: Target, server: IdleServer, n: int, read_rss) -> dict:
    return asyncio.run(_idle_rep(target, server, n, read_rss))


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
