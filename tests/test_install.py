"""trisocks installed as a package (issue 16 item 1), the way an operator installs it.

Once per session the sdist and the wheel are built from this tree as `make dist` builds them
(``python -m build --no-isolation``, compiled extension required), and the wheels of their
dependencies and build requirements are gathered into a wheelhouse (from pip's cache, or PyPI
the first time). Each test then makes a fresh virtualenv in its tmp_path, installs one artefact
into it with ``--no-index --find-links WHEELHOUSE`` (no network, no pip wheel cache) and, with that
install only (its own ``trisocks``, cwd outside the repository, no PYTHONPATH), runs a server
with the management API on, a client, a real SOCKS5 request with curl to an HTTP server of the
test's own, and one API call.

- the wheel: the compiled hot path runs;
- the sdist, compiled at install time: the compiled hot path runs;
- the sdist where the extension cannot be built (CC=/bin/false; no gcc on PATH): the install
  succeeds, pip's output carries setup.py's one warning line, and the pure hot path runs.

Nothing is skipped: a missing tool (curl, gcc, the `build` package) fails with what to install.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support.procs import ProcessFactory, start_with_free_ports
from .support.tools import clean_env

ROOT = Path(__file__).resolve().parents[1]
# the dashboard's files (/ui/), which must ship in the wheel and the sdist
UI_ASSETS = ("index.html", "login.html", "app.js", "api.js", "users.js", "style.css", "favicon.svg")
VERSION_LINE = re.compile(r"^trisocks (\d+\.\d+\.\d+\S*) \((compiled|pure) hot path\)$")
WARNING_LINE = re.compile(r"^\s*trisocks: WARNING: compiled extension not built \((.+)\); "
                          r"installing the pure-Python hot path instead", re.MULTILINE)
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 300


def _need(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: {why} (apt-get install {tool})", pytrace=False)
    return path


def _run(argv, *, env=None, cwd=None, timeout=INSTALL_TIMEOUT, what="command"
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, timeout=timeout, text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, (f"{what} failed with status {proc.returncode}: "
                                  f"{' '.join(map(str, argv))}\n{proc.stdout[-8000:]}")
    return proc


def _install_env(**extra: str) -> dict[str, str]:
    """The environment of an operator's shell: no PYTHONPATH, no virtualenv of ours, no
    TRISOCKS_* setting (TRISOCKS_REQUIRE_COMPILED only when a test sets it), no proxy."""
    env = clean_env()
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRISOCKS_REQUIRE_COMPILED",
                "TRISOCKS_PURE", "TRISOCKS_NO_EXTENSION", "CC", "LDSHARED", "CFLAGS"):
        env.pop(key, None)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path
    wheelhouse: Path  # wheels of every dependency and build requirement


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> Dists:
    _need("gcc", "the wheel is built with the compiled extension")
    try:
        importlib.metadata.version("build")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the 'build' package is not installed in {sys.executable}: it is in the test "
                    f"extras (make build installs it; or pip install build)", pytrace=False)
    out = tmp_path_factory.mktemp("dist")
    # as `make dist` does: this virtualenv's setuptools and Cython, the extension required
    env = _install_env(TRISOCKS_REQUIRE_COMPILED="1")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], env=env,
         cwd=out, timeout=BUILD_TIMEOUT, what="building the sdist and the wheel")
    wheels = list(out.glob("trisocks-*.whl"))
    sdists = list(out.glob("trisocks-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist: {list(out.iterdir())}"
    wheel, sdist = wheels[0], sdists[0]
    tag = sysconfig.get_config_var("EXT_SUFFIX").split(".")[1]  # cpython-311-x86_64-linux-gnu
    assert not wheel.name.endswith("-none-any.whl"), f"a pure wheel was built: {wheel.name}"

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("trisocks/wire/_relay.") and n.endswith(".so") and tag in n
               for n in names), f"no compiled extension in {wheel.name}: {names}"
    assert "trisocks/wire/_relay_py.py" in names
    assert not any(n.endswith(".c") for n in names), "the generated C belongs in the sdist only"
    for asset in UI_ASSETS:  # the dashboard's files are package data
        assert f"trisocks/management/ui/{asset}" in names, f"{asset} missing from {wheel.name}"
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    for needed in ("src/trisocks/wire/_relay.pyx", "src/trisocks/wire/_relay.c", "setup.py",
                   "pyproject.toml", "README.md", "LICENSE",
                   *(f"src/trisocks/management/ui/{asset}" for asset in UI_ASSETS)):
        assert needed in members, f"{needed} missing from {sdist.name}"
    assert not any(m.endswith(".so") for m in members), "a built extension leaked into the sdist"

    # dependencies (what the wheel asks for) and build requirements (what pip sets up to build
    # the sdist) as wheels, once: the installs below then need no network
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheelhouse, wheel,
          *build_requires], env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, cwd=wheelhouse,
         what="gathering the wheels of the dependencies")
    (wheelhouse / wheel.name).unlink()  # only the artefact under test is installed by path
    return Dists(wheel, sdist, wheelhouse)


@dataclass
class Install:
    venv: Path
    pip_output: str

    @property
    def trisocks(self) -> Path:
        return self.venv / "bin" / "trisocks"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def install(tmp_path: Path, artefact: Path, dists: Dists, env: dict[str, str]) -> Install:
    """A fresh virtualenv in tmp_path with ``artefact`` pip-installed into it (pip -v, so that
    the build's own output is kept), cwd tmp_path."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], env=env, cwd=tmp_path, what="creating a virtualenv")
    proc = _run([venv / "bin" / "python", "-m", "pip", "install", "-v", "--no-cache-dir",
                 "--disable-pip-version-check", "--no-index", "--find-links", dists.wheelhouse,
                 artefact], env=env, cwd=tmp_path, what=f"pip install {artefact.name}")
    inst = Install(venv, proc.stdout)
    assert inst.trisocks.is_file(), f"pip installed no trisocks script into {venv / 'bin'}"
    where = _run([inst.python, "-c", "import trisocks; print(trisocks.__file__)"],
                 env=_install_env(), cwd=tmp_path, what="importing trisocks").stdout.strip()
    assert Path(where).is_relative_to(venv), f"trisocks imported from {where}, not from {venv}"
    return inst


def version(inst: Install, cwd: Path, **env: str) -> tuple[str, str]:
    out = _run([inst.trisocks, "version"], env=_install_env(**env), cwd=cwd,
               timeout=60, what="trisocks version").stdout.strip()
    m = VERSION_LINE.match(out)
    assert m, f"unexpected `trisocks version` output: {out!r}"
    return m.group(1), m.group(2)


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web() -> Iterator[tuple[str, bytes]]:
    """A small HTTP server on 127.0.0.1 (a thread): its URL and the body it serves."""
    body = f"served to the installed trisocks: {secrets.token_hex(8)}\n".encode()
    handler = type("Page", (_Page,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/page", body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _curl(*args: str, cwd: Path) -> str:
    curl = _need("curl", "the test fetches a page through the installed SOCKS5 port")
    proc = subprocess.run([curl, "--silent", "--show-error", "--fail", "--max-time", "30", *args],
                          env=_install_env(), cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"curl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


class _FactoryIn(ProcessFactory):
    """A ProcessFactory whose processes run in ``cwd`` (outside the repository)."""

    def __init__(self, log_dir: Path, cwd: Path) -> None:
        super().__init__(log_dir)
        self.cwd = cwd

    def start(self, argv, name="proc", env=None, cwd=None):
        return super().start(argv, name=name, env=env, cwd=cwd or self.cwd)


def run_tunnel(inst: Install, tmp_path: Path, web: tuple[str, bytes], expect_version: str,
               **env: str) -> None:
    """Server (API on, database in tmp_path) and client from the install, a page through the
    tunnel with curl, and GET /api/status."""
    _need("curl", "the test fetches a page through the installed SOCKS5 port")
    url, body = web
    token = f"install-{secrets.token_hex(6)}"
    api_key = f"install-api-key-{secrets.token_hex(8)}"
    run_env = _install_env(**env)
    factory = _FactoryIn(tmp_path / "logs", cwd=tmp_path)
    try:
        def server_ready(proc, ports):
            proc.wait_for_port(ports[0], timeout=60)

        server, (ws_port,) = start_with_free_ports(
            factory, lambda port: [inst.trisocks, "server", "-H", "127.0.0.1", "-P", port,
                                   "-t", token, "-k", api_key, "--db", tmp_path / "state.db"],
            server_ready, 1, "trisocks-server", env=run_env)

        def client_ready(proc, ports):
            proc.wait_for_port(ports[0], timeout=60)

        client, (socks_port,) = start_with_free_ports(
            factory, lambda port: [inst.trisocks, "client", "-u", f"ws://127.0.0.1:{ws_port}",
                                   "-t", token, "-p", port],
            client_ready, 1, "trisocks-client", env=run_env)

        try:
            got = _curl("--socks5-hostname", f"127.0.0.1:{socks_port}", url, cwd=tmp_path)
            assert got.encode() == body, f"through the tunnel: {got!r}, expected {body!r}"

            status = json.loads(_curl("--noproxy", "*", "-H", f"X-API-Key: {api_key}",
                                      f"http://127.0.0.1:{ws_port}/api/status", cwd=tmp_path))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server.describe()}\n{client.describe()}") from None
        assert status["version"] == expect_version, status
        # the dashboard, from the installed package's data
        page = _curl("--noproxy", "*", f"http://127.0.0.1:{ws_port}/ui/login", cwd=tmp_path)
        assert 'name="key"' in page, page
        script = _curl("--noproxy", "*", f"http://127.0.0.1:{ws_port}/ui/static/app.js", cwd=tmp_path)
        assert "import" in script, script[:200]
        mine = [t for t in status["tokens"] if t["token"] == token]
        assert mine and mine[0]["type"] == "forward" and mine[0]["clients_count"] == 1, status
        assert (tmp_path / "state.db").is_file(), "--db made no database"
        for proc in (server, client):
            assert proc.alive(), proc.describe()
            assert "Traceback" not in proc.output(), proc.describe()
    finally:
        factory.close()


def test_wheel_installs_and_runs_compiled(dists, tmp_path, web):
    inst = install(tmp_path, dists.wheel, dists, _install_env())
    ver, impl = version(inst, tmp_path, TRISOCKS_REQUIRE_COMPILED="1")
    assert impl == "compiled"
    # the other spelling (issue 16 row 2) from the installed script too
    out = _run([inst.trisocks, "--version"], env=_install_env(), cwd=tmp_path,
               what="trisocks --version").stdout.strip()
    assert out == f"trisocks {ver} (compiled hot path)"
    run_tunnel(inst, tmp_path, web, ver, TRISOCKS_REQUIRE_COMPILED="1")


def test_sdist_installs_compiled(dists, tmp_path, web):
    _need("gcc", "the sdist compiles the extension at install time")
    # TRISOCKS_REQUIRE_COMPILED=1: a failed compilation fails the install instead of falling back
    inst = install(tmp_path, dists.sdist, dists, _install_env(TRISOCKS_REQUIRE_COMPILED="1"))
    assert not WARNING_LINE.search(inst.pip_output), "the extension was not built"
    # the sdist's generated C is compiled as shipped: Cython does not run at install time
    assert "Cythonizing" not in inst.pip_output and "_relay.c" in inst.pip_output, inst.pip_output[-6000:]
    ver, impl = version(inst, tmp_path, TRISOCKS_REQUIRE_COMPILED="1")
    assert impl == "compiled"
    run_tunnel(inst, tmp_path, web, ver, TRISOCKS_REQUIRE_COMPILED="1")


def _without_gcc_on_path(tmp_path: Path) -> dict[str, str]:
    # what a machine without a compiler looks like: the compiler Python was built with (gcc)
    # is not found; PATH keeps only an empty directory (pip runs its build by absolute path)
    empty = tmp_path / "no-compiler-bin"
    empty.mkdir()
    return {"CC": "gcc", "PATH": str(empty)}


@pytest.mark.parametrize("how", ["CC=/bin/false", "no gcc on PATH"])
def test_sdist_without_compiler_falls_back_to_pure(dists, tmp_path, web, how):
    extra = {"CC": "/bin/false"} if how == "CC=/bin/false" else _without_gcc_on_path(tmp_path)
    inst = install(tmp_path, dists.sdist, dists, _install_env(**extra))
    warnings = WARNING_LINE.findall(inst.pip_output)
    assert len(warnings) == 1, ("expected setup.py's warning line once in pip's output, got "
                                f"{warnings}\n{inst.pip_output[-6000:]}")
    expected = "the C compiler /bin/false failed" if how == "CC=/bin/false" \
        else "no C compiler: gcc not found"
    assert warnings[0] == expected
    site = Path(_run([inst.python, "-c", "import trisocks.wire, os; print(os.path.dirname("
                      "trisocks.wire.__file__))"], env=_install_env(), cwd=tmp_path).stdout.strip())
    assert not list(site.glob("_relay*.so")), "an extension was installed after all"
    ver, impl = version(inst, tmp_path)
    assert impl == "pure"
    run_tunnel(inst, tmp_path, web, ver)
