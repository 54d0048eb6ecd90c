"""Shared fixtures: subprocesses that die with their test, tunnel peers, the payload server.

The peer fixtures are factories: call them with options, get a ready :class:`Peer` back::

    def test_x(trisocks_server, trisocks_client):
        server = trisocks_server(tokens=["tok"])
        client = trisocks_client(server.url, "tok")
        curl(url, socks=client.socks)
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading

import pytest

from .support import peers
from .support.payload import PayloadServer
from .support.procs import clean_processes, kill_all_live


def pytest_configure(config) -> None:
    # Subprocesses run in their own process groups (so that teardown can kill a whole group);
    # the flip side is that they would outlive a test run killed with SIGTERM. Take them along.
    atexit.register(kill_all_live)
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_sigterm(signum, frame):
            kill_all_live()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_sigterm)


@pytest.fixture
def procs(tmp_path):
    """A ProcessFactory; every process it started is terminated (whole group) at teardown.

    Whatever happened, a trisocks process must never have dumped a traceback: failures are
    one clear log line each.
    """
    yield from clean_processes(tmp_path / "logs")


@pytest.fixture
def trisocks_server(procs):
    """``trisocks_server(tokens=["t"], debug=False, extra=(), env=None) -> Peer``."""
    def start(tokens=("test-token",), **kw) -> peers.Peer:
        return peers.start_trisocks_server(procs, tokens=tokens, **kw)
    return start


@pytest.fixture
def trisocks_client(procs):
    """``trisocks_client(url, token, username=None, password=None, threads=None, ...) -> Peer``."""
    def start(url, token="test-token", **kw) -> peers.Peer:
        return peers.start_trisocks_client(procs, url, token, **kw)
    return start


@pytest.fixture
def pywssocks_server(procs):
    def start(token="test-token") -> peers.Peer:
        return peers.start_pywssocks_server(procs, token)
    return start


@pytest.fixture
def pywssocks_client(procs):
    def start(url, token="test-token") -> peers.Peer:
        return peers.start_pywssocks_client(procs, url, token)
    return start


@pytest.fixture
def linksocks_server(procs):
    def start(token="test-token") -> peers.Peer:
        return peers.start_linksocks_server(procs, token)
    return start


@pytest.fixture
def linksocks_client(procs):
    def start(url, token="test-token") -> peers.Peer:
        return peers.start_linksocks_client(procs, url, token)
    return start


@pytest.fixture(scope="session")
def payload_server():
    """The payload HTTP server on 127.0.0.1 (one per test session)."""
    with PayloadServer("127.0.0.1") as server:
        yield server


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def payload_server_v6():
    """The payload HTTP server on [::1]; skips (even in CI) without an IPv6 loopback."""
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1 cannot be bound)")
    with PayloadServer("::1") as server:
        yield server
