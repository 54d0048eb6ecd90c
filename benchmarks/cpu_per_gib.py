"""CPU seconds per GiB for trisocks forward and reverse mode, per process.

Throughput on a shared 2-core machine moves by 15-30% between runs; the CPU time the
tunnel's own processes spend per GiB moves much less, so data-path changes are compared
with it. Starts nginx (from benchmarks/systems.py) on a 1 GiB zero file, then for each
mode a fresh server + client (or provider) pair, and moves the file down and up with curl
REPS times, reporting medians of CPU seconds (utime+stime from /proc) and MB/s.

Modes: ``forward`` (policy off), ``policy`` (forward mode, policy on: the server runs with
the management API and a database, and the client uses the key of a user created through
the API with 100 destination rules, 1 TiB/s speed limits and a quota: see
benchmarks/policy_user.py), ``policy-nolimit`` (the same without the speed limits: the
rules and the accounting alone), ``reverse``. With ``--rounds N`` the modes take turns N times,
each round on fresh processes, so that a slow stretch of the machine falls on all modes
alike; the summary is the median over every transfer of every round, and policy is also
given as a ratio to forward (issue 11: within 5%).

    .venv/bin/python benchmarks/cpu_per_gib.py [--reps 4] [--modes forward,reverse]
    .venv/bin/python benchmarks/cpu_per_gib.py --modes forward,policy,policy-nolimit --rounds 3 --reps 2

To compare revisions: run it, `git checkout OTHER && make build`, run it again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import policy_user  # noqa: E402
from systems import NGINX_CONF  # noqa: E402

TRISOCKS = [sys.executable, "-m", "trisocks"]
TOKEN = "cpu-per-gib-token-0123"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def start_pair(mode: str, nginx_port: int,
               tmp: Path) -> tuple[list[subprocess.Popen], int, tuple[str, str]]:
    ws, socks = free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if mode in ("policy", "policy-nolimit"):
        db = tmp / f"policy-{ws}.db"
        server = subprocess.Popen(TRISOCKS + ["server", "-H", "127.0.0.1", "-P", str(ws),
                                              "-k", policy_user.API_KEY, "--db", str(db)],
                                  **quiet)
        wait_port(ws)
        try:
            policy_user.create_user(ws, policy_user.API_KEY, policy_user.USER_KEY, [nginx_port],
                                    speed=mode == "policy")
        except (OSError, RuntimeError):
            server.terminate()
            server.wait()
            raise
        other = subprocess.Popen(TRISOCKS + ["client", "-u", f"ws://127.0.0.1:{ws}", "-t",
                                             policy_user.USER_KEY, "-p", str(socks)], **quiet)
        names = ("server", "client")
    elif mode in ("forward", "plane"):
        plane = ["-k", policy_user.API_KEY, "--db", str(tmp / f"plane-{ws}.db")] \
            if mode == "plane" else []
        server = subprocess.Popen(TRISOCKS + ["server", "-H", "127.0.0.1", "-P", str(ws),
                                              "-t", TOKEN, *plane], **quiet)
        wait_port(ws)
        other = subprocess.Popen(TRISOCKS + ["client", "-u", f"ws://127.0.0.1:{ws}", "-t", TOKEN,
                                             "-p", str(socks)], **quiet)
        names = ("server", "client")
    else:
        server = subprocess.Popen(TRISOCKS + ["server", "-H", "127.0.0.1", "-P", str(ws), "-t",
                                              TOKEN, "-r", "-p", str(socks)], **quiet)
        wait_port(ws)
        other = subprocess.Popen(TRISOCKS + ["provider", "-u", f"ws://127.0.0.1:{ws}", "-t",
                                             TOKEN], **quiet)
        names = ("server", "provider")
    wait_port(socks)
    return [server, other], socks, names


def curl(direction: str, socks: int, nginx: int, payload: Path) -> float:
    base = ["curl", "-s", "-o", "/dev/null", "--socks5-hostname", f"127.0.0.1:{socks}"]
    if direction == "down":
        argv = base + ["-w", "%{speed_download}", f"http://127.0.0.1:{nginx}/1g"]
    else:
        argv = base + ["-w", "%{speed_upload}", "-T", str(payload), f"http://127.0.0.1:{nginx}/upload"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(out) / 1e6


def _median_line(label: str, runs: list[dict]) -> tuple[float, float]:
    """Print one summary line for the transfers ``runs``; return (total CPU, MB/s)."""
    names = list(runs[0]["cpu"])
    parts = "  ".join(f"{n} {statistics.median([r['cpu'][n] for r in runs]):.2f}"
                      for n in names)
    total = statistics.median([sum(r["cpu"].values()) for r in runs])
    speed = statistics.median([r["speed"] for r in runs])
    print(f"{label} {speed:6.0f} MB/s  CPU s/GiB: {parts}  total {total:.2f}  "
          f"(median of {len(runs)})", flush=True)
    return total, speed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4, help="transfers per direction, per "
                        "mode and round (default 4)")
    parser.add_argument("--modes", default="forward,reverse",
                        help="of forward, plane (-k and --db, no policy), policy, "
                        "policy-nolimit, reverse (default forward,reverse)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times the modes take turns, each on fresh processes (default 1)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("forward", "plane", "policy", "policy-nolimit", "reverse")]
    if bad or args.reps < 1 or args.rounds < 1:
        parser.error(f"unknown mode(s) {', '.join(bad)}" if bad else "--reps and --rounds >= 1")
    # (mode, direction) -> one {"speed": MB/s, "cpu": {process: seconds}} per transfer
    runs: dict[tuple[str, str], list[dict]] = {(m, d): [] for m in modes for d in ("down", "up")}
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="trisocks-cpu-") as tmp:
        root, prefix = Path(tmp) / "www", Path(tmp) / "nginx"
        root.mkdir()
        prefix.mkdir()
        payload = root / "1g"
        with open(payload, "wb") as f:
            f.truncate(1 << 30)
        nginx_port = free_port()
        user = "user root root;" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, root=root,
                                                             port=nginx_port, user=user))
        nginx = subprocess.Popen([nginx_bin, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(nginx_port)
            subprocess.run(["cat", str(payload)], stdout=subprocess.DEVNULL, check=True)
            for rnd in range(args.rounds):
                if args.rounds > 1:
                    print(f"== round {rnd + 1}/{args.rounds}", flush=True)
                for mode in modes:
                    procs, socks, names = start_pair(mode, nginx_port, Path(tmp))
                    try:
                        for direction in ("down", "up"):
                            these = []
                            for _ in range(args.reps):
                                before = [cpu_seconds(p.pid) for p in procs]
                                speed = curl(direction, socks, nginx_port, payload)
                                after = [cpu_seconds(p.pid) for p in procs]
                                these.append({"speed": speed, "cpu": {
                                    n: a - b for n, b, a in zip(names, before, after,
                                                                strict=True)}})
                            runs[(mode, direction)] += these
                            _median_line(f"{mode:14} {direction:4}", these)
                    finally:
                        for p in procs:
                            p.terminate()
                            p.wait()
        finally:
            nginx.terminate()
            nginx.wait()
    if args.rounds > 1 or "policy" in modes or "policy-nolimit" in modes:
        print(f"== summary: {args.rounds} round(s) x {args.reps} transfer(s) of 1 GiB "
              "per mode and direction", flush=True)
        totals = {key: _median_line(f"{key[0]:14} {key[1]:4}", r) for key, r in runs.items()}
        for on in ("plane", "policy", "policy-nolimit"):
            if on not in modes or "forward" not in modes:
                continue
            for d in ("down", "up"):
                (c_off, s_off), (c_on, s_on) = totals[("forward", d)], totals[(on, d)]
                print(f"{on} / forward, {d:4}: CPU s/GiB {c_on:.2f} / {c_off:.2f} = "
                      f"{c_on / c_off:.3f}x  MB/s {s_on:.0f} / {s_off:.0f} = "
                      f"{s_on / s_off:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
