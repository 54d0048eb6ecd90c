"""CPU seconds per GiB for trisocks forward and reverse mode, per process.

Throughput on a shared 2-core machine moves by 15-30% between runs; the CPU time the
tunnel's own processes spend per GiB moves much less, so data-path changes are compared
with it. Starts nginx (from benchmarks/systems.py) on a 1 GiB zero file, then for each
mode a fresh server + client (or provider) pair, and moves the file down and up with curl
REPS times, reporting medians of CPU seconds (utime+stime from /proc) and MB/s.

    .venv/bin/python benchmarks/cpu_per_gib.py [--reps 4] [--modes forward,reverse]

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


def start_pair(mode: str) -> tuple[list[subprocess.Popen], int, tuple[str, str]]:
    ws, socks = free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if mode == "forward":
        server = subprocess.Popen(TRISOCKS + ["server", "-H", "127.0.0.1", "-P", str(ws),
                                              "-t", TOKEN], **quiet)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--modes", default="forward,reverse")
    args = parser.parse_args()
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
            for mode in args.modes.split(","):
                procs, socks, names = start_pair(mode)
                try:
                    for direction in ("down", "up"):
                        cpu = {name: [] for name in names}
                        speed = []
                        for _ in range(args.reps):
                            before = [cpu_seconds(p.pid) for p in procs]
                            speed.append(curl(direction, socks, nginx_port, payload))
                            after = [cpu_seconds(p.pid) for p in procs]
                            for name, b, a in zip(names, before, after, strict=False):
                                cpu[name].append(a - b)
                        parts = "  ".join(f"{n} {statistics.median(v):.2f}" for n, v in cpu.items())
                        total = statistics.median([sum(x) for x in zip(*cpu.values(), strict=False)])
                        print(f"{mode:8} {direction:4} {statistics.median(speed):6.0f} MB/s  "
                              f"CPU s/GiB: {parts}  total {total:.2f}", flush=True)
                finally:
                    for p in procs:
                        p.terminate()
                        p.wait()
        finally:
            nginx.terminate()
            nginx.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
