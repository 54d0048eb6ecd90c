#!/usr/bin/env python3
"""The "policy on" case of the benchmark: a user with 100 destination rules, speed limits
far above the measured speed and accounting on (issue 11, item 5 "Cheap").

As a module it gives the rules (:func:`bench_rules`), the user's policy and
:func:`create_user` (``POST /api/users`` on the WebSocket port), used by systems.py and
cpu_per_gib.py. As a script it starts a server with that user, for the harness's Step:

    policy_user.py --setup-port S --api-key KEY --user-key UKEY --allow-port N [--allow-port M]
                   -- /path/to/trisocks server -H 127.0.0.1 -P WS -k KEY --db FILE

It runs the server command once with ``-P S`` (a setup instance), creates the user through
its API, stops it (the user and its policy are now in the database), and then *execs* the
server command as given, which restores the user from the database at start. So the
process the harness started, signals, waits for and reads RSS and CPU from is the server
itself, with no wrapper interpreter beside it and no helper left over; and WS accepts
only once the user exists, so the harness can wait on WS before it starts the client.
If the user cannot be created, the script exits 1 and the log says why.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

API_KEY = "trisocks-bench-api-key-0001"
USER_KEY = "bench-user-key-0001"
SPEED = 1 << 40  # 1 TiB/s up and down: far above anything loopback moves here
QUOTA = 1 << 50  # 1 PiB byte quota: the quota check runs, and never refuses

# The user's first 99 rules: what a deployment would write, none of which matches the
# bench target (127.0.0.1 on a port from 21000-32000, by IP literal). The 100th, added by
# bench_rules, allows the target, so every lookup goes through the compiled rules and
# ends on the last one. Some rules sit on loopback with other ports, so that the target's
# address interval holds port-restricted candidates that are tested too.
_FIXED = [
    # mail, SMB/NetBIOS, BitTorrent: anywhere
    "deny tcp *:25",
    "deny tcp *:465,587",
    "deny tcp *:135-139,445",
    "deny udp *:137-138",
    "deny *:6881-6889",
    # cloud metadata, link-local, multicast, unspecified
    "deny tcp 169.254.169.254:80",
    "deny link-local",
    "deny multicast",
    "deny unspecified",
    # local services on loopback (ports other than the bench target's)
    "deny tcp 127.0.0.1:22",
    "deny tcp loopback:3306,5432,6379,11211,27017",
    "deny tcp 127.0.0.0/8:9000-9100",
    "deny tcp 127.0.0.1:2375-2376",
    "deny tcp loopback:8500",
    # names
    "deny .doubleclick.net",
    "deny .googlesyndication.com",
    "deny *.ads.example.com",
    "deny tracker*.example.net",
    "deny .internal",
    "deny .local",
    "deny metadata.google.internal",
    "allow tcp .example.org:80,443",
    "allow tcp *.cdn.example.com:443",
    "deny tcp .example.net:8000-8999",
    # documentation and benchmarking ranges
    "deny 192.0.2.0/24",
    "deny 198.51.100.0/24",
    "deny 203.0.113.0/24",
    "deny 198.18.0.0-198.19.255.255",
    "deny [2001:db8::/32]:25",
    "allow tcp [2001:db8:1::/48]:443",
    # private networks: a few services open, the rest closed
    "allow tcp 10.1.0.0/16:80,443",
    "allow udp 10.1.0.53:53",
    "deny udp *:53",
    "deny 10.0.0.0/8",
    "allow tcp 172.16.5.0/24:8080",
    "deny 172.16.0.0/12",
    "allow tcp 192.168.1.10-192.168.1.20:443",
    "deny 192.168.0.0/16",
    "deny 100.64.0.0/10",
    "deny fc00::/7",
]
# Public networks: blocks, per-port blocks and allowed /24s, spread over many /8s.
_OCTETS = [23, 31, 37, 45, 52, 64, 77, 81, 91, 104, 151, 176, 185, 193, 212, 217]


def _generated(count: int) -> list[str]:
    rules = []
    for i in range(count):
        a, b = _OCTETS[i % len(_OCTETS)], (i * 37 + 11) % 256
        kind = i % 4
        if kind == 0:
            rules.append(f"deny {a}.{b}.0.0/16")
        elif kind == 1:
            rules.append(f"deny tcp {a}.{b}.0.0/16:{(22, 23, 3389, 5900)[(i // 4) % 4]}")
        elif kind == 2:
            rules.append(f"allow tcp {a}.{b}.{i}.0/24:80,443")
        else:
            rules.append(f"deny {a}.{b}.{i}.10-{a}.{b}.{i}.200")
    return rules


def bench_rules(allow_ports: list[int], total: int = 100) -> list[str]:
    """``total`` rules, the last one allowing 127.0.0.1 on ``allow_ports`` (tcp)."""
    ports = ",".join(str(p) for p in sorted(set(allow_ports)))
    head = _FIXED + _generated(total - 1 - len(_FIXED))
    return head + [f"allow tcp 127.0.0.1:{ports}"]


def bench_policy(allow_ports: list[int], speed: bool = True) -> dict:
    """The user's policy; ``speed=False`` leaves the speed limits out (to tell their cost
    from that of the rules and the accounting)."""
    policy: dict = {"rules": bench_rules(allow_ports)}
    if speed:
        policy.update(speed_up=SPEED, speed_down=SPEED)
    return policy


def create_user(ws_port: int, api_key: str, user_key: str, allow_ports: list[int],
                timeout: float = 10.0, speed: bool = True) -> dict:
    """``POST /api/users`` on the server's WebSocket port; the created user (JSON)."""
    body = json.dumps({"key": user_key, "name": "bench", "limit_bytes": QUOTA,
                       "policy": bench_policy(allow_ports, speed)}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{ws_port}/api/users", data=body,
                                 method="POST", headers={"X-API-Key": api_key,
                                                         "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.status != 201:
                raise RuntimeError(f"POST /api/users: HTTP {resp.status}")
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST /api/users: HTTP {exc.code}: "
                           f"{exc.read()[:500].decode(errors='replace')}") from None


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM (the server saves its counters), then SIGKILL if it takes too long."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def setup(server: list[str], args: argparse.Namespace) -> None:
    """Run ``server`` on the setup port, create the user through its API, stop it."""
    argv = list(server)
    argv[argv.index("-P") + 1] = str(args.setup_port)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + args.timeout
        while not _port_open(args.setup_port):
            if proc.poll() is not None:
                raise RuntimeError(f"the setup server exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the setup server's port {args.setup_port} never accepted")
            time.sleep(0.02)
        user = create_user(args.setup_port, args.api_key, args.user_key, args.allow_port)
    finally:
        code = _stop(proc)
    rules = user.get("policy", {}).get("rules", [])
    print(f"policy_user: user {user.get('name')!r} created with {len(rules)} rules, speed "
          f"{SPEED} B/s up and down, quota {QUOTA} bytes; setup server exited ({code})",
          flush=True)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="policy_user.py")
    p.add_argument("--setup-port", type=int, required=True)
    p.add_argument("--api-key", default=API_KEY)
    p.add_argument("--user-key", default=USER_KEY)
    p.add_argument("--allow-port", type=int, action="append", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv[:cut])
    server = argv[cut + 1:]
    if "-P" not in server[:-1]:
        p.error("the server command after -- must give its port with -P")
    try:
        setup(server, args)
    except (OSError, RuntimeError) as exc:
        print(f"policy_user: cannot set up the bench user: {exc}", file=sys.stderr, flush=True)
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(server[0], server)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
