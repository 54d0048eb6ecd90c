"""Soak run: mixed load against real trisocks processes, RSS and fds sampled, a report written.

    .venv/bin/python scripts/soak.py --seconds 600            (make soak; SOAK_SECONDS=...)
    .venv/bin/python scripts/soak.py --seconds 60 --interval 5  (the short form in make test)

Processes (as in tests/support/attack.py): a forward server with the management API (-k, --db),
a forward client with SOCKS5 username/password, a reverse server and its provider (all sampled),
and a second forward client that is SIGKILLed and started again every ``--restart-every``
seconds (its reconnects load the server; not sampled, a new process each time).

Load, in threads, until the end: bulk downloads and uploads with curl through the client and
the reverse port (sha256 checked), request churn (many short SOCKS5 connections, each one
HTTP request, body checked), bad input (the attack strategies against every listener), API
writes (users created, limited, disabled, reset, deleted; tokens created and deleted) and the
client restarts.

Every ``--interval`` seconds: RSS (/proc/PID/status VmRSS) and open fds (/proc/PID/fd) of every
sampled process. Verdict: zero exits, no traceback in a log, no failed bulk transfer, and after
the warm-up (the first quarter, at least 2 samples) growth <= 5 % in RSS and in fds, comparing the
median of the last third of the samples with the median of the first third (fds: at least 3
of slack, for connections in flight; RSS: at least 4 MiB, for what is bounded but still filling
in a short run: the server's 10,000 events in memory (the API writes make some 100 a second)
and the allocator's granularity with 1 MiB reads in flight; a leak still passes it in the
10-minute run). Report: JSON, Markdown and an SVG plot in --out (default
.soak/<time>/, and .soak/latest.*). Exit status 0 when the verdict passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import attack, peers  # noqa: E402
from tests.support.curl import curl  # noqa: E402
from tests.support.payload import INDEX_BODY, PayloadServer, payload_sha256, write_payload_file  # noqa: E402
from tests.support.procs import ProcessFactory, kill_all_live  # noqa: E402

MiB = 1 << 20
GROWTH = 0.05
FD_SLACK = 3
RSS_SLACK_KIB = 4096


class Load:
    """Counters shared by the load threads, and the stop signal."""

    def __init__(self, seconds: float) -> None:
        self.stop = threading.Event()
        self.end = time.monotonic() + seconds
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.end

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def fail(self, what: str) -> None:
        with self.lock:
            self.counts["failures"] += 1
            if len(self.failures) < 50:
                self.failures.append(what)


def guarded(load: Load, name: str, body) -> threading.Thread:
    def run() -> None:
        try:
            body()
        except Exception:
            load.fail(f"{name} crashed:\n{traceback.format_exc()}")
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


# -- the load ----------------------------------------------------------------------------------


def bulk(load: Load, stack: attack.Stack, upload_file: Path, upload_sha: str, size: int) -> None:
    """Downloads and uploads of ``size`` bytes, forward and reverse in turn, every byte checked."""
    auth = f"{attack.SOCKS_USER}:{attack.SOCKS_PASS}"
    routes = [(stack.client.socks, auth, "forward"), (f"{attack.HOST}:{stack.reverse_socks}", None,
                                                       "reverse")]
    expected = payload_sha256(size, 3)
    i = 0
    while load.running():
        socks, user, route = routes[i % 2]
        if (i // 2) % 2 == 0:
            r = curl(stack.payload.bytes_url(size, 3), socks=socks, proxy_user=user, timeout=120,
                     extra=["--limit-rate", "40M"])
            ok = r.returncode == 0 and r.size == size and r.sha256 == expected
            what = f"bulk download {route}"
        else:
            r = curl(stack.payload.url("/upload"), socks=socks, proxy_user=user, upload=str(upload_file),
                     timeout=120, extra=["--limit-rate", "40M"])
            ok = r.returncode == 0 and r.http_code == 200 and r.body is not None and \
                json.loads(r.body).get("sha256") == upload_sha
            what = f"bulk upload {route}"
        if ok:
            load.count("bulk_transfers")
            load.count("bulk_bytes", size)
        else:
            load.fail(f"{what}: curl exit {r.returncode}, HTTP {r.http_code}, {r.size} bytes: "
                      f"{r.stderr[:300]}")
        i += 1


def churn_one(port: int, auth: tuple[str, str] | None, target_port: int) -> bool:
    s = attack.connect(port, attack.HOST, timeout=10)
    try:
        code, _ = attack.socks_handshake(s, auth, 1, b"\x01" + socket.inet_aton(attack.HOST)
                                         + target_port.to_bytes(2, "big"))
        if code != 0:
            return False
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body, _ = attack.read_until(s, lambda b: None, budget=10, limit=4096)
        return body.endswith(INDEX_BODY)
    finally:
        s.close()


def churn(load: Load, stack: attack.Stack, seed: int) -> None:
    """Short connections, one request each, as fast as they go: forward and reverse."""
    rng = random.Random(seed)
    while load.running():
        if rng.random() < 0.5:
            port, auth = stack.client.port, attack.AUTH
        else:
            port, auth = stack.reverse_socks, None
        try:
            ok = churn_one(port, auth, stack.payload.port)
        except (OSError, ValueError) as exc:
            ok = False
            err = repr(exc)
        else:
            err = "wrong answer"
        if ok:
            load.count("short_requests")
        else:
            load.count("short_request_failures")
            if load.counts["short_request_failures"] <= 5:
                load.fail(f"short request via port {port}: {err}")


def bad_input(load: Load, stack: attack.Stack, tally: attack.Tally) -> None:
    """The attack strategies, a small random batch per listener in turn."""
    i = 0
    while load.running():
        listener = attack.LISTENERS[i % len(attack.LISTENERS)]
        try:
            attack.run_campaign(stack, tally, listener, known=True, max_examples=10,
                                derandomize=False, deadline=load.end)
        except (attack.ProcessDied, attack.ServerError) as exc:
            load.fail(str(exc)[:3000])
            return
        i += 1
    load.count("bad_inputs", sum(tally.tried.values()))


def api_writes(load: Load, stack: attack.Stack) -> None:
    """Users and tokens created, changed and deleted through the API with the right key."""
    import httpx

    transport = httpx.HTTPTransport(local_address=attack.SRC["api"])
    base = stack.server.http_url
    headers = {"X-API-Key": attack.KEY}
    n = 0
    with httpx.Client(base_url=base, headers=headers, transport=transport, timeout=10) as http:
        while load.running():
            n += 1
            key, tok = f"soak-user-{n:06d}", f"soak-token-{n:06d}"
            steps = [
                ("POST", "/api/users", {"key": key, "name": f"soak{n}", "limit_bytes": 1 << 30}, 201),
                ("PUT", f"/api/users/{key}/limit", {"limit_bytes": 2 << 30}, 200),
                ("PUT", f"/api/users/{key}/expiry", {"expires_at": "2031-06-30T23:59:59+02:00"}, 200),
                ("PATCH", f"/api/users/{key}", {"status": "disabled"}, 200),
                ("PATCH", f"/api/users/{key}", {"status": "active"}, 200),
                ("POST", f"/api/users/{key}/reset", None, 200),
                ("GET", "/api/users", None, 200),
                ("POST", "/api/token", {"type": "forward", "token": tok}, 200),
                ("GET", "/api/status", None, 200),
                ("DELETE", f"/api/token/{tok}", None, 200),
                ("DELETE", f"/api/users/{key}", None, 200),
                ("GET", "/api/stats", None, 200),
            ]
            for method, path, body, want in steps:
                try:
                    r = http.request(method, path, json=body)
                except httpx.HTTPError as exc:
                    load.fail(f"API {method} {path}: {exc!r}")
                    continue
                if r.status_code != want and not (want == 201 and r.status_code == 200):
                    load.fail(f"API {method} {path}: {r.status_code} {r.text[:200]}")
                else:
                    load.count("api_writes" if method != "GET" else "api_reads")


def restarts(load: Load, factory: ProcessFactory, stack: attack.Stack, every: float,
             holder: dict) -> None:
    """SIGKILL the second client and start it again; one request through each new one."""
    next_at = time.monotonic() + every
    while load.running():
        if load.stop.wait(max(0.0, min(next_at, load.end) - time.monotonic())) or not load.running():
            return
        next_at += every
        old = holder.get("peer")
        if old is not None:
            try:
                old.proc.popen.send_signal(signal.SIGKILL)
                old.proc.popen.wait(10)
            except (OSError, ValueError):
                pass
        try:
            peer = peers.start_trisocks_client(factory, stack.server.url, attack.VICTIM_TOKEN,
                                               name="trisocks-restarted-client")
        except AssertionError as exc:
            load.fail(f"restarted client did not come up: {str(exc)[:2000]}")
            continue
        holder["peer"] = peer
        load.count("client_restarts")
        try:
            if churn_one(peer.port, None, stack.payload.port):
                load.count("short_requests")
            else:
                load.fail("first request through a restarted client failed")
        except (OSError, ValueError) as exc:
            load.fail(f"first request through a restarted client: {exc!r}")


# -- sampling and verdict ----------------------------------------------------------------------


def sampler(load: Load, stack: attack.Stack, interval: float, t0: float, samples: list) -> None:
    while True:
        at = time.monotonic() - t0
        procs = {}
        for name, (rss, fds) in stack.sample().items():
            procs[name] = {"rss_kib": rss, "fds": fds}
        samples.append({"t": round(at, 2), "procs": procs, "counts": dict(load.counts)})
        if not load.running() or load.stop.wait(interval):
            return


def judge(samples: list[dict], names: list[str], warmup: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup]
    result: dict = {"warmup_s": warmup, "samples_after_warmup": len(after), "procs": {}, "ok": True,
                    "why": []}
    if len(after) < 3:
        result["ok"] = False
        result["why"].append(f"only {len(after)} samples after the warm-up: run longer")
        return result
    third = max(1, len(after) // 3)
    for name in names:
        row = {}
        for metric in ("rss_kib", "fds"):
            values = [s["procs"][name][metric] for s in after]
            if any(v is None for v in values):
                row[metric] = {"missing": True}
                result["ok"] = False
                result["why"].append(f"{name}: no {metric} for some samples (process gone)")
                continue
            first = statistics.median(values[:third])
            last = statistics.median(values[-third:])
            growth = (last - first) / first if first else 0.0
            allowed = max(first * GROWTH, RSS_SLACK_KIB if metric == "rss_kib" else FD_SLACK)
            ok = last - first <= allowed
            row[metric] = {"first": first, "last": last, "min": min(values), "max": max(values),
                           "growth": round(growth, 4), "allowed_abs": allowed, "ok": ok}
            if not ok:
                result["ok"] = False
                result["why"].append(f"{name}: {metric} grew {growth:+.1%} ({first} -> {last})")
        result["procs"][name] = row
    return result


# -- report ------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def svg_plot(samples: list[dict], names: list[str], warmup: float) -> str:
    """Two panels (RSS MiB, open fds) against time, one line per process, hand-written SVG."""
    w, h, pad, gap = 900, 260, 60, 40
    total_h = 2 * h + gap + 60
    tmax = max((s["t"] for s in samples), default=1) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total_h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{total_h}" fill="white"/>']
    for panel, (metric, label, scale) in enumerate((("rss_kib", "RSS (MiB)", 1 / 1024),
                                                     ("fds", "open fds", 1))):
        top = 20 + panel * (h + gap)
        values = [s["procs"][n][metric] * scale for s in samples for n in names
                  if s["procs"][n][metric] is not None]
        vmax = max(values, default=1) * 1.15 or 1
        x0, x1, y0, y1 = pad, w - 160, top + h - 30, top + 10
        out.append(f'<text x="{x0}" y="{top + 4}" font-weight="bold">{label}</text>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>')
        for k in range(5):
            v = vmax * k / 4
            y = y0 - (y0 - y1) * k / 4
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#eee"/>')
        for k in range(6):
            t = tmax * k / 5
            x = x0 + (x1 - x0) * k / 5
            out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{t:.0f} s</text>')
        wx = x0 + (x1 - x0) * min(warmup, tmax) / tmax
        out.append(f'<rect x="{x0}" y="{y1}" width="{wx - x0:.1f}" height="{y0 - y1}" fill="#f4f4f4"/>')
        out.append(f'<text x="{(x0 + wx) / 2:.1f}" y="{y1 + 14}" text-anchor="middle" fill="#888">'
                   f'warm-up</text>')
        for i, name in enumerate(names):
            pts = [(x0 + (x1 - x0) * s["t"] / tmax, y0 - (y0 - y1) * s["procs"][name][metric] * scale / vmax)
                   for s in samples if s["procs"][name][metric] is not None]
            color = COLORS[i % len(COLORS)]
            if pts:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{x1 + 12}" y="{y1 + 16 + 16 * i}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def markdown(report: dict) -> str:
    v = report["verdict"]
    lines = [f"# Soak run {report['started']}", "",
             f"{report['seconds']:.0f} s of mixed load, samples every {report['interval']} s, "
             f"warm-up {v['warmup_s']:.0f} s. **Verdict: {'PASS' if report['ok'] else 'FAIL'}**", "",
             "| process | RSS first -> last MiB (min-max) | RSS growth | fds first -> last (min-max) "
             "| fd growth |", "|---|---|---|---|---|"]
    for name, row in v["procs"].items():
        r, f = row.get("rss_kib", {}), row.get("fds", {})
        if r.get("missing") or f.get("missing"):
            lines.append(f"| {name} | gone | | | |")
            continue
        lines.append(f"| {name} | {r['first'] / 1024:.1f} -> {r['last'] / 1024:.1f} "
                     f"({r['min'] / 1024:.1f}-{r['max'] / 1024:.1f}) | {r['growth']:+.1%} | "
                     f"{f['first']:.0f} -> {f['last']:.0f} ({f['min']}-{f['max']}) | {f['growth']:+.1%} |")
    lines += ["", "Load carried:", ""]
    lines += [f"- {k}: {n}" for k, n in sorted(report["counts"].items())]
    lines += ["", f"Process exits: {report['exits']}", ""]
    if report["problems"]:
        lines += ["Problems:", ""] + [f"- {p[:500]}" for p in report["problems"]]
    lines += ["", "![RSS and fds](soak.svg)", ""]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=None, help="default: a quarter of the run, "
                    "at least two intervals")
    ap.add_argument("--restart-every", type=float, default=None, help="default: seconds/6, 10..60")
    ap.add_argument("--bulk-mib", type=int, default=16)
    ap.add_argument("--churn-threads", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(args.seconds / 4, 2 * args.interval)
    every = args.restart_every or min(60.0, max(10.0, args.seconds / 6))
    started = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / ".soak" / started
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=out))
    factory = ProcessFactory(out / "logs")
    payload = PayloadServer("127.0.0.1").start()
    load = Load(args.seconds)
    samples: list[dict] = []
    problems: list[str] = []
    stack = None
    try:
        stack = attack.start_stack(factory, work, payload)
        names = list(stack.processes())
        upload_file = work / "upload.bin"
        upload_sha = write_payload_file(upload_file, args.bulk_mib * MiB, 5)
        tally = attack.Tally()
        holder: dict = {}
        t0 = time.monotonic()
        load.end = t0 + args.seconds
        print(f"soak: {args.seconds:.0f} s, samples every {args.interval:.0f} s, warm-up {warmup:.0f} s, "
              f"client restart every {every:.0f} s; logs in {out / 'logs'}", flush=True)
        threads = [guarded(load, "sampler", lambda: sampler(load, stack, args.interval, t0, samples)),
                   guarded(load, "bulk", lambda: bulk(load, stack, upload_file, upload_sha,
                                                      args.bulk_mib * MiB)),
                   guarded(load, "bad-input", lambda: bad_input(load, stack, tally)),
                   guarded(load, "api", lambda: api_writes(load, stack)),
                   guarded(load, "restarts", lambda: restarts(load, factory, stack, every, holder))]
        threads += [guarded(load, f"churn-{i}", lambda i=i: churn(load, stack, i))
                    for i in range(args.churn_threads)]
        while load.running():
            dead = stack.dead()
            if dead:
                problems.append(f"process exited: {', '.join(dead)}")
                load.stop.set()
                break
            load.stop.wait(min(1.0, max(0.0, load.end - time.monotonic())))
            if samples and len(samples) % 6 == 0 and samples[-1].get("printed") is None:
                samples[-1]["printed"] = True
                s = samples[-1]
                print(f"  t={s['t']:5.0f} s  " + "  ".join(
                    f"{n} {(s['procs'][n]['rss_kib'] or 0) / 1024:.0f} MiB/{s['procs'][n]['fds']} fds"
                    for n in names), flush=True)
        load.stop.set()
        for t in threads:
            t.join(150)
        seconds = time.monotonic() - t0
        exits = {n: p.returncode for n, p in stack.processes().items() if not p.alive()}
        for s in samples:
            s.pop("printed", None)
        verdict = judge(samples, names, warmup)
        problems += verdict["why"] + load.failures
        problems += [f"{n} exited with status {code}" for n, code in exits.items()]
        problems += [f"{n} logged a traceback:\n{tb}" for n, tb in stack.tracebacks().items()]
        for p in factory.processes:
            if p.name.startswith("trisocks-restarted") and "Traceback" in p.output():
                problems.append(f"{p.name} logged a traceback:\n{attack.tracebacks(p)}")
        counts = dict(load.counts)
        counts["bad_inputs"] = sum(tally.tried.values())
        counts.pop("failures", None)
        report = {"started": started, "seconds": seconds, "interval": args.interval,
                  "warmup": warmup, "processes": names, "samples": samples, "verdict": verdict,
                  "counts": counts, "bad_inputs_per_listener": dict(tally.tried),
                  "exits": len(exits), "problems": problems,
                  "ok": not problems and verdict["ok"] and not exits}
    except BaseException:
        load.stop.set()
        raise
    finally:
        if stack is not None:
            stack.udp_echo.close()
        factory.close()
        payload.stop()
        shutil.rmtree(work, ignore_errors=True)
        kill_all_live()
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(markdown(report))
    (out / "soak.svg").write_text(svg_plot(samples, names, warmup))
    if args.out is None:
        for ext in ("json", "md", "svg"):
            shutil.copyfile(out / f"soak.{ext}", ROOT / ".soak" / f"latest.{ext}")
    print(markdown(report).replace("![RSS and fds](soak.svg)", f"plot: {out / 'soak.svg'}"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
