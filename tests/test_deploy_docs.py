"""docs/deploy.md's commands run as written (issue 16 item 7, acceptance).

**Which blocks.** A fenced block right after a line ``<!-- test: NAME -->`` in docs/deploy.md
is run here; the others (certbot, pip into /opt, docker, sysctl --system...) change the machine
or need what is not here. Every NAME is run by exactly one test below, and
:func:`test_the_marked_blocks_are_the_ones_this_file_runs` fails when the doc and this file
disagree (a block marked but not run, or run but no longer marked).

**How they run.** ``sh`` blocks go to ``bash`` with ``set -eu`` (a failing line fails the test;
a pipeline's status is its last command's, as in the shell a person pastes into), from the
repository's root, with ``PATH`` starting with a directory of stand-ins:
``sudo`` (runs the command as the test's own user), ``systemctl`` and ``journalctl`` (both talk
to :class:`FakeSystemd`), then the virtualenv's ``bin`` (``trisocks``). The text is changed
in these ways only (:meth:`Scene.localize`):

* ``/etc/``, ``/var/`` and ``/run/`` move under a scratch root; ``/opt/trisocks/bin/`` is the
  virtualenv's ``bin``;
* ``127.0.0.1:8765`` and ``tunnel.example.com:443`` become the test server's address (a free
  port; binding 8765 or 443 on a shared machine is not an option), and the environment file
  gets the test's own lines after the doc's: that address, and users allowed to reach the
  test's payload server on loopback;
* the placeholders a test names where it runs the block: the backup file name of the restore
  is the name the test gave the backup; the proxy's address in ``TRISOCKS_TRUSTED_PROXY`` is
  the one nginx connects from here (127.0.0.3, with ``proxy_bind``, so that it differs from
  the client's 127.0.0.1);
* ``env-file`` and ``proxy-env`` are lines of the environment file (the API key's hash
  ``scrypt:...`` replaced by a real one); ``nginx-site`` goes into an nginx.conf of the test's
  own (``listen 443 ssl`` on a free port of 127.0.0.1), and nginx runs it.

**FakeSystemd** runs ``contrib/trisocks.service`` as systemd does, for what the doc relies on:
``Environment=`` (``%S``, ``%L``, ``%d``), ``EnvironmentFile=`` (whole-line comments only: an
inline ``# ...`` stays in the value, as with systemd), ``ExecStart=``, ``ExecReload=``
(``$MAINPID``), ``LoadCredential=`` (copied at each start), ``StateDirectory=`` and
``LogsDirectory=`` (with ``DynamicUser=yes``: under ``private/`` with a link), ``LimitNOFILE=``
(prlimit), ``Type=notify`` (start returns at ``READY=1``), ``KillSignal=SIGTERM`` and
``TimeoutStopSec=``; drop-ins from ``/etc/systemd/system/trisocks.service.d/*.conf`` in name
order, read only at ``daemon-reload`` (a doc that forgot it would fail here). Users,
capabilities and the sandboxing settings are not emulated; ``systemd-analyze verify`` checks
the unit with the drop-ins the blocks wrote. ``systemctl reload`` returns once the server has
logged its answer to the signal (a person typing the next command gives it that moment).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from trisocks.management.keys import hash_key
from trisocks.management.store import SCHEMA_VERSION

from .api_support import KEY, http
from .support.curl import curl
from .support.nginx import start_nginx
from .support.peers import start_trisocks_client
from .support.procs import POLL, free_port, port_open
from .support.tools import clean_env, missing, require_tool

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
UNIT = ROOT / "contrib" / "trisocks.service"
OLD_DB = ROOT / "tests" / "data" / "trisocks-0.1.0.db"
BIN = Path(sys.executable).parent
MARK = re.compile(r"^<!-- test: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.M | re.S)
NGINX_FROM = "127.0.0.3"  # the address nginx connects to trisocks from (proxy_bind)

# every marked block, and the test that runs it
RUN_BY = {
    "version": "test_version_exit_codes_and_kernel_settings",
    "exit-codes": "test_version_exit_codes_and_kernel_settings",
    "kernel-show": "test_version_exit_codes_and_kernel_settings",
    "env-file": "Scene.write_env_file",  # every test that starts the service
    "proxy-env": "test_behind_nginx_the_client_address_is_the_real_one",
    "nginx-site": "test_behind_nginx_the_client_address_is_the_real_one",
    "proxy-check": "test_behind_nginx_the_client_address_is_the_real_one",
    "tls-dropin": "test_tls_from_credentials_and_renewal_needs_the_restart_the_hook_does",
    "renew-hook": "test_tls_from_credentials_and_renewal_needs_the_restart_the_hook_does",
    "tls-check": "test_tls_from_credentials_and_renewal_needs_the_restart_the_hook_does",
    "db-perms": "test_database_permissions_backup_and_restore",
    "backup": "test_database_permissions_backup_and_restore",
    "backup-cron": "test_database_permissions_backup_and_restore",
    "restore": "test_database_permissions_backup_and_restore",
    "upgrade-backup": "test_upgrade_from_a_0_1_0_database",
    "upgrade-restart": "test_upgrade_from_a_0_1_0_database",
    "reload": "test_reload_access_log_and_file_limits",
    "logs-dropin": "test_reload_access_log_and_file_limits",
    "fd-dropin": "test_reload_access_log_and_file_limits",
    "fd-check": "test_reload_access_log_and_file_limits",
}


def doc_blocks() -> dict[str, tuple[str, str]]:
    """NAME -> (language, text) of every marked block."""
    found: dict[str, tuple[str, str]] = {}
    for match in MARK.finditer(DOC.read_text()):
        name, lang, text = match.groups()
        assert name not in found, f"docs/deploy.md marks two blocks {name!r}"
        found[name] = (lang, text)
    return found


def test_the_marked_blocks_are_the_ones_this_file_runs():
    text = DOC.read_text()
    marks = re.findall(r"<!-- test: ([\w-]+) -->", text)
    blocks = doc_blocks()
    assert len(marks) == len(blocks), "a '<!-- test: NAME -->' line not right before a fenced block"
    assert sorted(blocks) == sorted(RUN_BY), "docs/deploy.md and RUN_BY name different blocks"
    for name, runner in RUN_BY.items():  # and the test named runs that block
        owner, _, method = runner.partition(".")
        code = inspect.getsource(getattr(globals()[owner], method) if method else globals()[owner])
        assert f'"{name}"' in code, f"{runner} does not run the block {name!r}"
    langs = {name: lang for name, (lang, _) in blocks.items()}
    assert langs["nginx-site"] == "nginx"
    assert {lang for name, lang in langs.items() if name != "nginx-site"} == {"sh"}


# -- the stand-ins for systemd ---------------------------------------------------------------


PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"


def nofile_we_may_set(wanted: int) -> int:
    """LimitNOFILE as systemd (which may raise hard limits) sets it, or, where this process may
    not raise its hard limit (no CAP_SYS_RESOURCE, as in many containers), that hard limit."""
    import resource

    tried = subprocess.run([PRLIMIT, f"--nofile={wanted}:{wanted}", "--", "true"],
                           capture_output=True, timeout=30)
    return wanted if tried.returncode == 0 else min(wanted, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


class FakeSystemd:
    """``contrib/trisocks.service`` under a scratch root, run as systemd would run it."""

    name = "trisocks.service"

    def __init__(self, root: Path, procs) -> None:
        self.root = root
        self.procs = procs
        self.unit_dir = root / "etc" / "systemd" / "system"
        self.unit_dir.mkdir(parents=True)
        shutil.copy(UNIT, self.unit_dir / self.name)
        self.service = None  # the ManagedProcess while it runs
        self.runs: list = []  # every ManagedProcess it started, for journalctl
        self.exit_statuses: list[int | None] = []
        self.nofile: int | None = None  # the LimitNOFILE it applied
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_name = f"trisocks-test-{uuid.uuid4().hex[:12]}"
        self.notify.bind("\0" + self.notify_name)
        self.daemon_reload()

    # what systemd reads
    def daemon_reload(self) -> None:
        files = [self.unit_dir / self.name,
                 *sorted((self.unit_dir / f"{self.name}.d").glob("*.conf"))]
        lists = ("Environment", "EnvironmentFile", "LoadCredential", "ExecStart", "ExecReload")
        cfg: dict = {key: [] for key in lists}
        for path in files:
            section = None
            for raw in path.read_text().splitlines():
                line = raw.strip()
                if not line or line[0] in "#;":
                    continue
                if line.startswith("["):
                    section = line
                    continue
                if section != "[Service]" or "=" not in line:
                    continue
                key, value = (part.strip() for part in line.split("=", 1))
                if key in lists:
                    if value:
                        cfg[key].append(value)
                    else:
                        cfg[key] = []  # an empty assignment resets the list
                else:
                    cfg[key] = value
        self.cfg = cfg

    def local(self, path: str) -> Path:
        if path == "/opt/trisocks/bin/trisocks":
            return BIN / "trisocks"
        return self.root / path.lstrip("/") if path.startswith(("/etc/", "/var/", "/run/")) else Path(path)

    @property
    def credentials(self) -> Path:
        return self.root / "run" / "credentials" / self.name

    def specifiers(self, text: str) -> str:
        return (text.replace("%S", str(self.root / "var" / "lib"))
                .replace("%L", str(self.root / "var" / "log"))
                .replace("%d", str(self.credentials)))

    def _directory(self, base: str, name: str, mode: int) -> None:
        top = self.root / "var" / base
        if self.cfg.get("DynamicUser") == "yes":
            private = top / "private"
            private.mkdir(parents=True, exist_ok=True)
            private.chmod(0o700)
            (private / name).mkdir(exist_ok=True)
            (private / name).chmod(mode)
            link = top / name
            if not link.is_symlink():
                link.symlink_to(Path("private") / name)
        else:
            (top / name).mkdir(parents=True, exist_ok=True)
            (top / name).chmod(mode)

    def environment(self) -> dict[str, str]:
        env = clean_env()
        for line in self.cfg["Environment"]:
            for assignment in shlex.split(line):
                key, _, value = assignment.partition("=")
                env[key] = self.specifiers(value)
        for spec in self.cfg["EnvironmentFile"]:
            optional = spec.startswith("-")
            path = self.local(spec.lstrip("-"))
            if not path.exists():
                if optional:
                    continue
                raise FileNotFoundError(f"EnvironmentFile {spec}: no such file")
            for raw in path.read_text().splitlines():
                line = raw.strip()
                if not line or line[0] in "#;" or "=" not in line:
                    continue
                key, _, value = line.partition("=")
                value = value.strip()  # an inline '# ...' stays in the value, as with systemd
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                env[key.strip()] = value
        return env

    # systemctl
    def start(self) -> tuple[int, str]:
        if self.service is not None and self.service.alive():
            return 0, ""
        cfg = self.cfg
        if cfg.get("StateDirectory"):
            self._directory("lib", cfg["StateDirectory"], int(cfg.get("StateDirectoryMode", "0755"), 8))
        if cfg.get("LogsDirectory"):
            self._directory("log", cfg["LogsDirectory"], int(cfg.get("LogsDirectoryMode", "0755"), 8))
        shutil.rmtree(self.credentials, ignore_errors=True)
        for spec in cfg["LoadCredential"]:
            ident, _, source = spec.partition(":")
            self.credentials.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = self.credentials / ident
            try:
                shutil.copyfile(self.local(source), target)
            except OSError as exc:
                return 1, f"{self.name}: LoadCredential={spec}: {exc} (status=243/CREDENTIALS)\n"
            target.chmod(0o400)
        env = self.environment()
        env["NOTIFY_SOCKET"] = "@" + self.notify_name
        if self.credentials.exists():
            env["CREDENTIALS_DIRECTORY"] = str(self.credentials)
        argv = shlex.split(cfg["ExecStart"][-1])
        argv[0] = str(self.local(argv[0]))
        if cfg.get("LimitNOFILE"):
            self.nofile = nofile_we_may_set(int(cfg["LimitNOFILE"]))
            argv = [PRLIMIT, f"--nofile={self.nofile}:{self.nofile}", "--", *argv]
        self.notify.setblocking(False)
        try:
            while self.notify.recv(4096):
                pass  # what an earlier run said
        except BlockingIOError:
            pass
        self.service = self.procs.start(argv, name="trisocks-service", env=env)
        self.runs.append(self.service)
        deadline = time.monotonic() + 30
        self.notify.settimeout(POLL)
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return 0, ""
            except TimeoutError:
                pass
            if not self.service.alive():
                self.exit_statuses.append(self.service.returncode)
                return 1, (f"Job for {self.name} failed because the control process exited with "
                           f"error code (status {self.service.returncode}).\n")
        return 1, f"Job for {self.name} timed out waiting for READY=1.\n"

    def stop(self) -> tuple[int, str]:
        if self.service is not None and self.service.alive():
            timeout = float(self.cfg.get("TimeoutStopSec", "90"))
            self.exit_statuses.append(self.service.terminate(timeout))
        self.service = None
        return 0, ""

    def reload(self) -> tuple[int, str]:
        if self.service is None or not self.service.alive():
            return 1, f"{self.name} is not active, cannot reload.\n"
        said = len(self.service.output())
        status = 0
        for command in self.cfg["ExecReload"]:
            argv = [a.replace("${MAINPID}", str(self.service.pid)).replace("$MAINPID", str(self.service.pid))
                    for a in shlex.split(command)]
            status = subprocess.run(argv, timeout=30).returncode or status
        deadline = time.monotonic() + 10
        while len(self.service.output()) == said and time.monotonic() < deadline:
            time.sleep(POLL)
        return status, ""

    def journal(self) -> list[str]:
        lines = []
        for run in self.runs:
            lines += run.output().splitlines()
        return lines

    def handle(self, argv: list[str]) -> tuple[int, str, str]:
        tool, args = Path(argv[0]).name, argv[1:]
        if tool == "journalctl":
            if "-f" in args or "--follow" in args:
                return 1, "", "journalctl -f: not in a test\n"
            assert "-u" in args and args[args.index("-u") + 1] in ("trisocks", self.name), args
            lines = self.journal()
            if "-n" in args:
                lines = lines[-int(args[args.index("-n") + 1]):]
            return 0, "".join(f"{line}\n" for line in lines), ""
        verb = args[0]
        units = [a for a in args[1:] if not a.startswith("-") and a not in ("MainPID",)]
        if verb == "daemon-reload":
            self.daemon_reload()
            return 0, "", ""
        if units not in (["trisocks"], [self.name]):
            return 1, "", f"systemctl {' '.join(args)}: only the trisocks unit is here\n"
        if verb == "show":
            pid = self.service.pid if self.service is not None and self.service.alive() else 0
            return 0, f"{pid}\n" if "--value" in args else f"MainPID={pid}\n", ""
        if verb == "is-active":
            running = self.service is not None and self.service.alive()
            return (0, "active\n", "") if running else (3, "inactive\n", "")
        actions = {"start": self.start, "stop": self.stop, "reload": self.reload}
        if verb == "restart":
            self.stop()
            status, err = self.start()
        elif verb in actions:
            status, err = actions[verb]()
        else:
            return 1, "", f"systemctl {verb}: not emulated\n"
        return status, "", err

    def close(self) -> None:
        self.notify.close()


SHIM = """#!{python}
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["FAKE_SYSTEMD_SOCKET"])
s.sendall(json.dumps(sys.argv).encode() + b"\\n")
reply = b""
while chunk := s.recv(65536):
    reply += chunk
answer = json.loads(reply)
sys.stdout.write(answer["stdout"])
sys.stderr.write(answer["stderr"])
sys.exit(answer["status"])
"""


class Scene:
    """A scratch root, the stand-ins on PATH, FakeSystemd, and the doc's blocks to run."""

    def __init__(self, tmp_path: Path, procs) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.procs = procs
        self.port = free_port()
        self.systemd = FakeSystemd(self.root, procs)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for tool in ("systemctl", "journalctl"):
            (self.bin / tool).write_text(SHIM.format(python=sys.executable))
            (self.bin / tool).chmod(0o755)
        (self.bin / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (self.bin / "sudo").chmod(0o755)
        self.sock_path = tmp_path / "systemd.sock"
        systemd = self.systemd

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                argv = json.loads(self.rfile.readline())
                try:
                    status, out, err = systemd.handle(argv)
                except Exception as exc:  # the stand-in's own failure: say it, fail the block
                    status, out, err = 1, "", f"FakeSystemd: {exc!r}\n"
                self.wfile.write(json.dumps({"status": status, "stdout": out, "stderr": err}).encode())

        self.server = socketserver.UnixStreamServer(str(self.sock_path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.blocks = doc_blocks()
        self.env_file = self.root / "etc" / "trisocks" / "trisocks.env"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.systemd.stop()
        self.systemd.close()

    # the doc's text, moved to this machine
    def localize(self, text: str, subs: dict[str, str] | None = None) -> str:
        for old, new in (subs or {}).items():
            assert old in text, f"placeholder {old!r} not in the block"
            text = text.replace(old, new)
        text = text.replace("/opt/trisocks/bin/", f"{BIN}/")
        text = re.sub(r"(?<![\w.~-])/(etc|var|run)/", lambda m: f"{self.root}/{m[1]}/", text)
        text = text.replace("tunnel.example.com:443", f"127.0.0.1:{self.port}")
        return text.replace("127.0.0.1:8765", f"127.0.0.1:{self.port}")

    def block(self, name: str, subs: dict[str, str] | None = None) -> str:
        return self.localize(self.blocks[name][1], subs)

    @property
    def env(self) -> dict[str, str]:
        return clean_env({"PATH": f"{self.bin}:{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                          "FAKE_SYSTEMD_SOCKET": str(self.sock_path), "KEY": KEY})

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", "set -eu\n" + script], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, (f"exit {done.returncode}\n--- script ---\n{script}\n"
                                          f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}")
        return done

    def run(self, name: str, subs: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.sh(self.block(name, subs))

    def write_env_file(self, *extra_blocks: str, subs: dict[str, str] | None = None,
                       lines: tuple[str, ...] = ()) -> None:
        """The environment file: the doc's env-file block (with a real hash of KEY), blocks
        of the doc given by name, then this test's own lines (address and port)."""
        text = self.block("env-file", {"scrypt:...": hash_key(KEY, "scrypt")})
        for name in extra_blocks:
            text += self.block(name, subs)
        text += "".join(f"{line}\n" for line in
                        ("TRISOCKS_WS_HOST=127.0.0.1", f"TRISOCKS_WS_PORT={self.port}",
                         # users may reach the test's payload server on loopback
                         "TRISOCKS_RULES=deny own; allow loopback", *lines))
        self.env_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.env_file.write_text(text)
        self.env_file.chmod(0o600)

    def systemctl(self, verb: str) -> None:
        """What the test itself asks of the unit (the doc's blocks go through the stand-in)."""
        args = (verb, "trisocks")
        status, out, err = self.systemd.handle(["systemctl", *args])
        assert status == 0, f"systemctl {' '.join(args)}: {status} {out}{err}\n" + "\n".join(
            self.systemd.journal()[-30:])

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def verify(self) -> None:
        """systemd-analyze verify: the unit with the drop-ins the blocks wrote."""
        exe = shutil.which("systemd-analyze")
        if exe is None:
            missing("systemd-analyze is not installed (apt-get install systemd)")
        where = self.tmp / "verify"
        where.mkdir(exist_ok=True)
        unit = where / FakeSystemd.name
        unit.write_text(UNIT.read_text().replace("/opt/trisocks/bin/trisocks", str(BIN / "trisocks")))
        shutil.rmtree(where / f"{unit.name}.d", ignore_errors=True)
        shutil.copytree(self.systemd.unit_dir / f"{unit.name}.d", where / f"{unit.name}.d")
        done = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                              env={**clean_env(), "SYSTEMD_LOG_COLOR": "0"})
        ours = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
        assert done.returncode == 0 and not ours, ours


@pytest.fixture
def scene(tmp_path, procs):
    made = Scene(tmp_path, procs)
    try:
        yield made
    finally:
        made.close()


def wait_until(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)
    return result


def make_cert(directory: Path, org: str, days: int) -> str:
    """A self-signed certificate for tunnel.example.com, localhost and 127.0.0.1 as certbot
    lays it out; returns its notAfter line."""
    require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                    "-subj", f"/CN=tunnel.example.com/O={org}", "-addext",
                    "subjectAltName=DNS:tunnel.example.com,DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(directory / "privkey.pem"), "-out", str(directory / "fullchain.pem")],
                   check=True, capture_output=True, timeout=60)
    return subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(directory / "fullchain.pem")],
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def traffic(procs, scene: Scene, payload_server, key: str, url: str | None = None, **kw) -> None:
    client = start_trisocks_client(procs, url or f"ws://127.0.0.1:{scene.port}", key, **kw)
    curl(payload_server.url("/bytes/100000"), socks=client.socks).check(200)
    client.proc.terminate()


# -- the tests ---------------------------------------------------------------------------------


def test_version_exit_codes_and_kernel_settings(scene):
    version = scene.run("version")
    assert re.fullmatch(r"trisocks \d+\.\d+\.\d+\S* \((compiled|pure) hot path\)\n", version.stdout)
    codes = scene.run("exit-codes")
    assert codes.stdout == "exit status 2\n"
    assert codes.stderr == "trisocks: error: --grace must be 0 or more seconds\n"
    kernel = scene.run("kernel-show")
    for setting in ("net.core.somaxconn", "net.ipv4.ip_local_port_range", "fs.nr_open"):
        assert re.search(rf"^{re.escape(setting)} = \d", kernel.stdout, re.M), kernel.stdout


def test_behind_nginx_the_client_address_is_the_real_one(scene, procs, payload_server):
    require_tool("nginx")  # before the server starts: without nginx the test fails or skips at once
    subs = {"TRISOCKS_TRUSTED_PROXY=127.0.0.1": f"TRISOCKS_TRUSTED_PROXY={NGINX_FROM}"}
    scene.write_env_file("proxy-env", subs=subs)
    scene.systemctl("start")
    user = http("POST", f"{scene.api}/api/users", json={"name": "behind-nginx"}).json()

    live = scene.root / "etc" / "letsencrypt" / "live" / "tunnel.example.com"
    make_cert(live, "proxy", 30)
    nginx_port = free_port()
    site = scene.block("nginx-site").replace("listen 443 ssl;", f"listen 127.0.0.1:{nginx_port} ssl;")
    # the test's own: nginx connects to trisocks from another address than the client's
    start_nginx(procs, scene.tmp / "nginx", site, nginx_port, extra=f"    proxy_bind {NGINX_FROM};")

    # a real tunnel through nginx: TLS at nginx, the WebSocket upgrade, then trisocks
    client = start_trisocks_client(procs, f"wss://127.0.0.1:{nginx_port}", user["key"],
                                   extra=["--ca-file", str(live / "fullchain.pem")])
    curl(payload_server.url("/bytes/300000"), socks=client.socks).check(200)

    check = scene.run("proxy-check")
    events = [e for e in json.loads(check.stdout)["events"] if e["user"] == "behind-nginx"]
    assert events, check.stdout
    # the client, and the proxy it came through
    assert re.fullmatch(rf"127\.0\.0\.1 \(via {re.escape(NGINX_FROM)}:\d+\)", events[-1]["peer"]), events

    # and without TRISOCKS_TRUSTED_PROXY, the same client is nginx's address: the setting is
    # what makes the difference (the client reconnects by itself after the restart)
    scene.write_env_file()
    scene.systemctl("restart")

    def seen_from_nginx():
        got = http("GET", f"{scene.api}/api/events",
                   params={"type": "auth_success", "user": "behind-nginx"}).json()["events"]
        return [e for e in got if re.fullmatch(rf"{re.escape(NGINX_FROM)}:\d+", e["peer"])]

    wait_until(seen_from_nginx, "the client back, seen from nginx's address")
    curl(payload_server.url("/bytes/1000"), socks=client.socks).check(200)


def test_tls_from_credentials_and_renewal_needs_the_restart_the_hook_does(scene):
    live = scene.root / "etc" / "letsencrypt" / "live" / "tunnel.example.com"
    first = make_cert(live, "first", 30)
    scene.write_env_file()
    scene.run("tls-dropin")  # the drop-in, daemon-reload, restart: TLS from the credentials
    scene.verify()
    served = scene.run("tls-check").stdout
    assert "O = first" in served and first in served, served
    assert scene.systemd.credentials.joinpath("tls-cert").stat().st_mode & 0o777 == 0o400

    # certbot renews: new files, same names. The running server still serves the old one ...
    second = make_cert(live, "second", 90)
    assert second != first
    served = scene.run("tls-check").stdout
    assert "O = first" in served and first in served, served

    # ... until the deploy hook restarts it
    scene.run("renew-hook")
    hook = scene.root / "etc" / "letsencrypt" / "renewal-hooks" / "deploy" / "trisocks"
    assert hook.stat().st_mode & 0o777 == 0o755
    scene.sh(str(hook))
    served = scene.run("tls-check").stdout
    assert "O = second" in served and second in served, served


def test_database_permissions_backup_and_restore(scene, procs, payload_server):
    scene.write_env_file()
    scene.systemctl("start")
    alice = http("POST", f"{scene.api}/api/users", json={"name": "alice", "limit_bytes": 1 << 30}).json()
    traffic(procs, scene, payload_server, alice["key"])
    state = scene.root / "var" / "lib" / "private" / "trisocks"

    perms = scene.run("db-perms").stdout.splitlines()
    modes = {line.split()[-1].rsplit("/", 1)[-1]: line.split()[0] for line in perms}
    assert modes == {"trisocks": "drwx------", "trisocks.db": "-rw-------",
                     "trisocks.db-shm": "-rw-------", "trisocks.db-wal": "-rw-------",
                     "trisocks.db.lock": "-rw-------"}, perms

    # the counters reach the file within a second: wait for them, as a nightly backup would
    def stored():
        done = subprocess.run([BIN / "trisocks", "backup", "--db", state / "trisocks.db",
                               scene.tmp / "probe.db", "--force"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        import sqlite3

        conn = sqlite3.connect(scene.tmp / "probe.db")
        try:
            return conn.execute("SELECT bytes_down FROM users WHERE name = 'alice'").fetchone()[0] > 0
        finally:
            conn.close()

    wait_until(stored, "alice's counters in the database")
    before = http("GET", f"{scene.api}/api/users/{alice['key']}").json()

    made = scene.run("backup").stdout.strip()
    match = re.fullmatch(r"backed up (\S+) to (\S+/trisocks-\d{8}-\d{6}\.db): schema (\d+), "
                         r"1 user\(s\), 0 token\(s\), \d+ event\(s\), \d+ KiB", made)
    assert match, made
    assert match[1] == f"{scene.root}/var/lib/trisocks/trisocks.db"
    assert int(match[3]) == SCHEMA_VERSION
    backups = scene.root / "var" / "backups" / "trisocks"
    assert backups.stat().st_mode & 0o777 == 0o700
    # the restore block names its backup trisocks-20250601-031500.db: this one gets that name
    named = backups / "trisocks-20250601-031500.db"
    Path(match[2]).rename(named)
    assert named.stat().st_mode & 0o777 == 0o600

    cron = scene.block("backup-cron").splitlines()
    line = next(entry for entry in cron if entry and not entry.startswith("#"))
    fields = line.split(None, 6)
    assert fields[5] == "root" and len(fields[:5]) == 5
    scene.sh(fields[6])
    assert len(list(backups.glob("trisocks-*.db"))) == 2

    # what changes after the backup is undone by the restore
    http("POST", f"{scene.api}/api/users", json={"name": "after-the-backup"})
    http("PATCH", f"{scene.api}/api/users/{alice['key']}", json={"status": "disabled"})

    restored = scene.run("restore")
    assert restored.stdout.startswith("healthy: "), restored.stdout
    users = {u["name"]: u for u in http("GET", f"{scene.api}/api/users").json()["users"]}
    assert sorted(users) == ["alice"]
    for k in ("key", "status", "bytes_up", "bytes_down", "total_connections", "limit_bytes"):
        assert users["alice"][k] == before[k], k
    assert users["alice"]["status"] == "active"
    kept = list(state.glob("before-restore-*/trisocks.db"))
    assert len(kept) == 1  # the database as it was, moved aside whole
    assert (state / "trisocks.db").stat().st_mode & 0o777 == 0o600
    traffic(procs, scene, payload_server, alice["key"])  # the restored key works


def test_upgrade_from_a_0_1_0_database(scene):
    manifest = json.loads(OLD_DB.with_suffix(".json").read_text())
    state = scene.root / "var" / "lib" / "private" / "trisocks"
    state.mkdir(parents=True, mode=0o700)
    (scene.root / "var" / "lib" / "trisocks").symlink_to(Path("private") / "trisocks")
    shutil.copy(OLD_DB, state / "trisocks.db")  # what trisocks 0.1.0 left there
    (state / "trisocks.db").chmod(0o600)
    scene.write_env_file(lines=("TRISOCKS_TOKEN=old-cli-token-0001,old-cli-token-0002",))

    saved = scene.run("upgrade-backup").stdout
    assert ": schema 1, 3 user(s), 5 token(s), 10 event(s), " in saved, saved
    migrated = scene.run("upgrade-restart").stdout
    assert "database: tokens.policy added (schema 3)" in migrated, migrated

    users = {u["key"]: u for u in http("GET", f"{scene.api}/api/users").json()["users"]}
    for old in manifest["users"]:
        for k in ("name", "bytes_up", "bytes_down", "total_connections", "status"):
            assert users[old["key"]][k] == old[k], (old["name"], k)
    after = subprocess.run([BIN / "trisocks", "backup", "--db", state / "trisocks.db", scene.tmp / "now.db"],
                           capture_output=True, text=True, timeout=60)
    assert f": schema {SCHEMA_VERSION}, 3 user(s), 5 token(s), " in after.stdout, after.stderr


def test_reload_access_log_and_file_limits(scene, procs, payload_server):
    scene.write_env_file()
    scene.systemctl("start")
    reloaded = scene.run("reload").stdout
    assert reloaded.rstrip().endswith("SIGHUP: no --config file to reload; ignored"), reloaded
    assert scene.systemd.service.alive()

    scene.run("logs-dropin")
    scene.verify()
    user = http("POST", f"{scene.api}/api/users", json={"name": "logged"}).json()
    traffic(procs, scene, payload_server, user["key"])
    access = scene.root / "var" / "log" / "trisocks" / "access.log"
    assert (scene.root / "var" / "log" / "trisocks").is_symlink()  # DynamicUser: private/trisocks
    line = wait_until(lambda: access.exists() and access.read_text().strip(), "an access log line")
    assert user["id"] in line or "logged" in line, line

    scene.run("fd-dropin")
    scene.verify()
    limits = scene.run("fd-check").stdout.splitlines()
    expect = nofile_we_may_set(262144)  # 262144 where the test may raise its hard limit
    assert scene.systemd.nofile == expect
    assert re.fullmatch(rf"Max open files\s+{expect}\s+{expect}\s+files", limits[0].strip()), limits
    assert 5 < int(limits[1]) < 200, limits
    # a clean stop, as systemd would see it
    scene.systemctl("stop")
    assert scene.systemd.exit_statuses[-1] == 0
    assert not port_open("127.0.0.1", scene.port)
