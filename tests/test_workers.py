"""``trisocks server --workers N`` (issue 13): a supervisor and N worker processes sharing
the port. Real processes and sockets; which worker holds a connection is read from the
outside: each worker's socket descriptors (/proc/PID/fd -> socket:[inode]) matched against
the kernel's TCP table (/proc/net/tcp and tcp6), no server feature needed."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .support import (
    clean_env,
    curl,
    payload_sha256,
    start_trisocks_client,
    trisocks_cmd,
)
from .support.procs import ManagedProcess
from .support.socks import handshake

READY = re.compile(r"trisocks\.supervisor: (\d+) workers \(pids ([\d, ]+)\) on port (\d+)")
KEY = "workers-test-api-key-0123456789"
TOKEN = "workers-token"
ESTABLISHED = "01"
BIG = 50 * 2**20


# -- who holds which socket ---------------------------------------------------------------

def tcp_table() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket of this namespace."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            table[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16),
                                f[3])
    return table


def sockets_of(pid: int, table: dict) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of the TCP sockets process ``pid`` has open."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            entry = table.get(int(link[8:-1]))
            if entry is not None:
                found.append(entry)
    return found


def established_per_worker(pids, port: int) -> dict[int, int]:
    """How many established connections to ``port`` each worker holds."""
    table = tcp_table()
    return {pid: sum(1 for lp, _, st in sockets_of(pid, table) if lp == port and st == ESTABLISHED)
            for pid in pids}


def holder(pids, local_port: int, remote_port: int | None = None) -> int | None:
    """The worker with an established socket of that local (and remote) port."""
    table = tcp_table()
    for pid in pids:
        for lp, rp, st in sockets_of(pid, table):
            if lp == local_port and st == ESTABLISHED and remote_port in (None, rp):
                return pid
    return None


def session_worker(pids, client: ManagedProcess, port: int) -> int:
    """The worker holding the WebSocket session of a ``trisocks client`` (-T 1)."""
    def find():
        table = tcp_table()
        mine = [lp for lp, rp, st in sockets_of(client.pid, table)
                if rp == port and st == ESTABLISHED]
        return holder(pids, port, mine[0]) if len(mine) == 1 else None
    return client.wait_for(find, "the client's session in a worker", 10)


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# -- starting ----------------------------------------------------------------------------

@pytest.fixture
def workers(procs):
    """``workers(*flags) -> (proc, port, [worker pids])``: ``trisocks server --workers 2``
    on 127.0.0.1, once every worker is ready. Any worker still alive at the end is killed."""
    seen: list[int] = []

    def start(*flags, name="trisocks-supervisor"):
        argv = [*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", "0", "--workers", "2",
                "--grace", "10", "--max-unauthenticated", "4000",
                "--max-unauthenticated-per-address", "4000", *flags]
        proc = procs.start(argv, name=name, env=clean_env())
        match = proc.wait_for_log(READY, 30)
        pids = [int(p) for p in match.group(2).split(", ")]
        seen.extend(pids)
        assert int(match.group(1)) == len(pids) == 2, proc.describe()
        return proc, int(match.group(3)), pids

    yield start
    for pid in seen:
        if not gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(argv, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          stdin=subprocess.DEVNULL, check=False)


def hold_connections(port: int, n: int, request: bytes | None = None) -> list[socket.socket]:
    """``n`` TCP connections to the server, kept open; with ``request``, each has sent it
    and read an HTTP answer (kept alive)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            if request:
                s.sendall(request)
        if request:
            for s in socks:
                head = s.recv(65536)
                assert head.startswith(b"HTTP/1.1 200"), head[:200]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def assert_spread(proc, pids, port, n=1000, request=None) -> dict[int, int]:
    socks = hold_connections(port, n, request)
    try:
        counts = proc.wait_for(lambda: (c := established_per_worker(pids, port))
                               and sum(c.values()) == n and c, f"{n} connections accepted", 20)
    finally:
        for s in socks:
            s.close()
    for pid, count in counts.items():
        assert count >= 0.3 * n, f"worker {pid} holds {count} of {n}: {counts}"
    return counts


def probe(port: int) -> bool:
    """A new connection gets an HTTP answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def longest_outage(port: int, seconds: float, every: float = 0.025) -> tuple[float, int]:
    """Probe for ``seconds``; the longest run of failures (s), and the probes made."""
    end = time.monotonic() + seconds
    longest, since, made = 0.0, None, 0
    while time.monotonic() < end:
        t = time.monotonic()
        ok = probe(port)
        made += 1
        if ok:
            since = None
        else:
            since = t if since is None else since
            longest = max(longest, time.monotonic() - since)
        time.sleep(every)  # the probe rate, not a synchronisation
    return longest, made


class Echo:
    """A TCP echo server that records the source port of each connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.peers.append(addr[1])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def echo_through(sock: socket.socket, size: int = 256 * 1024) -> None:
    data = os.urandom(size)
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(65536)
        assert chunk, f"the tunnel closed after {len(got)} of {size} bytes"
        got += chunk
    assert bytes(got) == data


def download(pool, payload_server, socks_port: int, rate: str = "25M"):
    """50 MiB through the client's SOCKS5 port, paced to last about two seconds."""
    return pool.submit(curl, payload_server.bytes_url(BIG, 13), socks=f"127.0.0.1:{socks_port}",
                       timeout=60, extra=["--limit-rate", rate])


# -- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "x"])
def test_workers_must_be_a_positive_number(value):
    out = run([*trisocks_cmd(), "server", "-P", "0", "-t", TOKEN, "--workers", value])
    assert out.returncode == 2, out
    assert f"--workers: expected a number of 1 or more, or 'auto', not {value!r}" in out.stderr


def test_forward_spread_tunnels_and_a_killed_worker(workers, procs, payload_server):
    """Connections spread over both workers; a tunnel works through each; kill -9 of one:
    restarted (new pid, the signal logged), a download through the other goes on intact,
    and new connections fail for at most a second."""
    proc, port, pids = workers("-t", TOKEN)
    assert_spread(proc, pids, port)

    # a tunnel through each worker: a client with 16 sessions (on one worker only with
    # probability 2**-15), SOCKS5 connections to an echo server until both workers carried one
    echo = Echo()
    try:
        many = start_trisocks_client(procs, f"ws://127.0.0.1:{port}", TOKEN, threads=16)
        by_worker: dict[int, socket.socket] = {}
        opened = []
        for _ in range(32):
            h = handshake(("127.0.0.1", many.port), "127.0.0.1", echo.port, keep_open=True)
            assert h.reply == 0 and h.sock is not None, h
            opened.append(h.sock)
            peer = proc.wait_for(lambda n=len(opened): len(echo.peers) >= n and echo.peers[n - 1],
                                 "the echo server's connection")
            pid = proc.wait_for(lambda p=peer: holder(pids, p, echo.port), "its worker")
            by_worker.setdefault(pid, h.sock)
            if len(by_worker) == 2:
                break
        assert sorted(by_worker) == sorted(pids), by_worker
        for sock in by_worker.values():
            echo_through(sock)
        for sock in opened:
            sock.close()
        many.proc.terminate()
    finally:
        echo.close()

    client = start_trisocks_client(procs, f"ws://127.0.0.1:{port}", TOKEN)
    keep = session_worker(pids, client.proc, port)
    victim = next(p for p in pids if p != keep)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        transfer = download(pool, payload_server, client.port)
        proc.wait_for(lambda: any(rp == payload_server.port for _, rp, st in
                                  sockets_of(keep, tcp_table()) if st == ESTABLISHED),
                      "the download to begin")
        os.kill(victim, signal.SIGKILL)
        outage, made = longest_outage(port, 1.5)
        result = transfer.result(60)
    assert transfer.done()
    result.check()
    assert result.sha256 == payload_sha256(BIG, 13), "the download through the survivor broke"
    assert made >= 20, made
    assert outage <= 1.0, f"new connections failed for {outage:.2f} s"
    restarted = proc.wait_for_log(rf"worker (\d) \(pid {victim}\) was killed by SIGKILL after "
                                  r"[\d.]+ s; restarting it in 0\.1 s")
    new = int(proc.wait_for_log(rf"worker {restarted.group(1)} started \(pid (\d+)\)").group(1))
    proc.wait_for_log(rf"worker {restarted.group(1)} is ready \(pid {new}\)")
    assert new not in pids and gone(victim) and not gone(new)
    assert proc.alive() and not gone(keep)


def test_plane_sighup_db_lock_and_graceful_stop(workers, procs, payload_server, tmp_path):
    """With -k and --db (the SQLite file shared under the supervisor's lock): /healthz
    answers from both workers, SIGHUP reaches each worker's --config reload, a second
    server on the same file exits 2, and SIGTERM lets a download finish, then all exit 0."""
    db = tmp_path / "state.db"
    config = tmp_path / "trisocks.toml"
    config.write_text("[server]\nconnect_timeout = 5\n")
    proc, port, pids = workers("-k", KEY, "--db", str(db), "-t", TOKEN, "--config", str(config))
    assert_spread(proc, pids, port,
                  request=b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    config.write_text("[server]\nconnect_timeout = 6\n")
    os.kill(proc.pid, signal.SIGHUP)
    for i in (0, 1):
        proc.wait_for_log(rf"\[worker {i}\] trisocks\S*: reloaded {re.escape(str(config))}")

    for argv in ([*trisocks_cmd(), "server", "-P", "0", "--workers", "2", "-k", KEY, "--db", str(db)],
                 [*trisocks_cmd(), "server", "-P", "0", "-k", KEY, "--db", str(db)]):
        out = run(argv)
        assert out.returncode == 2, out
        assert re.search(rf"{re.escape(str(db))} is in use by another trisocks server "
                         rf"\(pid {proc.pid}\)", out.stderr), out.stderr
        assert "Traceback" not in out.stderr

    client = start_trisocks_client(procs, f"ws://127.0.0.1:{port}", TOKEN)
    serving = session_worker(pids, client.proc, port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        transfer = download(pool, payload_server, client.port)
        proc.wait_for(lambda: any(rp == payload_server.port for _, rp, st in
                                  sockets_of(serving, tcp_table()) if st == ESTABLISHED),
                      "the download to begin")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait_exit(30) == 0, proc.describe()
        assert transfer.done(), "the supervisor exited before its worker's download finished"
        result = transfer.result()
    result.check()
    assert result.sha256 == payload_sha256(BIG, 13)
    assert all(gone(pid) for pid in pids)
    log = proc.output()
    assert "SIGTERM: stopping 2 workers" in log and "stopped: every worker exited cleanly" in log
    assert len(re.findall(r"\[worker \d\] trisocks\S*: stopped: ", log)) == 2, log


def test_a_configuration_error_only_a_worker_finds_stops_everything(procs):
    proc = procs.start([*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", "0", "--workers", "2",
                        "-t", TOKEN, "--grace", "-1"], name="trisocks-supervisor",
                       env=clean_env())
    assert proc.wait_exit(30) == 2
    log = proc.output()
    assert log.count("--grace must be 0 or more seconds") == 1, log  # worker 0 only
    assert re.search(r"worker 0 \(pid \d+\) exited with status 2 before it was ready; stopping "
                     r"every worker, no restart", log), log
    assert "restarting" not in log and "[worker 1]" not in log


def test_a_taken_port_is_one_line_and_exit_2(procs):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = run([*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", str(port), "--workers", "2",
                   "-t", TOKEN])
    assert out.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port} for the server: address already in use" in out.stderr
    assert "[worker" not in out.stderr and "Traceback" not in out.stderr
