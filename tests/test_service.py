"""trisocks as a service (issue 16 items 2 and 3), against real processes.

- sd_notify: a server given a NOTIFY_SOCKET of the test's own says READY=1 only once its
  listeners accept (checked at the moment the datagram is read), STOPPING=1 on SIGTERM, and
  WATCHDOG=1 pings when WATCHDOG_USEC asks for them;
- graceful stop: SIGTERM during a 100 MiB download (forward without and with the management
  plane, and through a reverse SOCKS5 port) closes the listeners at once, lets the download
  finish intact and exits 0; a second signal stops at once; the grace period ends what is left;
- the client's exit status on SIGTERM (0) and SIGINT (130);
- ``trisocks health`` against a running server and a dead port;
- contrib/trisocks.service passes ``systemd-analyze verify``;
- contrib/install.sh, the install route of contrib/Dockerfile, builds the wheel of the sdist
  and installs it into a prefix with a state directory, and the installed command serves.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trisocks.net.notify import socket_address, watchdog_interval

from .api_support import KEY, start_api_server
from .support.payload import payload_sha256
from .support.peers import (
    HOST,
    start_trisocks_client,
    start_trisocks_provider,
    start_trisocks_reverse_server,
    start_trisocks_server,
)
from .support.procs import ManagedProcess, free_port, port_open
from .support.tools import clean_env, missing, require_tool, trisocks_cmd
from .test_install import _install_env, dists  # noqa: F401  (dists: the session's wheel build)

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
LISTENING = re.compile(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)")
API_LISTENING = re.compile(r"management API listening on http://127\.0\.0\.1:(\d+)")


# -- sd_notify ---------------------------------------------------------------------------------

class NotifySocket:
    """The service manager's end: a Unix datagram socket the server sends its state to."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.received: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def wait_for(self, line: str, proc: ManagedProcess, timeout: float = 30.0) -> list[str]:
        """Read datagrams until one holds ``line``; returns that datagram's lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.fail(f"no {line} on NOTIFY_SOCKET within {timeout:.0f} s; got {self.received}")
            self.sock.settimeout(min(left, 0.5))
            try:
                lines = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                if not proc.alive():
                    proc.fail(f"exited before {line} came on NOTIFY_SOCKET; got {self.received}")
                continue
            self.received += lines
            if line in lines:
                return lines


@pytest.fixture
def notify(tmp_path, request):
    address = (str(tmp_path / "notify.sock") if request.param == "path"
               else f"@trisocks-test-{secrets.token_hex(8)}")
    ns = NotifySocket(address)
    try:
        yield ns
    finally:
        ns.close()


def _server_argv(*extra: str) -> list[str]:
    return [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-t", "notify-token", *extra]


@pytest.mark.parametrize("notify", ["path", "abstract"], indirect=True)
@pytest.mark.parametrize("api", [False, True], ids=["plain", "api-bind"])
def test_ready_only_once_the_listeners_accept(procs, tmp_path, notify, api):
    extra = ("-k", KEY, "--db", str(tmp_path / "state.db"), "--api-bind", f"{HOST}:0") if api else ()
    proc = procs.start(_server_argv(*extra), name="trisocks-server",
                       env=clean_env({"NOTIFY_SOCKET": notify.address}))
    ready = notify.wait_for("READY=1", proc)
    # the moment READY=1 is read: the listening lines are out and every listener accepts
    assert notify.received == ready, f"something came before READY=1: {notify.received}"
    logs = proc.output()
    listening = LISTENING.search(logs)
    assert listening, f"READY=1 before the listening line:\n{logs}"
    ports = [int(listening.group(1))]
    if api:
        assert "management plane on" in logs, logs
        ports.append(int(API_LISTENING.search(logs).group(1)))
    for port in ports:
        with socket.create_connection((HOST, port), timeout=5):
            pass
    assert f"STATUS=listening on {HOST}:{ports[0]}" in " ".join(ready), ready

    proc.popen.send_signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING=1", proc)
    assert any(line.startswith("STATUS=stopping") for line in stopping), stopping
    assert proc.wait_exit(30) == 0, proc.describe()
    assert "WATCHDOG=1" not in notify.received  # not asked for


@pytest.mark.parametrize("notify", ["path"], indirect=True)
def test_watchdog_pings_when_asked(procs, notify):
    env = clean_env({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"})
    proc = procs.start(_server_argv(), name="trisocks-server", env=env)
    notify.wait_for("READY=1", proc)
    for _ in range(3):  # every 0.1 s: three in a row
        notify.wait_for("WATCHDOG=1", proc, timeout=10)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait_exit(30) == 0, proc.describe()


def test_notify_socket_and_watchdog_settings():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == b"\0abstract/name"
    assert socket_address("relative") is None and socket_address("@") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


def test_a_gone_notify_socket_does_not_matter(procs, tmp_path):
    env = clean_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "100000"})
    server = start_trisocks_server(procs, tokens=["t-gone"], env=env, debug=True)
    server.proc.wait_for_log("cannot notify the service manager")
    assert server.output().count("cannot notify the service manager") == 1
    server.proc.popen.send_signal(signal.SIGTERM)
    assert server.proc.wait_exit(30) == 0, server.proc.describe()


# -- graceful stop -----------------------------------------------------------------------------

def _download(tmp_path: Path, socks: str, url: str, rate: str) -> tuple[subprocess.Popen, Path]:
    """curl through ``socks`` into a file, at most ``rate`` bytes a second."""
    out = tmp_path / "download"
    argv = [require_tool("curl"), "--silent", "--show-error", "--fail", "--max-time", "300",
            "--socks5-hostname", socks, "--limit-rate", rate, "--output", str(out), url]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=clean_env()), out


def _wait_for_bytes(curl: subprocess.Popen, out: Path, size: int, proc: ManagedProcess) -> None:
    proc.wait_for(lambda: out.exists() and out.stat().st_size >= size or curl.poll() is not None,
                  f"the download to pass {size} bytes", timeout=60)
    assert curl.poll() is None, f"curl ended early: {curl.returncode} {curl.stderr.read()}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tunnel(procs, tmp_path, mode: str, grace: float):
    """A server (--grace) and the SOCKS5 address to download through; the ports that must
    close on SIGTERM."""
    token = f"grace-{secrets.token_hex(4)}"
    if mode == "reverse":
        server, socks_port = start_trisocks_reverse_server(procs, token, extra=["--grace", str(grace)])
        start_trisocks_provider(procs, server.url, token)
        server.proc.wait_for(lambda: port_open(HOST, socks_port), "the reverse SOCKS5 port to open")
        return server, f"{HOST}:{socks_port}", [server.port, socks_port]
    extra = ["--grace", str(grace)]
    if mode == "forward-api":
        server = start_api_server(procs, db=tmp_path / "state.db", tokens=[token], extra=extra,
                                  name="trisocks-server")
    else:
        server = start_trisocks_server(procs, tokens=[token], extra=extra)
    client = start_trisocks_client(procs, server.url, token)
    return server, client.socks, [server.port]


@pytest.mark.parametrize("mode", ["forward", "forward-api", "reverse"])
def test_sigterm_lets_a_100mib_download_finish(procs, tmp_path, payload_server, mode):
    grace = 30
    size = 100 * MiB
    server, socks, ports = _tunnel(procs, tmp_path, mode, grace)
    # 40 MB/s: about 2.6 s for the whole, so the signal surely comes mid-transfer
    curl, out = _download(tmp_path, socks, payload_server.url(f"/bytes/{size}"), "40M")
    _wait_for_bytes(curl, out, 8 * MiB, server.proc)
    signalled = time.monotonic()
    server.proc.popen.send_signal(signal.SIGTERM)
    server.proc.wait_for_log(rf"SIGTERM: stopping.*: no new connections, 1 session gets up to "
                             rf"{grace} s to finish")
    # no new connections: every listener is closed already (the line comes after that)
    for port in ports:
        assert not port_open(HOST, port), f"port {port} still accepts\n{server.proc.describe()}"
    assert curl.wait(120) == 0, f"curl failed: {curl.stderr.read()}\n{server.proc.describe()}"
    assert out.stat().st_size == size and _sha256(out) == payload_sha256(size)
    status = server.proc.wait_exit(grace + 15)
    took = time.monotonic() - signalled
    assert status == 0, server.proc.describe()
    assert took < grace, f"the server waited the whole grace period ({took:.1f} s)"
    logs = server.output()
    assert "stopped: every channel finished within" in logs, logs
    if mode == "forward-api":
        assert "stopping (counters are being saved)" in logs and "counters saved" in logs, logs
    assert "Traceback" not in logs


@pytest.mark.parametrize("how", ["second SIGTERM", "grace over, SIGINT"])
def test_a_second_signal_or_the_end_of_grace_stops_the_rest(procs, tmp_path, payload_server, how):
    grace = 120 if how == "second SIGTERM" else 1
    server, socks, _ = _tunnel(procs, tmp_path, "forward", grace)
    # 2 MB/s: 100 MiB would take almost a minute
    curl, out = _download(tmp_path, socks, payload_server.url(f"/bytes/{100 * MiB}"), "2M")
    _wait_for_bytes(curl, out, MiB, server.proc)
    first = signal.SIGTERM if how == "second SIGTERM" else signal.SIGINT
    server.proc.popen.send_signal(first)
    server.proc.wait_for_log(f"{first.name}: stopping: no new connections")
    started = time.monotonic()
    if how == "second SIGTERM":
        server.proc.popen.send_signal(signal.SIGTERM)
    assert server.proc.wait_exit(30) == 0, server.proc.describe()
    took = time.monotonic() - started
    assert took < 15, f"took {took:.1f} s to stop"
    logs = server.output()
    if how == "second SIGTERM":
        assert "SIGTERM during the grace period: stopping at once" in logs, logs
        assert "stopped: 1 channel still open was closed on a second signal" in logs, logs
    else:
        assert "stopped: 1 channel still open was closed after the grace period of 1 s" in logs, logs
    assert curl.wait(60) != 0, "the download was not cut"
    assert out.stat().st_size < 100 * MiB
    assert "Traceback" not in logs


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_client_exit_status_on_signals(procs, sig, status):
    server = start_trisocks_server(procs, tokens=["client-signals"])
    client = start_trisocks_client(procs, server.url, "client-signals")
    client.proc.popen.send_signal(sig)
    assert client.proc.wait_exit(30) == status, client.proc.describe()
    assert f"stopping ({sig.name}): closing the connections to the server" in client.output()


# -- trisocks health -----------------------------------------------------------------------------

def _health(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    proc = subprocess.run([*trisocks_cmd(), "health", *args], capture_output=True, text=True,
                          timeout=60, env=env or clean_env(), stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.splitlines()


def test_health_exit_status(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "state.db")
    port = server.port
    assert _health("-P", str(port)) == (0, [f"healthy: {HOST}:{port} accepts connections"])
    # the server's own variables say where, as in a container
    env = clean_env({"TRISOCKS_WS_HOST": "0.0.0.0", "TRISOCKS_WS_PORT": str(port)})
    assert _health(env=env) == (0, [f"healthy: {HOST}:{port} accepts connections"])
    status, lines = _health("--url", f"{server.http_url}/healthz")
    assert status == 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"healthy: {server.http_url}/healthz answered 200: ") and \
        '"status":"ok"' in lines[0]
    status, lines = _health("--url", f"{server.http_url}/no-such-page")
    assert status == 1 and len(lines) == 1 and " answered 404" in lines[0], lines

    dead = free_port()
    assert _health("-P", str(dead)) == (1, [f"unhealthy: {HOST}:{dead}: connection refused"])
    assert _health("--url", f"http://{HOST}:{dead}/healthz") == (
        1, [f"unhealthy: http://{HOST}:{dead}/healthz: connection refused"])
    assert _health("--url", "ftp://example.com/")[0] == 2

    server.proc.popen.send_signal(signal.SIGTERM)
    assert server.proc.wait_exit(30) == 0
    assert _health("-P", str(port))[0] == 1


def test_health_over_https_leaves_no_error_in_the_log(procs, tmp_path):
    """The API over the server's own TLS, closed by the server after each answer: no
    'Error in ASGI Framework' (closing once read from a TLS stream another task was reading)."""
    trustme = pytest.importorskip("trustme")
    cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    server = start_api_server(procs, db=tmp_path / "tls.db", extra=["--tls-cert", str(cert)])
    for _ in range(10):
        status, lines = _health("--insecure", "--url", f"https://{HOST}:{server.port}/healthz")
        assert status == 0, lines
    assert "Error in ASGI" not in server.output() and "Traceback" not in server.output()


# -- the systemd unit ----------------------------------------------------------------------------

UNIT = ROOT / "contrib" / "trisocks.service"
INSTALLED = "/opt/trisocks/bin/trisocks"


def _verify(unit: Path) -> tuple[int, list[str]]:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(exe, os.X_OK):
        missing("systemd-analyze is not installed (apt-get install systemd)")
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**clean_env(), "SYSTEMD_LOG_COLOR": "0"})
    # other units of this machine may get remarks of their own: only ours count
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    return proc.returncode, ours


def test_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} server\n" in text
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    for key, value in (("Type", "notify"), ("DynamicUser", "yes"), ("StateDirectory", "trisocks"),
                       ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
                       ("Restart", "on-failure"), ("RestartPreventExitStatus", "2"),
                       ("EnvironmentFile", "/etc/trisocks/trisocks.env")):
        assert settings.get(key) == value, (key, settings.get(key))
    assert "Environment=TRISOCKS_DB=%S/trisocks/trisocks.db" in text  # in the StateDirectory
    assert int(settings["LimitNOFILE"]) >= 65536 and int(settings["WatchdogSec"]) > 0
    grace = int(re.search(r"TRISOCKS_GRACE=(\d+)", text).group(1))
    assert int(settings["TimeoutStopSec"]) > grace + 10  # the grace, then up to 10 s of saving
    assert "API_KEY=" not in text.replace("TRISOCKS_API_KEY (", "")  # no secret in the unit

    # verify needs the ExecStart program to exist: this virtualenv's trisocks stands in for it
    unit = tmp_path / "trisocks.service"
    unit.write_text(text.replace(INSTALLED, " ".join(trisocks_cmd())))
    status, remarks = _verify(unit)
    assert status == 0 and not remarks, remarks
    # and verify does see a mistake in it
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHoem=yes"))
    assert _verify(unit)[1], "systemd-analyze verify did not object to an unknown setting"


# -- contrib/install.sh (the Dockerfile's install route) -----------------------------------------

INSTALL_SH = ROOT / "contrib" / "install.sh"


def _sh(*args, env: dict[str, str], cwd: Path, expect: int = 0) -> str:
    proc = subprocess.run(["sh", str(INSTALL_SH), *map(str, args)], env=env, cwd=cwd, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert proc.returncode == expect, (f"install.sh {' '.join(map(str, args))}: {proc.returncode}"
                                       f"\n{proc.stdout}")
    return proc.stdout


def test_dockerfile_runs_install_sh():
    docker = (ROOT / "contrib" / "Dockerfile").read_text()
    assert "RUN sh /src/contrib/install.sh --wheel-only /dist /src" in docker
    assert re.search(r"trisocks-install --prefix /opt/trisocks --user trisocks\s*\\\s*"
                     r"--state-dir /var/lib/trisocks /dist/trisocks-\*\.whl", docker)
    assert "USER trisocks" in docker and "VOLUME /var/lib/trisocks" in docker
    assert 'CMD ["trisocks", "health"]' in docker


def test_install_sh_builds_installs_and_serves(dists, tmp_path, procs):  # noqa: F811
    env = _install_env(PYTHON=sys.executable)
    # the image's build stage: the wheel of the sources (here the sdist), compiled
    built = tmp_path / "wheel"
    out = _sh("--find-links", dists.wheelhouse, "--wheel-only", built, dists.sdist, env=env, cwd=tmp_path)
    wheels = list(built.glob("trisocks-*.whl"))
    assert len(wheels) == 1 and not wheels[0].name.endswith("-none-any.whl"), out

    # the image's run stage: into a prefix, the user (this one: it exists), the state directory
    prefix, state = tmp_path / "opt", tmp_path / "state"
    me = getpass.getuser()
    out = _sh("--prefix", prefix, "--user", me, "--state-dir", state, "--find-links",
              dists.wheelhouse, wheels[0], env=env, cwd=tmp_path)
    assert f"installed {prefix}/bin/trisocks: trisocks" in out and "(compiled hot path)" in out, out
    assert f"user {me} exists" in out and state.is_dir() and (state.stat().st_mode & 0o777) == 0o700

    # the installed command serves, answers `trisocks health` and stops with 0 on SIGTERM
    trisocks = prefix / "bin" / "trisocks"
    server = procs.start([trisocks, "server", "-H", HOST, "-P", "0", "-t", "installed-token",
                          "--db", state / "trisocks.db"], name="trisocks-installed",
                         env=_install_env(), cwd=tmp_path)
    port = int(server.wait_for_log(LISTENING).group(1))
    health = subprocess.run([trisocks, "health", "-P", str(port)], capture_output=True, text=True,
                            env=_install_env(), cwd=tmp_path, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.describe()

    # a user that does not exist is made a system user (useradd and chown stand-ins record it)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    record = tmp_path / "record"
    for tool in ("useradd", "chown"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{record}"\n')
        (stubs / tool).chmod(0o755)
    name = f"trisocks-test-{secrets.token_hex(3)}"
    args = ("--prefix", prefix, "--user", name, "--state-dir", state, "--find-links",
            dists.wheelhouse, wheels[0])
    stubbed = {**env, "PATH": f"{stubs}:{env['PATH']}"}
    if os.geteuid() != 0:
        out = _sh(*args, env=stubbed, cwd=tmp_path, expect=2)
        assert f"creating the user {name} needs root (or give --no-user)" in out, out
        assert not record.exists()
        return
    _sh(*args, env=stubbed, cwd=tmp_path)
    calls = record.read_text().splitlines()
    assert calls[0].startswith("useradd --system --user-group --home-dir " + str(state)) and \
        calls[0].endswith(f"--comment trisocks server {name}"), calls
    assert calls[1] == f"chown {name}: {state}", calls
