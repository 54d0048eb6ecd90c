"""`make run`: a working tunnel on this machine, and what to paste next.

Starts `trisocks server` on 127.0.0.1:8765 and `trisocks client` with SOCKS5 on
127.0.0.1:9870, as two processes, with their state and logs under .run/. The
token is kept in .run/token so that a restart reuses it. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".run"
TRISOCKS = [sys.executable, "-m", "trisocks"]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"{proc.args[3]} exited with status {proc.returncode}", log)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    fail(f"nothing listens on port {port} after {timeout:.0f} s", log)


def fail(message: str, log: Path | None = None) -> None:
    print(f"\nmake run: {message}", file=sys.stderr)
    if log is not None and log.exists():
        print(f"--- last lines of {log.relative_to(ROOT)} ---", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
    stop_all()
    sys.exit(1)


PROCS: list[subprocess.Popen] = []


def start(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    # Same process group: Ctrl-C in the terminal reaches the server and client too.
    proc = subprocess.Popen(TRISOCKS + args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    PROCS.append(proc)
    return proc


def stop_all() -> None:
    for proc in PROCS:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in PROCS:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws-port", type=int, default=8765)
    parser.add_argument("--socks-port", type=int, default=9870)
    args = parser.parse_args()

    STATE.mkdir(exist_ok=True)
    token_file = STATE / "token"
    if token_file.exists():
        token = token_file.read_text().strip()
    else:
        token = secrets.token_urlsafe(16)
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)

    for what, port in (("server", args.ws_port), ("SOCKS5", args.socks_port)):
        if not port_free("127.0.0.1", port):
            fail(f"port {port} for the {what} is in use (another `make run`?). Stop it, or pass "
                 f"ARGS='--ws-port N --socks-port M'.")

    server_log, client_log = STATE / "server.log", STATE / "client.log"
    server = start(["server", "-H", "127.0.0.1", "-P", str(args.ws_port), "-t", token], server_log)
    wait_port(args.ws_port, server, server_log)
    url = f"ws://127.0.0.1:{args.ws_port}"
    client = start(["client", "-u", url, "-t", token, "-s", "127.0.0.1", "-p", str(args.socks_port)],
                   client_log)
    wait_port(args.socks_port, client, client_log)

    socks = f"127.0.0.1:{args.socks_port}"
    print(f"""
trisocks is running: a server and a client, both on this machine.

  server   {url}/socket          log: .run/server.log
  client   SOCKS5 on {socks}      log: .run/client.log
  token    {token}         (kept in .run/token)

Paste these in another terminal:

  # through the tunnel to the server's own front page
  curl --socks5-hostname {socks} http://127.0.0.1:{args.ws_port}/

  # any site, if this machine has Internet access
  curl --socks5-hostname {socks} https://example.com/

  # a second client with its own SOCKS5 port
  .venv/bin/trisocks client -u {url} -t {token} -p {args.socks_port + 1}

Press Ctrl-C to stop.
""", flush=True)

    try:
        while True:
            for proc, log in ((server, server_log), (client, client_log)):
                if proc.poll() is not None:
                    fail(f"{proc.args[3]} stopped unexpectedly (status {proc.returncode})", log)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        stop_all()


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    main()
