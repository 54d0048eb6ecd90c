"""A real redis-server for tests: in a temporary directory, on a unix socket and (unless told
otherwise) a free 127.0.0.1 port, stopped and started again on the same socket and port.

Nothing is written to disk (``--save "" --appendonly no``) unless a test asks for
``appendonly=True``, which keeps what was written across :meth:`RedisServer.restart`.
Readiness is a PING answered on the unix socket (plain even when the port speaks TLS), polled
against a deadline, never a sleep.

Use the ``redis_server`` fixture (a running server, stopped after the test), or
:func:`start_redis` from any test or fixture::

    from tests.support.redis import start_redis
    server = start_redis(tmp_path)      # server.url, server.unix_url
    server.stop(); server.start()       # same port, same socket, same data if appendonly
    server.close()

A missing redis-server fails the test when ``CI`` is set and skips it otherwise.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from .procs import ManagedProcess, free_port
from .tools import require_tool

READY_TIMEOUT = 10.0


def _ping(path: str) -> bool:
    """Does a server answer on the unix socket ``path``? (NOAUTH is an answer too.)"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(path)
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """One redis-server; ``port=None`` picks a free one, ``port=0`` listens on none."""

    def __init__(self, workdir: str | Path, *, port: int | None = None, password: str | None = None,
                 appendonly: bool = False, tls: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.exe = require_tool("redis-server")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # a unix socket path is limited to 107 bytes, and pytest's tmp_path can be longer
        self._sockdir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.socket = str(self._sockdir / "redis.sock")
        self.port = free_port() if port is None else port
        self.password = password
        self.appendonly = appendonly
        self.extra = tuple(extra)
        self.ca_file: str | None = None
        self._tls_args: list[str] = []
        if tls:
            self._make_certificates()
        self.proc: ManagedProcess | None = None
        self._runs = 0

    # -- addresses --------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "rediss" if self._tls_args else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    # -- lifecycle --------------------------------------------------------------------
    def argv(self) -> list[str]:
        tcp = ["--port", "0", "--tls-port", str(self.port), *self._tls_args] if self._tls_args \
            else ["--port", str(self.port)]
        argv = [self.exe, "--bind", "127.0.0.1", *tcp, "--unixsocket", self.socket,
                "--unixsocketperm", "700", "--dir", str(self.workdir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--loglevel", "notice"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra)

    def start(self) -> RedisServer:
        """Start (again, after stop()) and wait until it answers PING."""
        assert self.proc is None or not self.proc.alive(), "already running"
        self._runs += 1
        self.proc = ManagedProcess(self.argv(), f"redis-server-{self._runs}", self.workdir)
        self.proc.wait_for(lambda: _ping(self.socket), "redis-server to answer PING",
                           READY_TIMEOUT)
        return self

    def stop(self) -> None:
        """SIGTERM and wait for the exit: the port and the socket refuse connections then."""
        if self.proc is not None:
            self.proc.terminate()

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing answers."""
        assert self.proc is not None
        self.proc.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.popen.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            self.thaw()  # a stopped process would hold SIGTERM until SIGKILL
            self.stop()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def log(self) -> str:
        return self.proc.output() if self.proc is not None else ""

    # -- TLS --------------------------------------------------------------------------
    def _make_certificates(self) -> None:
        import trustme  # a test dependency (pyproject.toml): missing is an error, not a skip
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca_file, cert_file, key_file = (self.workdir / n for n in ("ca.pem", "cert.pem", "key.pem"))
        ca.cert_pem.write_to_path(str(ca_file))
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        self.ca_file = str(ca_file)
        self._tls_args = ["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
                          "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"]


def start_redis(workdir: str | Path, **options) -> RedisServer:
    """A started :class:`RedisServer` (options: port, password, appendonly, tls, extra);
    the caller closes it."""
    server = RedisServer(workdir, **options)
    try:
        return server.start()
    except BaseException:
        server.close()
        raise


@pytest.fixture
def redis_server(tmp_path):
    """A running redis-server (``.url``, ``.unix_url``), closed after the test."""
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.close()

