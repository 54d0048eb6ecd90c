#!/usr/bin/env python3
"""Benchmark trisocks against its peers, as a user would measure it.

Every system runs on 127.0.0.1, started fresh for each measurement group (bulk, rate,
idle) and torn down after it; nginx serves the payloads and sinks uploads.

  bulk   curl through the SOCKS5 port: download and upload of the payload (1 GiB) on one
         stream, then on N parallel streams that move the same total (aggregate MB/s =
         total bytes / wall time). Also RSS after the transfers and CPU s per GiB moved.
  rate   hey -n 3000 -c 50 -disable-keepalive -x socks5://...: 1 KiB GETs, a new
         connection each: req/s (200 answers / wall time), p50, p99, errors.
  idle   1000 SOCKS5 CONNECTs to an idle TCP server the harness runs, held open:
         RSS growth per channel.

Relays without SOCKS (socat, the lean Trio relay) are hit directly, as if they were
the HTTP server. Each figure is the median of --repeat repetitions (errors are summed).
The repetitions run in rounds: every system once per round, started fresh each time,
so that a shared machine's drift over the run is spread over all systems instead of
landing on whichever ran while it lasted (--sequential: all of one system first).
Results: benchmarks/results/<date>.{json,md,png} and latest.{md,png}; --quick runs go to
benchmarks/results/quick/, partial (--only) full runs to benchmarks/results/partial/.

Examples:
  make bench                                   # everything, full size (~10 min here)
  make bench ARGS="--quick"                    # smaller payloads, same shape (< 2 min)
  .venv/bin/python benchmarks/run.py --quick --only socat,trio-relay,pywssocks,linksocks
  .venv/bin/python benchmarks/run.py --smoke   # trisocks-forward + trio-relay, seconds
  # what --workers scales: 1 and 2 workers, several clients (one session per client)
  .venv/bin/python benchmarks/run.py --quick --only trisocks-forward,trisocks-workers --clients 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# benchmarks/ is sys.path[0] when this file runs as a script: siblings import directly.
import install
import measure
import policy_user
import procs
import report
import systems

HERE = Path(__file__).resolve().parent

REPO = HERE.parent
MiB = 2**20

PROFILES = {
    "full": {"size": 1024 * MiB, "requests": 3000, "concurrency": 50, "idle_channels": 1000,
             "repeat": 3},
    "quick": {"size": 48 * MiB, "requests": 1000, "concurrency": 50, "idle_channels": 300,
              "repeat": 3},
    "smoke": {"size": 4 * MiB, "requests": 50, "concurrency": 10, "idle_channels": 50,
              "repeat": 1},
}
SMOKE_SYSTEMS = ["trisocks-forward", "trio-relay"]
SS_CIPHERS = ["chacha20-ietf-poly1305", "aes-128-gcm"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [s.name for s in systems.ALL_SYSTEMS]
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems:\n" + "\n".join(f"  {s.name:18s} {s.description}"
                                         for s in systems.ALL_SYSTEMS))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="48 MiB payload, 1000 requests, 300 idle channels, still --repeat "
                           "times; writes to results/quick/")
    mode.add_argument("--smoke", action="store_true",
                      help="test-suite mode: trisocks-forward and trio-relay only, 4 MiB, "
                           "50 requests, 1 repetition, no apt or peer installs, output to a "
                           "temporary directory unless --out; exit 0 only if every step "
                           "produced a number")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help=f"run only these systems (of: {', '.join(names)})")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="directory for the JSON/Markdown/PNG results")
    p.add_argument("--repeat", type=int, help="repetitions per figure (default 3; smoke 1)")
    p.add_argument("--sequential", action="store_true",
                   help="run all repetitions of a system before the next system (default: "
                        "interleaved rounds, each system started fresh once per round, so "
                        "that drift of a shared machine falls on every system alike)")
    p.add_argument("--size-mib", type=int, help="bulk payload in MiB (default 1024; quick 256)")
    p.add_argument("--requests", type=int, help="requests per rate run (default 3000)")
    p.add_argument("--concurrency", type=int, help="concurrent requests (default 50)")
    p.add_argument("--idle-channels", type=int, help="idle channels to open (default 1000)")
    p.add_argument("--streams", type=int, default=8, help="parallel bulk streams (default 8)")
    p.add_argument("--clients", type=int, default=1, metavar="N",
                   help="trisocks-forward and trisocks-workers: N trisocks clients (N WebSocket "
                        "sessions, N SOCKS5 ports); parallel streams and hey runs are spread "
                        "over them (a session lives in one worker: workers scale with "
                        "clients). Other systems: unchanged")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="trisocks-workers: the server's --workers (default 2)")
    p.add_argument("--payload", choices=["zero", "random"], default="zero",
                   help="payload bytes: zero-filled (default; the project's reference "
                        "figures and goals use it) or random (incompressible: peers that "
                        "negotiate WebSocket permessage-deflate slow down a lot)")
    p.add_argument("--groups", default="bulk,rate,idle",
                   help="measurement groups to run (default bulk,rate,idle)")
    p.add_argument("--ss-cipher", default="auto",
                   help="shadowsocks cipher; 'auto' (default) times "
                        f"{' and '.join(SS_CIPHERS)} here and keeps the faster")
    p.add_argument("--rate-tool", choices=["auto", "hey", "python"], default="auto",
                   help="load generator for the rate group: hey, or the built-in asyncio "
                        "client (auto: hey when installed)")
    p.add_argument("--no-install", action="store_true",
                   help="use only what is already installed (no apt-get, no venvs)")
    p.add_argument("--check-goals", action="store_true",
                   help="exit 1 if a goal fails or lacks its figures")
    args = p.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    args.size = (args.size_mib * MiB) if args.size_mib else profile["size"]
    for key in ("requests", "concurrency", "idle_channels", "repeat"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        args.systems = [n for n in names if n in wanted]
    else:
        args.systems = SMOKE_SYSTEMS if args.smoke else names
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    bad = set(args.groups) - {"bulk", "rate", "idle"}
    if bad:
        p.error(f"unknown group(s) {', '.join(sorted(bad))}")
    if args.clients < 1 or args.workers < 1:
        p.error("--clients and --workers must be 1 or more")
    if args.repeat < 1 or args.streams < 1 or args.size < args.streams:
        p.error("--repeat, --streams and the payload size must be positive")
    return args


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def scoped(self, prefix: str):
        return lambda text: self(f"{prefix}: {text}")


# ---- groups ---------------------------------------------------------------------------

def _target(running: systems.Running, ctx: systems.Context) -> measure.Target:
    return measure.Target(running.kind, running.entry_port, ctx.nginx_port, ctx.env(),
                          tuple(running.info.get("entry_ports", ())))


def run_bulk(system, ctx, args, payload, tools, say) -> dict:
    group: dict = {"reps": []}
    running = systems.start(system, ctx, "bulk")
    try:
        group["commands"] = running.info["commands"]
        group["rss_start"] = running.rss()
        warm = measure.bulk_warmup(tools["curl"], _target(running, ctx), payload)
        if warm:
            say(f"warm-up failed: {warm}")
            group["warmup_error"] = warm
        for i in range(args.repeat):
            rep_say = say if args.repeat == 1 else (lambda t, i=i: say(f"rep {i + 1}: {t}"))
            rep = measure.bulk_rep(tools["curl"], _target(running, ctx), payload,
                                   running.pgids, rep_say)
            rep["rss_after"] = running.rss()
            group["reps"].append(rep)
            say(f"rep {i + 1}/{args.repeat}: RSS {rep['rss_after'] / 1e6:.1f} MB, "
                f"CPU {rep['cpu_s_per_gib'] or 0:.2f} s/GiB")
    finally:
        running.stop()
    return group


def run_rate(system, ctx, args, tools, say) -> dict:
    group: dict = {"reps": []}
    running = systems.start(system, ctx, "rate")
    try:
        # A short unmeasured burst first, as the bulk group warms up with one transfer:
        # the first few hundred connections of a fresh process run slower (allocator
        # arenas, caches), which made repetition 1 an outlier for every Python system.
        warm_n = max(args.concurrency, args.requests // 10)
        target = _target(running, ctx)
        if tools.get("hey"):
            measure.hey_rate(tools["hey"], target, warm_n, args.concurrency)
        else:
            measure.py_rate(target, warm_n, args.concurrency)
        for i in range(args.repeat):
            target = _target(running, ctx)
            cpu_before = procs.cpu_seconds(running.pgids)
            if tools.get("hey"):
                rep = measure.hey_rate(tools["hey"], target, args.requests, args.concurrency)
            else:
                rep = measure.py_rate(target, args.requests, args.concurrency)
            # CPU time of the system's processes per 1000 requests: on a shared machine
            # the wall-clock req/s moves with other work far more than this does.
            cpu = procs.cpu_seconds(running.pgids) - cpu_before
            rep["cpu_s"] = cpu
            rep["cpu_ms_per_kreq"] = cpu * 1e6 / args.requests if args.requests else None
            group["reps"].append(rep)
            say(f"rep {i + 1}/{args.repeat}: {rep['rps'] or 0:.0f} req/s, "
                f"p50 {rep['p50_ms'] or 0:.1f} ms, p99 {rep['p99_ms'] or 0:.1f} ms, "
                f"{rep['errors']} errors ({rep['tool']}), "
                f"CPU {rep['cpu_ms_per_kreq'] or 0:.0f} ms/1k req")
    finally:
        running.stop()
    return group


def run_idle(system, ctx, args, say) -> dict:
    """Each repetition on a freshly started system: channels left over from a previous
    repetition (some tunnels pass closes on late) would skew the baseline."""
    group: dict = {"reps": []}
    with measure.IdleServer() as idle:
        for i in range(args.repeat):
            running = systems.start(system, ctx, "idle", target_port=idle.port)
            try:
                rep = measure.idle_rep(_target(running, ctx), idle, args.idle_channels,
                                       running.rss)
            finally:
                running.stop()
            group["reps"].append(rep)
            per = rep["bytes_per_channel"]
            say(f"rep {i + 1}/{args.repeat}: {rep['opened']}/{rep['requested']} open "
                f"in {rep['open_seconds']:.1f}s, {(per or 0):.0f} B per channel, RSS "
                f"{rep['rss_before'] / 1e6:.1f} -> {rep['rss_after'] / 1e6:.1f} MB, "
                f"{rep['errors']} errors")
    return group


def run_system(system, ctx, args, payload, tools, progress) -> dict:
    result: dict = {"description": system.description, "groups": {}, "status": "ok"}
    reason = system.unavailable(ctx)
    if reason:
        progress(f"{system.name}: SKIPPED: {reason}")
        return dict(result, status="skipped", reason=reason)
    result["version"] = system.version(ctx)
    failures = []
    for group in args.groups:
        say = progress.scoped(f"{system.name} {group}")
        try:
            if group == "bulk":
                g = run_bulk(system, ctx, args, payload, tools, say)
            elif group == "rate":
                g = run_rate(system, ctx, args, tools, say)
            else:
                g = run_idle(system, ctx, args, say)
        except procs.StartError as exc:
            # A system that cannot start now will not start for the next group either.
            first = str(exc).splitlines()[0]
            say(f"FAILED: {first}")
            result["groups"][group] = {"reps": [], "error": str(exc)}
            failures.append(f"{group}: {first}")
            rest = args.groups[args.groups.index(group) + 1:]
            if rest:
                say(f"not running {', '.join(rest)}: the system does not start")
                failures += [f"{g}: not run" for g in rest]
            break
        result["groups"][group] = g
    if system.name == "shadowsocks-libev":
        result["info"] = f"cipher {ctx.ss_cipher}"
    if system.name == "socat":
        result["info"] = f"socat -b {systems.Socat.buffer}"
    if system.name == "trisocks-workers":
        result["info"] = (f"server --workers {args.workers}; {args.clients} client(s); CPU and "
                          "RSS: the supervisor and its workers")
    elif system.name == "trisocks-forward" and args.clients > 1:
        result["info"] = f"{args.clients} clients"
    if system.name == "trisocks-policy":
        result["info"] = (f"user with {len(policy_user.bench_rules([1]))} rules (the last allows "
                          f"the bench target), speed_up = speed_down = {policy_user.SPEED} B/s, "
                          f"quota {policy_user.QUOTA} bytes, accounting in --db "
                          "(benchmarks/policy_user.py)")
    if failures:
        result["status"] = "failed" if not any(
            g.get("reps") for g in result["groups"].values()) else "partial"
        result["reason"] = "; ".join(failures)
    return result


def merge_round(before: dict | None, got: dict) -> dict:
    """One system's results over the rounds so far: repetitions appended per group; a
    round that failed leaves the system "partial" (or "failed" if nothing was measured)."""
    if before is None:
        return got
    for group, g in got["groups"].items():
        if group in before["groups"]:
            before["groups"][group]["reps"].extend(g["reps"])
            if "error" in g:
                before["groups"][group].setdefault("error", g["error"])
        else:
            before["groups"][group] = g
    if got["status"] != "ok":
        measured = any(g.get("reps") for g in before["groups"].values())
        before["status"] = "partial" if measured else "failed"
        before["reason"] = "; ".join(x for x in (before.get("reason"), got.get("reason")) if x)
    return before


def pick_ss_cipher(ctx, args, payload, tools, progress) -> dict:
    """Time one download and one upload with each AEAD cipher; keep the faster."""
    timing = {}
    # The part file (payload / streams) is plenty to rank two ciphers.
    sample = measure.Payload(payload.root, payload.part_size, 1, payload.part, payload.part)
    for cipher in SS_CIPHERS:
        ctx.ss_cipher = cipher
        try:
            running = systems.start(systems.BY_NAME["shadowsocks-libev"], ctx, "cipher")
        except procs.StartError as exc:
            progress(f"shadowsocks cipher {cipher}: cannot start: {str(exc).splitlines()[0]}")
            continue
        try:
            t = _target(running, ctx)
            speeds = [measure.curl_transfer(tools["curl"], t, d, sample, 1)[0] for d in
                      ("down", "up")]
        finally:
            running.stop()
        if None not in speeds:
            timing[cipher] = sum(speeds) / 2
            progress(f"shadowsocks cipher {cipher}: {timing[cipher]:.0f} MB/s")
    ctx.ss_cipher = max(timing, key=timing.get) if timing else SS_CIPHERS[0]
    return {"chosen": ctx.ss_cipher, "mb_per_s": timing}


# ---- machine facts --------------------------------------------------------------------

def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _proc_field(path: str, name: str) -> str | None:
    """Value of the first "name: value" line of a /proc text file."""
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def machine_facts(tools: dict) -> dict:
    cpu = _proc_field("/proc/cpuinfo", "model name") or "unknown"
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    mem = int(mem_kib.split()[0]) * 1024 if mem_kib else None
    versions = {}
    if tools.get("nginx"):
        versions["nginx"] = systems.nginx_version(tools["nginx"])
    if tools.get("curl"):
        line = _first_line([tools["curl"], "--version"]) or ""
        versions["curl"] = " ".join(line.split()[:2]) or None
    for tool, pkg in (("hey", "hey"), ("microsocks", "microsocks"),
                      ("ss-server", "shadowsocks-libev")):
        if tools.get(tool):
            versions[pkg] = _first_line(["dpkg-query", "-W", "-f=${Version}", pkg])
    if tools.get("socat"):
        versions["socat"] = systems.Socat().version(systems.Context(
            work=HERE, logdir=HERE, ports=None, nginx_port=0, tools=tools))
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "mem_total_bytes": mem,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "loadavg_end": _loadavg(),
        "runner_python": sys.executable,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "tool_versions": versions,
    }


# ---- main -------------------------------------------------------------------------------

def smoke_problems(data: dict) -> list[str]:
    """Every step of the smoke run must have produced a number."""
    problems = []
    need = {"bulk": ["down", "up", "down_par", "up_par", "cpu_s_per_gib",
                     "rss_after_bulk_mb"],
            "rate": ["rps", "p50_ms", "p99_ms"], "idle": ["bytes_per_idle_channel"]}
    for name in data["config"]["systems"]:
        res = data["systems"].get(name, {})
        if res.get("status") != "ok":
            problems.append(f"{name}: {res.get('status')}: {res.get('reason', '')}")
            continue
        f = data["figures"].get(name, {})
        for group in data["config"]["groups"]:
            for key in need[group]:
                if f.get(key) is None:
                    problems.append(f"{name}: no figure for {key}")
        if f.get("errors"):
            problems.append(f"{name}: {f['errors']} errors")
    return problems


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    progress = Progress()
    procs.install_cleanup()
    nofile = procs.raise_nofile()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = install.WORK
    logdir = work / "logs" / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    _prune_logs(work / "logs", keep=20)
    ilog = install.InstallLog()
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    progress(f"profile {profile}: systems {', '.join(args.systems)}; payload "
             f"{args.size / MiB:.0f} MiB ({args.payload}); {args.requests} requests; "
             f"{args.idle_channels} idle channels; repeat {args.repeat}; logs in {logdir}")
    load = _loadavg()
    data_load_start = load
    if load and load[0] > (os.cpu_count() or 1):
        progress(f"note: load average {load[0]:.1f} on {os.cpu_count()} cores at start: "
                 "other work on this machine makes figures noisy")
    if nofile < 4 * args.idle_channels + 256:
        ilog.note(f"file-descriptor limit {nofile} is low for {args.idle_channels} channels")

    # 1. tools and venvs
    install_allowed = not (args.smoke or args.no_install)
    needed_tools = ["nginx", "curl", "hey"]
    for name in args.systems:
        needed_tools += {"shadowsocks-libev": ["ss-server", "ss-local"],
                         "microsocks": ["microsocks"], "socat": ["socat"]}.get(name, [])
    if install_allowed:
        tools = install.ensure_apt_tools(needed_tools, ilog, logdir)
    else:
        tools = {t: install.which(t) for t in needed_tools}
    venvs: dict[str, Path | None] = {}
    for peer in ("pywssocks", "linksocks"):
        if peer in args.systems:
            venvs[peer] = (install.ensure_venv(peer, ilog, logdir) if install_allowed
                           else (install.venv_python(peer)
                                 if install.venv_python(peer).exists() else None))
    chart_py = None
    if install_allowed:
        chart_py = install.ensure_venv("bench", ilog, logdir)
    elif install.venv_python("bench").exists():
        chart_py = install.venv_python("bench")
    if args.rate_tool == "python":
        tools["hey"] = None
    elif not tools.get("hey"):
        if args.rate_tool == "hey":
            print("error: --rate-tool hey but hey is not installed", file=sys.stderr)
            return 2
        ilog.note("hey missing: request rate measured with the built-in asyncio client")
    for must in ("nginx", "curl"):
        if not tools.get(must):
            print(f"error: {must} is required and could not be found or installed",
                  file=sys.stderr)
            return 2

    # 2. payloads and nginx
    tmp = Path(tempfile.mkdtemp(prefix="trisocks-bench-"))
    ports = procs.PortAllocator()
    data: dict = {}
    nginx = None
    try:
        progress(f"writing payload files to {tmp}")
        payload = measure.make_payload(tmp / "www", args.size, args.streams, args.payload)
        nginx_port = ports.get()
        nginx = systems.start_nginx(tools["nginx"], tmp / "nginx", payload.root, nginx_port,
                                    logdir)
        sink = measure.check_upload_sink(tools["curl"], nginx_port, payload)
        progress(f"nginx on 127.0.0.1:{nginx_port}; upload sink read "
                 f"{sink['uploaded']} of {sink['expected']} bytes: "
                 f"{'ok' if sink['ok'] else 'NOT OK'}")
        if not sink["ok"]:
            ilog.note(f"nginx upload sink did not read the whole body: {sink}")
        ctx = systems.Context(work=work, logdir=logdir, ports=ports, nginx_port=nginx_port,
                              tools=tools, venvs=venvs, clients=args.clients,
                              workers=args.workers)

        results: dict = {}
        ss_choice = None
        # Interleaved rounds (the default): each round runs every system once, so the
        # repetitions of two systems being compared are minutes, not a whole run, apart.
        rounds = 1 if args.sequential else args.repeat
        round_args = args if args.sequential else argparse.Namespace(**{**vars(args), "repeat": 1})
        for r in range(rounds):
            if rounds > 1:
                progress(f"=== round {r + 1}/{rounds}")
            for name in args.systems:
                system = systems.BY_NAME[name]
                if results.get(name, {}).get("status") in ("skipped", "failed"):
                    continue  # it will not start in this round either
                if (r == 0 and name == "shadowsocks-libev" and not system.unavailable(ctx)
                        and "bulk" in args.groups):
                    if args.ss_cipher == "auto":
                        ss_choice = pick_ss_cipher(ctx, args, payload, tools, progress)
                    else:
                        ctx.ss_cipher = args.ss_cipher
                        ss_choice = {"chosen": args.ss_cipher, "mb_per_s": {}}
                progress(f"== {name}: {system.description}")
                try:
                    got = run_system(system, ctx, round_args, payload, tools, progress)
                except (OSError, RuntimeError, ValueError) as exc:  # harness-level failure
                    progress(f"{name}: FAILED: {exc}")
                    got = {"description": system.description, "groups": {},
                           "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()}
                results[name] = merge_round(results.get(name), got)
    finally:
        if nginx:
            procs.stop(nginx)
        procs.stop_all()
        _rmtree(tmp)

    # 3. report
    figures = {n: report.summarize(r) for n, r in results.items() if r["status"] != "skipped"}
    data = {
        "profile": profile,
        "config": {"systems": args.systems, "groups": args.groups, "size": args.size,
                   "streams": args.streams, "payload": args.payload,
                   "clients": args.clients, "workers": args.workers,
                   "requests": args.requests, "concurrency": args.concurrency,
                   "idle_channels": args.idle_channels, "repeat": args.repeat,
                   "order": "sequential" if args.sequential else "interleaved",
                   "rate_tool": "hey" if tools.get("hey") else "python"},
        "machine": dict(machine_facts(tools), loadavg_start=data_load_start),
        "install_notes": ilog.notes,
        "nginx_upload_check": sink,
        "shadowsocks_cipher": ss_choice,
        "systems_order": args.systems,
        "systems": results,
        "figures": figures,
    }
    data["machine"]["tool_versions"].update(
        {n: r.get("version") for n, r in results.items() if r.get("version")})
    data["ratio_reference"] = report.ratio_reference(figures, args.systems)
    data["goals"] = [] if args.smoke else report.goals(figures)
    out_dir = args.out
    if out_dir is None:
        if args.smoke:
            out_dir = Path(tempfile.mkdtemp(prefix="trisocks-smoke-"))
        else:
            sub = "quick" if args.quick else ("partial" if args.only else "")
            out_dir = HERE / "results" / sub if sub else HERE / "results"
    written = report.write_all(data, out_dir, dt.date.today().isoformat(), chart_py)

    print()
    print(report.markdown(data, with_goals=False))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if args.smoke:
        problems = smoke_problems(data)
        for p in problems:
            print(f"smoke: {p}", file=sys.stderr)
        print("smoke: OK" if not problems else "smoke: FAILED")
        return 0 if not problems else 1
    if data["goals"]:
        print("\nGoals (trisocks-forward):")
        for g in data["goals"]:
            print(f"  {g['status']:7s} {g['goal']}: {g['detail']}")
    if args.check_goals and any(g["status"] != "PASS" for g in data["goals"]):
        return 1
    return 0


def _prune_logs(logs: Path, keep: int) -> None:
    """Keep the per-run log directories of the last ``keep`` runs."""
    runs = sorted(d for d in logs.iterdir() if d.is_dir() and d.name[:8].isdigit())
    for old in runs[:-keep]:
        _rmtree(old)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        procs.stop_all()
        print("\ninterrupted; every started process was stopped", file=sys.stderr)
        sys.exit(130)
