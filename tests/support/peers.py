"""Starting tunnel servers and clients (trisocks, pywssocks, linksocks) as subprocesses.

Every ``start_*`` function returns a :class:`Peer` once the process is ready: its log says so
and its port accepts connections. trisocks listens on port 0 and the port is read back from its
log; the peers need a port up front, so they get a free one below 32768 (and another one if a
different program on the machine takes it first).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .procs import ManagedProcess, ProcessFactory, start_with_free_ports
from .tools import clean_env, require_peer, trisocks_cmd

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
LINKSOCKS_SERVER_SCRIPT = Path(__file__).with_name("linksocks_server.py")


@dataclass
class Peer:
    """A ready server or client: ``port`` is its WebSocket port (servers) or SOCKS5 port."""

    kind: str
    port: int
    proc: ManagedProcess

    @property
    def url(self) -> str:
        """WebSocket URL of a server."""
        return f"ws://{HOST}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def socks(self) -> str:
        """host:port of a client's SOCKS5 listener."""
        return f"{HOST}:{self.port}"

    def output(self) -> str:
        return self.proc.output()


# -- trisocks ---------------------------------------------------------------------------------

_TRISOCKS_SERVER_READY = re.compile(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)")
_TRISOCKS_CLIENT_READY = re.compile(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)")


def trisocks_server_argv(tokens: Sequence[str] | None = ("test-token",), port: int = 0,
                         debug: bool = False, extra: Sequence[str] = ()) -> list[str]:
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", str(port)]
    for token in tokens or ():
        argv += ["-t", token]
    if debug:
        argv.append("-d")
    return argv + list(extra)


def start_trisocks_server(factory: ProcessFactory, tokens: Sequence[str] | None = ("test-token",),
                          debug: bool = False, extra: Sequence[str] = (),
                          env: dict[str, str] | None = None, argv: Sequence[str] | None = None,
                          name: str = "trisocks-server") -> Peer:
    """``trisocks server`` on 127.0.0.1 port 0; ``tokens=None`` gives no -t at all."""
    if argv is None:
        argv = trisocks_server_argv(tokens, 0, debug, extra)
    proc = factory.start(argv, name=name, env=env if env is not None else clean_env())
    match = proc.wait_for_log(_TRISOCKS_SERVER_READY, READY_TIMEOUT)
    port = int(match.group(1))
    proc.wait_for_port(port, HOST)
    return Peer("trisocks-server", port, proc)


def trisocks_client_argv(url: str | None, token: str | None, port: int = 0,
                         username: str | None = None, password: str | None = None,
                         threads: int | None = None, debug: bool = False,
                         extra: Sequence[str] = ()) -> list[str]:
    argv = [*trisocks_cmd(), "client"]
    if url is not None:
        argv += ["-u", url]
    if token is not None:
        argv += ["-t", token]
    argv += ["-s", HOST]
    if port is not None:
        argv += ["-p", str(port)]
    if username is not None:
        argv += ["-n", username]
    if password is not None:
        argv += ["-w", password]
    if threads is not None:
        argv += ["-T", str(threads)]
    if debug:
        argv.append("-d")
    return argv + list(extra)


def start_trisocks_client(factory: ProcessFactory, url: str | None,
                          token: str | None = "test-token",
                          username: str | None = None, password: str | None = None,
                          threads: int | None = None, debug: bool = False,
                          extra: Sequence[str] = (), env: dict[str, str] | None = None,
                          argv: Sequence[str] | None = None, expect_port: int | None = None,
                          name: str = "trisocks-client") -> Peer:
    """``trisocks client`` with its SOCKS5 port on 127.0.0.1 port 0 (unless ``argv`` says
    otherwise); waits for its "SOCKS5 proxy listening" line."""
    if argv is None:
        argv = trisocks_client_argv(url, token, 0, username, password, threads, debug, extra)
    proc = factory.start(argv, name=name, env=env if env is not None else clean_env())
    match = proc.wait_for_log(_TRISOCKS_CLIENT_READY, READY_TIMEOUT)
    port = int(match.group(1))
    if expect_port is not None and port != expect_port:
        proc.fail(f"client listens on port {port}, expected {expect_port}")
    proc.wait_for_port(port, HOST)
    return Peer("trisocks-client", port, proc)


# -- pywssocks --------------------------------------------------------------------------------

def start_pywssocks_server(factory: ProcessFactory, token: str = "test-token") -> Peer:
    exe = require_peer("pywssocks")

    def ready(proc: ManagedProcess, ports: Sequence[int]) -> None:
        proc.wait_for_log(re.escape(f"started on: ws://{HOST}:{ports[0]}"), READY_TIMEOUT)
        proc.wait_for_port(ports[0], HOST)

    proc, ports = start_with_free_ports(
        factory, lambda port: [exe, "server", "-H", HOST, "-P", str(port), "-t", token],
        ready, 1, name="pywssocks-server", env=clean_env())
    return Peer("pywssocks-server", ports[0], proc)


def start_pywssocks_client(factory: ProcessFactory, url: str, token: str = "test-token") -> Peer:
    exe = require_peer("pywssocks")

    def ready(proc: ManagedProcess, ports: Sequence[int]) -> None:
        # It logs this line after listen(); no connect probe, which it would log as an error.
        # Its SOCKS5 port may open before the server accepted the token: wait for both.
        proc.wait_for_log(re.escape(f"SOCKS5 server started on {HOST}:{ports[0]}"), READY_TIMEOUT)
        proc.wait_for_log("Authentication successful", READY_TIMEOUT)

    proc, ports = start_with_free_ports(
        factory, lambda port: [exe, "client", "-t", token, "-u", url, "-h", HOST, "-p", str(port)],
        ready, 1, name="pywssocks-client", env=clean_env())
    return Peer("pywssocks-client", ports[0], proc)


# -- linksocks --------------------------------------------------------------------------------

def start_linksocks_server(factory: ProcessFactory, token: str = "test-token") -> Peer:
    """A LinkSocks (Go) server driven through its Python API (see linksocks_server.py)."""
    require_peer("linksocks")

    def ready(proc: ManagedProcess, ports: Sequence[int]) -> None:
        proc.wait_for_log(re.escape(f"linksocks server ready on {HOST}:{ports[0]}"), READY_TIMEOUT)
        proc.wait_for_port(ports[0], HOST)

    proc, ports = start_with_free_ports(
        factory, lambda port: [sys.executable, str(LINKSOCKS_SERVER_SCRIPT), str(port), token],
        ready, 1, name="linksocks-server", env=clean_env())
    return Peer("linksocks-server", ports[0], proc)


def start_linksocks_client(factory: ProcessFactory, url: str, token: str = "test-token",
                           command: str = "client") -> Peer:
    """The linksocks client CLI (or its ``connector`` alias); always relay-only (no STUN,
    nothing leaves the machine)."""
    exe = require_peer("linksocks")

    def ready(proc: ManagedProcess, ports: Sequence[int]) -> None:
        proc.wait_for_log("Authentication successful", READY_TIMEOUT)
        proc.wait_for_log("SOCKS5 server started", READY_TIMEOUT)
        proc.wait_for_port(ports[0], HOST)

    proc, ports = start_with_free_ports(
        factory,
        lambda port: [exe, command, "-t", token, "-u", url, "-s", HOST, "-p", str(port),
                      "--direct-mode", "relay-only", "--no-env-proxy"],
        ready, 1, name=f"linksocks-{command}",
        env=clean_env({"COLUMNS": "250", "NO_COLOR": "1"}))  # one log record per line
    return Peer(f"linksocks-{command}", ports[0], proc)


def start_linksocks_provider(factory: ProcessFactory, url: str, token: str) -> ManagedProcess:
    """``linksocks provider``: no port of its own; ready once authenticated."""
    exe = require_peer("linksocks")
    proc = factory.start([exe, "provider", "-t", token, "-u", url, "--direct-mode", "relay-only",
                          "--no-env-proxy"], name="linksocks-provider",
                         env=clean_env({"COLUMNS": "250", "NO_COLOR": "1"}))
    proc.wait_for_log("Authentication successful", READY_TIMEOUT)
    return proc


def start_linksocks_reverse_server(factory: ProcessFactory, reverse_token: str,
                                   connector_token: str | None = None) -> tuple[Peer, int]:
    """A LinkSocks server with one reverse token (and optionally a connector token for it);
    returns the server and the reverse token's SOCKS5 port."""
    require_peer("linksocks")

    def argv(port: int, socks_port: int) -> list[str]:
        args = [sys.executable, str(LINKSOCKS_SERVER_SCRIPT), str(port),
                "--reverse", f"{reverse_token}:{socks_port}"]
        if connector_token:
            args += ["--connector", f"{connector_token}:{reverse_token}"]
        return args

    def ready(proc: ManagedProcess, ports: Sequence[int]) -> None:
        proc.wait_for_log(re.escape(f"linksocks server ready on {HOST}:{ports[0]}"), READY_TIMEOUT)
        proc.wait_for_port(ports[0], HOST)

    proc, ports = start_with_free_ports(factory, argv, ready, 2, name="linksocks-server",
                                        env=clean_env())
    return Peer("linksocks-server", ports[0], proc), ports[1]


# -- trisocks in reverse and agent modes ------------------------------------------------------

_REVERSE_PORT = re.compile(r"SOCKS5 port 127\.0\.0\.1:(\d+)")


def start_trisocks_reverse_server(factory: ProcessFactory, token: str,
                                  connector_tokens: Sequence[str] = (),
                                  extra: Sequence[str] = ()) -> tuple[Peer, int]:
    """``trisocks server -r`` with one reverse token; returns the server and its SOCKS5 port
    (which opens once a provider has connected)."""
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-r", "-t", token, "-p", "0"]
    for c in connector_tokens:
        argv += ["-c", c]
    proc = factory.start(argv + list(extra), name="trisocks-server", env=clean_env())
    socks_port = int(proc.wait_for_log(_REVERSE_PORT, READY_TIMEOUT).group(1))
    port = int(proc.wait_for_log(_TRISOCKS_SERVER_READY, READY_TIMEOUT).group(1))
    proc.wait_for_port(port, HOST)
    return Peer("trisocks-server", port, proc), socks_port


def start_trisocks_provider(factory: ProcessFactory, url: str, token: str,
                            extra: Sequence[str] = (), name: str = "trisocks-provider") -> ManagedProcess:
    proc = factory.start([*trisocks_cmd(), "provider", "-u", url, "-t", token, *extra], name=name,
                         env=clean_env())
    proc.wait_for_log("as provider", READY_TIMEOUT)
    return proc


def start_trisocks_connector(factory: ProcessFactory, url: str, token: str) -> Peer:
    return start_trisocks_client(factory, url, token, name="trisocks-connector",
                                 argv=[*trisocks_cmd(), "connector", "-u", url, "-t", token,
                                       "-s", HOST, "-p", "0"])
