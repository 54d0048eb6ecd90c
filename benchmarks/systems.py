"""The systems under test: how to start each one on loopback, wait until it really
carries traffic, and tear it down.

Each system is described by a :class:`System` whose ``plan`` returns the processes to
start (in order, each optionally waited on by port) and the entry port that clients
talk to: a SOCKS5 port for the proxies, a plain TCP port for the relays (socat and the
lean Trio relay), which forward to a fixed target (nginx, or the idle server).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import measure
import policy_user
from procs import Proc, StartError, check_alive, rss_bytes, spawn, stop, wait_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Context:
    """What every system needs to know to start."""

    work: Path
    logdir: Path
    ports: object  # procs.PortAllocator
    nginx_port: int
    token: str = "trisocks-bench-token"
    tools: dict[str, str | None] = field(default_factory=dict)
    venvs: dict[str, Path | None] = field(default_factory=dict)
    project_python: Path = REPO / ".venv" / "bin" / "python"
    trisocks_bin: Path = REPO / ".venv" / "bin" / "trisocks"
    ss_cipher: str = "chacha20-ietf-poly1305"
    seq: int = 0
    clients: int = 1  # trisocks-forward/-workers: clients, each its own SOCKS5 port (--clients)
    workers: int = 2  # trisocks-workers: server --workers (run.py --workers)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        return env


@dataclass
class Step:
    label: str
    argv: list[str]
    wait_port: int | None = None


@dataclass
class Plan:
    steps: list[Step]
    entry_port: int
    info: dict = field(default_factory=dict)


@dataclass
class Running:
    """A started system. ``entry_port`` is the SOCKS5 port (kind "socks") or the relay's
    listening port (kind "relay")."""

    system: System
    procs: list[Proc]
    entry_port: int
    info: dict

    @property
    def kind(self) -> str:
        return self.system.kind

    @property
    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rss(self) -> int:
        return rss_bytes(self.pgids)

    def check_alive(self) -> None:
        check_alive(self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


class System:
    name = ""
    kind = "socks"  # or "relay"
    description = ""

    def unavailable(self, ctx: Context) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def plan(self, ctx: Context, target_port: int) -> Plan:
        raise NotImplementedError

    def version(self, ctx: Context) -> str | None:
        return None


def _run_text(argv: list[str], timeout: float = 30) -> tuple[int, str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return out.returncode, (out.stdout + out.stderr).strip()


def _dpkg_version(pkg: str) -> str | None:
    rc, text = _run_text(["dpkg-query", "-W", "-f=${Version}", pkg])
    return text if rc == 0 and text else None


# ---- trisocks -----------------------------------------------------------------------

class _Trisocks(System):
    needs: ClassVar[tuple[str, ...]] = ()  # sub-commands that must exist
    # sub-command -> options its --help must list
    needs_flags: ClassVar[dict[str, tuple[str, ...]]] = {}

    def unavailable(self, ctx: Context) -> str | None:
        if not ctx.trisocks_bin.exists():
            return f"{ctx.trisocks_bin} not found (run `make build`)"
        for sub in self.needs:
            rc, text = _run_text([str(ctx.trisocks_bin), sub, "--help"])
            if rc != 0:
                last = text.splitlines()[-1] if text else f"exit {rc}"
                return f"`trisocks {sub} --help` fails: {last}"
            missing = [f for f in self.needs_flags.get(sub, ()) if f not in text]
            if missing:
                return f"`trisocks {sub}` has no {', '.join(missing)} option yet"
        return None

    def version(self, ctx: Context) -> str | None:
        rc, text = _run_text([str(ctx.trisocks_bin), "version"])
        return text.splitlines()[0] if rc == 0 and text else None


class TrisocksForward(_Trisocks):
    """With ``ctx.clients`` > 1 (run.py --clients N): N clients, each with its own WebSocket
    session and SOCKS5 port; parallel streams and load generators are spread over them."""

    name = "trisocks-forward"
    description = "trisocks, forward mode: SOCKS5 on the client, server dials out"
    needs = ("server", "client")
    server_flags: ClassVar[tuple[str, ...]] = ()

    def server_extra(self, ctx: Context) -> list[str]:
        return []

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ws = ctx.ports.get()
        socks = [ctx.ports.get() for _ in range(max(1, ctx.clients))]
        tb = str(ctx.trisocks_bin)
        steps = [Step("server", [tb, "server", "-H", "127.0.0.1", "-P", str(ws), "-t", ctx.token,
                                 *self.server_extra(ctx)], ws)]
        for i, port in enumerate(socks):
            steps.append(Step("client" if len(socks) == 1 else f"client{i}",
                              [tb, "client", "-u", f"ws://127.0.0.1:{ws}", "-t", ctx.token,
                               "-s", "127.0.0.1", "-p", str(port)], port))
        return Plan(steps, socks[0], {"entry_ports": socks} if len(socks) > 1 else {})


class TrisocksWorkers(TrisocksForward):
    """trisocks-forward with the server as a supervisor of ``ctx.workers`` worker processes
    sharing the port (--workers; CPU and RSS sum the supervisor and its workers). One client
    is one WebSocket session, which lives in one worker: what the workers add shows with
    several clients (run.py --clients N)."""

    name = "trisocks-workers"
    description = "trisocks, forward mode, server --workers 2 (a supervisor, 2 workers)"
    needs_flags: ClassVar[dict[str, tuple[str, ...]]] = {"server": ("--workers",)}

    def server_extra(self, ctx: Context) -> list[str]:
        return ["--workers", str(ctx.workers)]


class TrisocksPolicy(_Trisocks):
    """trisocks-forward with policy on (issue 11, "Cheap"): the client uses the key of a
    user created through the management API with 100 destination rules (the last one
    allows the bench target), speed limits of 1 TiB/s up and down and a 1 PiB quota; the
    server runs with -k and --db, so the user's traffic is accounted and stored.
    benchmarks/policy_user.py creates the user on a setup instance of the server, stops it
    and then becomes the server (exec), which restores the user from the database: the
    measured processes are the same two as trisocks-forward's."""

    name = "trisocks-policy"
    description = ("trisocks, forward mode, policy on: a user with 100 rules and a speed "
                   "limit far above the speed, accounting on")
    needs = ("server", "client")
    needs_flags: ClassVar[dict[str, tuple[str, ...]]] = {"server": ("--api-key", "--db",
                                                                    "--allow")}

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ws, socks, setup = ctx.ports.get(), ctx.ports.get(), ctx.ports.get()
        tb = str(ctx.trisocks_bin)
        db = ctx.logdir / f"policy-{ws}.db"  # fresh per start: the user is created anew
        key, user = policy_user.API_KEY, policy_user.USER_KEY
        allow = [ctx.nginx_port] + ([target_port] if target_port != ctx.nginx_port else [])
        wrapper = [str(ctx.project_python), str(HERE / "policy_user.py"),
                   "--setup-port", str(setup), "--api-key", key, "--user-key", user]
        for port in allow:
            wrapper += ["--allow-port", str(port)]
        return Plan([
            Step("server", [*wrapper, "--", tb, "server", "-H", "127.0.0.1", "-P", str(ws),
                            "-k", key, "--db", str(db)], ws),
            Step("client", [tb, "client", "-u", f"ws://127.0.0.1:{ws}", "-t", user,
                            "-s", "127.0.0.1", "-p", str(socks)], socks),
        ], socks)


class TrisocksRedis(TrisocksPolicy):
    """trisocks-policy with its state in Redis (``--store redis://``, docs/scale-out.md)
    instead of the SQLite file: a fresh redis-server per start, whose CPU and memory count
    with the system's, so the figures say what the shared store costs in all."""

    name = "trisocks-redis"
    description = ("trisocks-policy with --store redis:// (a local redis-server, counted "
                   "with the system)")
    needs_flags: ClassVar[dict[str, tuple[str, ...]]] = {"server": ("--api-key", "--store",
                                                                    "--allow")}

    def unavailable(self, ctx: Context) -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server not found (make tools installs it)"
        return super().unavailable(ctx)

    def plan(self, ctx: Context, target_port: int) -> Plan:
        plan = super().plan(ctx, target_port)
        port = ctx.ports.get()
        server = plan.steps[0].argv
        at = server.index("--db")
        server[at:at + 2] = ["--store", f"redis://127.0.0.1:{port}/0"]
        redis = Step("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                               "--save", "", "--appendonly", "no", "--dir", str(ctx.logdir)],
                     port)
        return Plan([redis, *plan.steps], plan.entry_port, plan.info)


class TrisocksReverse(_Trisocks):
    name = "trisocks-reverse"
    description = "trisocks, reverse mode: SOCKS5 on the server, provider dials out"
    needs = ("server", "provider")
    needs_flags: ClassVar[dict[str, tuple[str, ...]]] = {"server": ("--reverse",)}

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ws, socks = ctx.ports.get(), ctx.ports.get()
        tb = str(ctx.trisocks_bin)
        return Plan([
            Step("server", [tb, "server", "-H", "127.0.0.1", "-P", str(ws), "-t", ctx.token,
                            "-r", "-s", "127.0.0.1", "-p", str(socks)], ws),
            Step("provider", [tb, "provider", "-u", f"ws://127.0.0.1:{ws}", "-t", ctx.token]),
        ], socks)


# ---- Python / Go peers ---------------------------------------------------------------

class Pywssocks(System):
    name = "pywssocks"
    description = "pywssocks 1.5.1 (Python, asyncio), forward mode"

    def unavailable(self, ctx: Context) -> str | None:
        py = ctx.venvs.get("pywssocks")
        if not py or not (py.parent / "pywssocks").exists():
            return "pywssocks venv could not be installed"
        return None

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ws, socks = ctx.ports.get(), ctx.ports.get()
        exe = str(ctx.venvs["pywssocks"].parent / "pywssocks")
        return Plan([
            Step("server", [exe, "server", "-H", "127.0.0.1", "-P", str(ws), "-t", ctx.token], ws),
            Step("client", [exe, "client", "-t", ctx.token, "-u", f"ws://127.0.0.1:{ws}",
                            "-h", "127.0.0.1", "-p", str(socks)], socks),
        ], socks)

    def version(self, ctx: Context) -> str | None:
        from install import pip_version
        return pip_version("pywssocks", "pywssocks")


class Linksocks(System):
    name = "linksocks"
    description = "linksocks 1.8.9 (Go core, Python bindings), forward mode"

    def unavailable(self, ctx: Context) -> str | None:
        py = ctx.venvs.get("linksocks")
        if not py or not (py.parent / "linksocks").exists():
            return "linksocks venv could not be installed"
        return None

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ws, socks = ctx.ports.get(), ctx.ports.get()
        py = ctx.venvs["linksocks"]
        return Plan([
            Step("server", [str(py), str(HERE / "linksocks_server.py"), "--ws-port", str(ws),
                            "--token", ctx.token], ws),
            Step("client", [str(py.parent / "linksocks"), "client", "-t", ctx.token,
                            "-u", f"ws://127.0.0.1:{ws}", "-s", "127.0.0.1", "-p", str(socks),
                            # no proxy env, and no direct mode (it would try STUN/UPnP,
                            # traffic that must not leave loopback)
                            "-E", "--direct-mode", "relay-only"], socks),
        ], socks)

    def version(self, ctx: Context) -> str | None:
        from install import pip_version
        return pip_version("linksocks", "linksocks")


# ---- C peers and baselines -------------------------------------------------------------

class Shadowsocks(System):
    name = "shadowsocks-libev"
    description = "shadowsocks-libev (C): ss-local -> ss-server, 2 hops, AEAD cipher"

    def unavailable(self, ctx: Context) -> str | None:
        missing = [t for t in ("ss-server", "ss-local") if not ctx.tools.get(t)]
        return f"{', '.join(missing)} not installed" if missing else None

    def plan(self, ctx: Context, target_port: int) -> Plan:
        ssport, socks = ctx.ports.get(), ctx.ports.get()
        common = ["-k", "trisocks-bench-password", "-m", ctx.ss_cipher, "-t", "300"]
        return Plan([
            Step("ss-server", [ctx.tools["ss-server"], "-s", "127.0.0.1", "-p", str(ssport),
                               *common], ssport),
            Step("ss-local", [ctx.tools["ss-local"], "-s", "127.0.0.1", "-p", str(ssport),
                              "-b", "127.0.0.1", "-l", str(socks), *common], socks),
        ], socks, {"cipher": ctx.ss_cipher})

    def version(self, ctx: Context) -> str | None:
        return _dpkg_version("shadowsocks-libev")


class Microsocks(System):
    name = "microsocks"
    description = "microsocks (C): plain SOCKS5 server, 1 hop"

    def unavailable(self, ctx: Context) -> str | None:
        return None if ctx.tools.get("microsocks") else "microsocks not installed"

    def plan(self, ctx: Context, target_port: int) -> Plan:
        socks = ctx.ports.get()
        return Plan([Step("microsocks", [ctx.tools["microsocks"], "-i", "127.0.0.1",
                                         "-p", str(socks)], socks)], socks)

    def version(self, ctx: Context) -> str | None:
        return _dpkg_version("microsocks")


class Socat(System):
    name = "socat"
    kind = "relay"
    description = "socat -b 262144, 2 hops, no SOCKS, no WebSocket (bulk ceiling)"
    # socat's default 8 KiB transfer block caps it near 350 MB/s on this machine, below
    # the lean Trio relay; with the same 256 KiB the Trio relay reads with, it is the
    # ceiling it is meant to be.
    buffer = 262144

    def unavailable(self, ctx: Context) -> str | None:
        return None if ctx.tools.get("socat") else "socat not installed"

    def plan(self, ctx: Context, target_port: int) -> Plan:
        a, b = ctx.ports.get(), ctx.ports.get()
        socat = ctx.tools["socat"]
        return Plan([
            Step("hop2", [socat, "-b", str(self.buffer), self._listen(b),
                          f"TCP:127.0.0.1:{target_port}"], b),
            Step("hop1", [socat, "-b", str(self.buffer), self._listen(a),
                          f"TCP:127.0.0.1:{b}"], a),
        ], a)

    @staticmethod
    def _listen(port: int) -> str:
        return f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024"

    def version(self, ctx: Context) -> str | None:
        _, text = _run_text([ctx.tools["socat"], "-V"])
        for line in text.splitlines():
            if "socat version" in line:
                return line.split("socat version", 1)[1].split(" on ")[0].strip()
        return None


class TrioRelay(System):
    name = "trio-relay"
    kind = "relay"
    description = "lean Trio relay (benchmarks/lean_relay.py), 2 hops, no SOCKS/WS (Trio ceiling)"

    def unavailable(self, ctx: Context) -> str | None:
        rc, _ = _run_text([str(ctx.project_python), "-c", "import trio"])
        return None if rc == 0 else f"trio not importable by {ctx.project_python}"

    def plan(self, ctx: Context, target_port: int) -> Plan:
        a, b = ctx.ports.get(), ctx.ports.get()
        py, script = str(ctx.project_python), str(HERE / "lean_relay.py")
        return Plan([
            Step("hop2", [py, script, "--listen", f"127.0.0.1:{b}",
                          "--target", f"127.0.0.1:{target_port}"], b),
            Step("hop1", [py, script, "--listen", f"127.0.0.1:{a}",
                          "--target", f"127.0.0.1:{b}"], a),
        ], a)

    def version(self, ctx: Context) -> str | None:
        rc, text = _run_text([str(ctx.project_python), "-c",
                              "import trio; print(trio.__version__)"])
        return f"trio {text}" if rc == 0 else None


ALL_SYSTEMS: list[System] = [TrisocksForward(), TrisocksWorkers(), TrisocksPolicy(),
                             TrisocksRedis(), TrisocksReverse(),
                             Pywssocks(), Linksocks(), Shadowsocks(), Microsocks(), Socat(),
                             TrioRelay()]
BY_NAME = {s.name: s for s in ALL_SYSTEMS}


def start(system: System, ctx: Context, group: str, target_port: int | None = None,
          timeout: float = 30.0) -> Running:
    """Start ``system`` fresh and return once it carries an HTTP request end to end.

    For relays ``target_port`` is where the last hop connects (nginx by default, the idle
    server for the idle-channel group); for SOCKS5 systems the probe goes to nginx.
    """
    target = target_port or ctx.nginx_port
    plan = system.plan(ctx, target)
    ctx.seq += 1
    procs: list[Proc] = []
    try:
        for step in plan.steps:
            log = ctx.logdir / f"{ctx.seq:03d}-{system.name}-{group}-{step.label}.log"
            procs.append(spawn(f"{system.name} {step.label}", step.argv, log, env=ctx.env()))
            if step.wait_port:
                wait_port(step.wait_port, procs, timeout)
        running = Running(system, procs, plan.entry_port,
                          dict(plan.info, commands=[s.argv for s in plan.steps]))
        wait_carries(running, ctx, target == ctx.nginx_port, timeout)
        return running
    except BaseException:
        for p in reversed(procs):
            stop(p)
        raise


def wait_carries(running: Running, ctx: Context, http_probe: bool, timeout: float) -> None:
    """Poll until one request goes through end to end (WebSocket up, provider attached)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        running.check_alive()
        try:
            if running.kind == "socks":
                measure.probe_socks_http(running.entry_port, ctx.nginx_port)
            elif http_probe:
                measure.probe_http(running.entry_port)
            else:
                wait_port(running.entry_port, running.procs, timeout)
            return
        except (OSError, measure.ProbeError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise StartError(f"{running.system.name} did not carry a request within {timeout:.0f}s: "
                     f"{last}\n" + "\n".join(p.log_tail(5) for p in running.procs))


# ---- nginx -------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
worker_rlimit_nofile 65536;
{user}
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        root {root};
        location = /upload {{
            # Reads and discards request bodies of any size, then answers 200.
            client_max_body_size 0;
            return 200 "ok\\n";
        }}
        location / {{ }}
    }}
}}
"""


def start_nginx(nginx: str, prefix: Path, root: Path, port: int, logdir: Path) -> Proc:
    prefix.mkdir(parents=True, exist_ok=True)
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, root=root, port=port, user=user))
    proc = spawn("nginx", [nginx, "-p", str(prefix), "-c", str(conf)], logdir / "nginx.log")
    try:
        wait_port(port, [proc], 20)
    except BaseException:
        stop(proc)
        raise
    return proc


def nginx_version(nginx: str) -> str | None:
    rc, text = _run_text([nginx, "-v"])
    return text.split("/", 1)[1].strip() if rc == 0 and "/" in text else None
