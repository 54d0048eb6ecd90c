#!/usr/bin/env python3
"""Stands in for the ``pywssocks`` command in pywssocks' own tests/test_cli.py.

``CONFORMANCE_SERVER`` and ``CONFORMANCE_CLIENT`` (``pywssocks`` or ``trisocks``) say who plays
each role. For pywssocks the real command runs unchanged (exec). For trisocks the flags are
mapped and trisocks runs as a child whose log lines are passed through untouched; where the
tests wait for a pywssocks wording, one line with that wording is added right after the
trisocks line that reports the same event, and never otherwise:

    trisocks logs                                        added line says
    server  "listening on H:P (" (port accepts)          "started on: ws://H:P"
    server  "... gone: REASON" (a peer left)             "connection closed (REASON)"
    client  "SOCKS5 proxy listening on" / "... ready on" "Authentication successful"
    client  "provider ready on" (after auth)             "Authentication successful"
    client  "recv Connect(protocol=1" (a provider is     "Attempting TCP connection"
            asked to dial; needs -dd, mapped from -d)

SIGTERM and SIGINT are passed on to trisocks, and the shim exits with its status.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

EVENTS = {
    "server": [
        (re.compile(r"trisocks \S+ listening on (\S+):(\d+) \("),
         lambda m: f"WebSocket server started on: ws://{m[1]}:{m[2]}"),
        (re.compile(r" gone: (.*)$"), lambda m: f"connection closed ({m[1]})"),
    ],
    "client": [
        (re.compile(r"SOCKS5 proxy (listening|ready) on |provider ready on "),
         lambda m: "Authentication successful (the role is ready)"),
        (re.compile(r"recv Connect\(protocol=1\b"), lambda m: "Attempting TCP connection"),
    ],
}


def server_argv(args: list[str]) -> list[str]:
    p = argparse.ArgumentParser(prog="pywssocks server", add_help=False)
    p.add_argument("-H", "--ws-host", default="0.0.0.0")
    p.add_argument("-P", "--ws-port", default="8765")
    p.add_argument("-t", "--token")
    p.add_argument("-r", "--reverse", action="store_true")
    p.add_argument("-h", "--socks-host", default="127.0.0.1")
    p.add_argument("-p", "--socks-port", default="1080")
    p.add_argument("-n", "--socks-username")
    p.add_argument("-w", "--socks-password")
    p.add_argument("-i", "--socks-nowait", action="store_true")
    p.add_argument("-c", "--connector-token")
    p.add_argument("-a", "--connector-autonomy", action="store_true")
    p.add_argument("-d", "--debug", action="store_true")
    a = p.parse_args(args)
    out = ["server", "-H", a.ws_host, "-P", a.ws_port, "-s", a.socks_host, "-p", a.socks_port]
    out += ["-t", a.token] if a.token else []
    out += ["-r"] if a.reverse else []
    out += ["-n", a.socks_username, "-w", a.socks_password] if a.socks_username else []
    out += ["-i"] if a.socks_nowait else []
    out += ["-c", a.connector_token] if a.connector_token else []
    out += ["-a"] if a.connector_autonomy else []
    return out + (["-d"] if a.debug else [])


def client_argv(args: list[str]) -> list[str]:
    p = argparse.ArgumentParser(prog="pywssocks client", add_help=False)
    p.add_argument("-t", "--token", required=True)
    p.add_argument("-u", "--url", default="ws://localhost:8765")
    p.add_argument("-r", "--reverse", action="store_true")
    p.add_argument("-h", "--socks-host", default="127.0.0.1")
    p.add_argument("-p", "--socks-port", default="1080")
    p.add_argument("-n", "--socks-username")
    p.add_argument("-w", "--socks-password")
    p.add_argument("-i", "--socks-no-wait", action="store_true")
    p.add_argument("-R", "--no-reconnect", action="store_true")
    p.add_argument("-c", "--connector-token")
    p.add_argument("-d", "--debug", action="store_true")
    a = p.parse_args(args)
    if a.reverse:
        out = ["provider", "-t", a.token, "-u", a.url]
        out += ["-c", a.connector_token] if a.connector_token else []
        # pywssocks logs each dial at debug; trisocks logs the Connect it gets at -dd
        return out + (["-dd"] if a.debug else [])
    out = ["client", "-t", a.token, "-u", a.url, "-s", a.socks_host, "-p", a.socks_port]
    out += ["-n", a.socks_username, "-w", a.socks_password] if a.socks_username else []
    out += ["-i"] if a.socks_no_wait else []
    out += ["-R"] if a.no_reconnect else []
    return out + (["-d"] if a.debug else [])


def run_trisocks(role: str, argv: list[str]) -> int:
    child = subprocess.Popen([sys.executable, "-m", "trisocks", *argv], stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=os.environ)

    def forward(signum, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    err = sys.stderr.buffer
    for raw in child.stderr:
        err.write(raw)
        line = raw.decode(errors="replace").rstrip("\n")
        for pattern, wording in EVENTS[role]:
            match = pattern.search(line)
            if match:
                err.write(f"[conformance shim] {wording(match)}\n".encode())
        err.flush()
    return child.wait()


def main() -> int:
    args = sys.argv[1:]
    role = args[0] if args else ""
    if role not in ("server", "client"):
        print(f"conformance shim: unsupported pywssocks command {role!r}", file=sys.stderr)
        return 2
    who = os.environ.get(f"CONFORMANCE_{role.upper()}", "pywssocks")
    if os.environ.get("CONFORMANCE_TRACE"):  # the runner counts who really played each role
        with open(os.environ["CONFORMANCE_TRACE"], "a") as trace:
            trace.write(f"{role} {who}\n")
    if who == "pywssocks":
        os.execv(sys.executable, [sys.executable, "-m", "pywssocks", *args])
    mapped = server_argv(args[1:]) if role == "server" else client_argv(args[1:])
    return run_trisocks(role, mapped)


if __name__ == "__main__":
    sys.exit(main())
