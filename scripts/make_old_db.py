"""Make tests/data/trisocks-0.1.0.db with the code of trisocks 0.1.0 itself (schema 1).

    .venv/bin/python scripts/make_old_db.py [--commit 6bfe335] [--out tests/data/trisocks-0.1.0.db]

tests/test_backup.py starts today's server on a copy of this file and checks that nothing
was lost on the way to the current schema. So that the file is what an operator upgrading
from 0.1.0 really has, it is written by the 0.1.0 code and nothing else:

1. ``git archive COMMIT src`` unpacks that commit's package into a temporary directory;
2. its ``trisocks server`` runs from there (``PYTHONPATH=<dir>/src``, this virtualenv's Python
   for the dependencies, ``TRISOCKS_PURE=1``: the old tree has no compiled extension) with
   ``-k`` and ``--db``;
3. through its API: two tokens given on the command line are joined by a forward, a reverse and
   a connector token, and three users (one with a limit and an expiry, one disabled, one
   plain);
4. traffic with exact byte counts goes through an old ``trisocks client`` with alice's key and
   with the forward token: a SOCKS5 CONNECT to a local TCP server that reads what it is sent
   and answers with a known number of bytes;
5. SIGTERM; the old server saves its counters and closes the database (no -wal is left).

Next to the database, ``OUT`` with ``.json`` holds what the file contains, read from it after
the old server stopped: the schema, every user's and token's row, the events' types. The test
compares today's API answers with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "old-api-key-0123456789abcdef"
# (what the client sends, what the target answers) for each credential
TRAFFIC = {"alice-key-0001": (123_457, 654_321), "old-forward-api-0001": (20_011, 300_007)}
USERS = [
    {"key": "alice-key-0001", "name": "alice", "limit_bytes": 10 << 30,
     "expires_at": "2099-01-01T00:00:00Z"},
    {"key": "bob-key-0001", "name": "bob", "status": "disabled"},
    {"key": "carol-key-0001", "name": "carol"},
]
TOKENS = [
    {"type": "forward", "token": "old-forward-api-0001"},
    {"type": "reverse", "token": "old-reverse-api-0001", "username": "su", "password": "sp"},
    {"type": "connector", "token": "old-connector-api-0001", "reverse_token": "old-reverse-api-0001"},
]
CLI_TOKENS = ["old-cli-token-0001", "old-cli-token-0002"]


def unpack(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


class Proc:
    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          cwd=cwd, start_new_session=True)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text(errors="replace"))
            if match:
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise SystemExit(f"no {pattern!r} in {self.log}:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(30)


def api(port: int, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as reply:
        return json.loads(reply.read())


def target_server() -> tuple[socket.socket, dict]:
    """A TCP server: reads the byte count the first 8 bytes announce, answers with as many
    bytes as the next 8 ask for."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                head = recv_exact(conn, 16)
                up, down = int.from_bytes(head[:8], "big"), int.from_bytes(head[8:], "big")
                recv_exact(conn, up - 16)
                conn.sendall(b"d" * down)
                seen[up] = down

    threading.Thread(target=serve, daemon=True).start()
    return listener, seen


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 16))
        if not chunk:
            raise SystemExit(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def through_socks(socks_port: int, target_port: int, up: int, down: int) -> None:
    with socket.create_connection(("127.0.0.1", socks_port), timeout=30) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target_port.to_bytes(2, "big"))
        reply = recv_exact(s, 10)
        assert reply[1] == 0, f"SOCKS5 CONNECT refused: {reply!r}"
        s.sendall(up.to_bytes(8, "big") + down.to_bytes(8, "big") + b"u" * (up - 16))
        assert len(recv_exact(s, down)) == down
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def rows(conn: sqlite3.Connection, sql: str) -> list[dict]:
    cursor = conn.execute(sql)
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def make(commit: str, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trisocks-old-db-") as tmp:
        tmp = Path(tmp)
        src = unpack(commit, tmp)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TRISOCKS_") and k.lower() not in ("http_proxy", "https_proxy",
                                                                       "all_proxy", "no_proxy")}
        env.update(PYTHONPATH=str(src), TRISOCKS_PURE="1", PYTHONUNBUFFERED="1")
        old = [sys.executable, "-m", "trisocks"]
        db = tmp / "state" / "trisocks.db"
        argv = [*old, "server", "-H", "127.0.0.1", "-P", "0", "-k", KEY, "--db", str(db)]
        for token in CLI_TOKENS:
            argv += ["-t", token]
        server = Proc(argv, env, tmp / "server.log", tmp)
        clients: list[Proc] = []
        listener, seen = target_server()
        try:
            port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
            server.wait_for("management plane on")
            version = subprocess.run([*old, "version"], env=env, cwd=tmp, capture_output=True,
                                     text=True, check=True).stdout.strip()
            for body in TOKENS:
                assert api(port, "POST", "/api/token", body)["success"], body
            for body in USERS:
                api(port, "POST", "/api/users", body)
            target_port = listener.getsockname()[1]
            for i, (token, (up, down)) in enumerate(TRAFFIC.items()):
                client = Proc([*old, "client", "-u", f"ws://127.0.0.1:{port}", "-t", token,
                               "-s", "127.0.0.1", "-p", "0"], env, tmp / f"client-{i}.log", tmp)
                clients.append(client)
                socks = int(client.wait_for(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)").group(1))
                through_socks(socks, target_port, up, down)
                assert client.stop() == 0, client.log.read_text()
            alice = api(port, "GET", "/api/users/alice-key-0001")
            assert (alice["bytes_up"], alice["bytes_down"]) == TRAFFIC["alice-key-0001"], alice
            status = server.stop()
            assert status == 0, f"old server exited {status}:\n{server.log.read_text()}"
        finally:
            for proc in (*clients, server):
                if proc.popen.poll() is None:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
            listener.close()
        leftovers = sorted(p.name for p in db.parent.iterdir() if p.name != db.name)
        assert leftovers == [db.name + ".lock"], leftovers  # no -wal/-shm: a clean close
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            manifest = {
                "made_by": f"{version}, commit {commit} ({resolve(commit)}), scripts/make_old_db.py",
                "schema": conn.execute("PRAGMA user_version").fetchone()[0],
                "traffic": {k: list(v) for k, v in TRAFFIC.items()},
                "users": rows(conn, "SELECT * FROM users ORDER BY rowid"),
                "tokens": rows(conn, "SELECT * FROM tokens ORDER BY rowid"),
                "events": [e["type"] for e in rows(conn, "SELECT type FROM events ORDER BY id")],
            }
        finally:
            conn.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(db.read_bytes())
        out.chmod(0o600)
        out.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def resolve(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="6bfe335", help="the 0.1.0 code (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "trisocks-0.1.0.db")
    args = parser.parse_args()
    manifest = make(args.commit, args.out)
    print(f"{args.out}: schema {manifest['schema']}, {len(manifest['users'])} users, "
          f"{len(manifest['tokens'])} tokens, {len(manifest['events'])} events "
          f"({args.out.stat().st_size} bytes); {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
