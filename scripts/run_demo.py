"""`make run`: a working tunnel on this machine, and what to paste next.

Starts `trisocks server` on 127.0.0.1:8765 with the management API on, and
`trisocks client` with SOCKS5 on 127.0.0.1:9870, as two processes, with their
state and logs under .run/: the token (.run/token), the API key (.run/api-key,
generated once and printed that time), and the database of users, tokens and
counters (.run/trisocks.db). A restart reuses all three. Ctrl-C stops both. The
dashboard is on the server's port, /ui/ (log in with the API key).

It also serves a small page on 127.0.0.1 (the WebSocket port + 1) to fetch through the
tunnel: the server refuses to connect a tunnel user to its own ports (docs/security.md),
so its front page is not the thing to try.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from trisocks.tunnel.tokens import generate

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
        print(f"--- last lines of {log} ---", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
    stop_all()
    sys.exit(1)


PROCS: list[subprocess.Popen] = []


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - the child process writes to it until it exits
    # Same process group: Ctrl-C in the terminal reaches the server and client too.
    proc = subprocess.Popen(TRISOCKS + args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    PROCS.append(proc)
    return proc


def stop_all() -> None:
    for proc in PROCS:
        if proc.poll() is None:
            # SIGTERM: the server saves its counters and stops (SIGINT may be ignored when
            # make run itself was started in the background)
            proc.send_signal(signal.SIGTERM)
    for proc in PROCS:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def shown(path: Path) -> str:
    """``path`` as the user pastes it from the project directory."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def secret_file(path: Path, nbytes: int) -> tuple[str, bool]:
    """The secret kept in ``path`` (made and saved 0600 the first time); True when new."""
    if path.exists():
        return path.read_text().strip(), False
    value = generate(nbytes)  # never a leading '-': the token is pasted after -t
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


DEMO_PAGE = b"Hello from the trisocks demo page: this came through the tunnel.\n"


class _DemoPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(DEMO_PAGE)))
        self.end_headers()
        self.wfile.write(DEMO_PAGE)

    def log_message(self, *args) -> None:
        pass


def serve_demo_page(port: int) -> None:
    page = http.server.ThreadingHTTPServer(("127.0.0.1", port), _DemoPage)
    threading.Thread(target=page.serve_forever, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws-port", type=int, default=8765)
    parser.add_argument("--socks-port", type=int, default=9870)
    parser.add_argument("--state", type=Path, default=STATE, help="where state and logs go (.run)")
    args = parser.parse_args()
    state = args.state

    state.mkdir(parents=True, exist_ok=True)
    token, _ = secret_file(state / "token", 16)
    api_key, new_key = secret_file(state / "api-key", 24)

    page_port = args.ws_port + 1
    for what, port in (("server", args.ws_port), ("SOCKS5", args.socks_port),
                       ("demo page", page_port)):
        if not port_free("127.0.0.1", port):
            fail(f"port {port} for the {what} is in use (another `make run`?). Stop it, or pass "
                 f"ARGS='--ws-port N --socks-port M'.")

    server_log, client_log = state / "server.log", state / "client.log"
    token_file, key_file = state / "token", state / "api-key"
    # The token and the API key go by file, never on a command line: every local user can
    # read those (ps). Users (API-made keys) reach only the public internet by default
    # (docs/policy.md); the demo page is opened to them explicitly
    server = start(["server", "-H", "127.0.0.1", "-P", str(args.ws_port), "--token-file",
                    str(token_file), "--db", str(state / "trisocks.db"),
                    "--allow", f"127.0.0.1:{page_port}"],
                   server_log, env={"TRISOCKS_API_KEY_FILE": str(key_file)})
    wait_port(args.ws_port, server, server_log)
    url = f"ws://127.0.0.1:{args.ws_port}"
    client = start(["client", "-u", url, "--token-file", str(token_file), "-s", "127.0.0.1",
                    "-p", str(args.socks_port)], client_log)
    wait_port(args.socks_port, client, client_log)
    serve_demo_page(page_port)

    socks = f"127.0.0.1:{args.socks_port}"
    api = f"http://127.0.0.1:{args.ws_port}"
    key_line = (f"  API key  {api_key}   (new: shown this once, kept in .run/api-key)"
                if new_key else "  API key  kept in .run/api-key")
    print(f"""
trisocks is running: a server and a client, both on this machine.

  server   {url}/socket          log: .run/server.log
  client   SOCKS5 on {socks}      log: .run/client.log
  token    {token}         (kept in .run/token)
{key_line}
  database .run/trisocks.db (users, tokens and traffic counters)
  dashboard {api}/ui/   (a browser on this machine; log in with the API key)

Paste these in another terminal (from this directory):

  # through the tunnel to a page this demo serves on 127.0.0.1:{page_port}
  curl --socks5-hostname {socks} http://127.0.0.1:{page_port}/

  # any site, if this machine has Internet access
  curl --socks5-hostname {socks} https://example.com/

  # a second client with its own SOCKS5 port (the token by file: not visible in ps)
  .venv/bin/trisocks client -u {url} --token-file {shown(token_file)} -p {args.socks_port + 1}

  # the management API (docs/api.md): status, then a user with a 1 GiB traffic limit
  curl -H "X-API-Key: $(cat .run/api-key)" {api}/api/status
  curl -H "X-API-Key: $(cat .run/api-key)" -X POST \\
       -d '{{"name": "alice", "limit_bytes": 1073741824}}' {api}/api/users

  # then a client with alice's key (the "key" in the answer above); users reach the
  # public internet and, by this demo's --allow, its page, not the rest of this machine
  # (docs/policy.md)
  .venv/bin/trisocks client --subscribe {api}/api/subscribe/ALICES_KEY -p {args.socks_port + 2}

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
