"""Client roles as the peers' tests expect them (issue 17 items 2, 3, 5; issue 9 item 1):
a token in the server URL, readiness lines that mean ready, a clean exit on SIGTERM, and
reconnecting after an unexpected error. Real processes, real sockets, curl."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time

import pytest

from trisocks.tunnel.client import split_url_token, url_auth_resource

from .support import curl, free_port, payload_sha256, start_trisocks_server, trisocks_cmd
from .support.peers import (
    HOST,
    start_linksocks_server,
    start_pywssocks_server,
    start_trisocks_reverse_server,
    trisocks_server_argv,
)
from .support.procs import port_open
from .support.tools import clean_env, require_tool

REAL = "real-token-17"
LISTENING = re.compile(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)")


def fetch_intact(socks: str, payload_server, n: int = 300_000, seed: int = 17) -> None:
    result = curl(payload_server.bytes_url(n, seed), socks=socks, timeout=30).check()
    assert result.sha256 == payload_sha256(n, seed), "payload changed on the way"


def start_client(procs, url: str, token: str = "placeholder", extra=(), name="client", argv=None):
    argv = argv or [*trisocks_cmd(), "client", "-u", url, "-t", token, "-s", HOST, "-p", "0",
                    *extra]
    return procs.start(argv, name=name, env=clean_env())


# -- item 2: the token in the URL ------------------------------------------------------------

def test_url_token_is_sent_hashed_with_role_and_instance():
    url, token = split_url_token("ws://h:1/socket?a=1&token=T%26x&b=2")
    assert token == "T&x" and "token" not in url and "a=1&b=2" in url
    assert split_url_token("ws://h:1/socket?token=") == ("ws://h:1/socket", None)
    assert split_url_token("ws://h:1/socket") == ("ws://h:1/socket", None)
    target = url_auth_resource("/socket?a=1", "T&x", True, bytes(range(16)))
    assert target.startswith("/socket?a=1&token=")
    assert "T%26x" not in target and "T&x" not in target
    assert f"token={hashlib.sha256(b'T&x').hexdigest()}" in target
    assert "reverse=true" in target and "instance=00010203-0405-0607-0809-0a0b0c0d0e0f" in target


@pytest.mark.parametrize("kind", ["trisocks", "pywssocks", "linksocks"])
def test_url_token_wins_over_t(kind, procs, payload_server):
    start = {"trisocks": lambda: start_trisocks_server(procs, tokens=(REAL,)),
             "pywssocks": lambda: start_pywssocks_server(procs, token=REAL),
             "linksocks": lambda: start_linksocks_server(procs, token=REAL)}[kind]
    server = start()
    client = start_client(procs, f"{server.url}/socket?token={REAL}")
    port = int(client.wait_for_log(LISTENING, 30).group(1))
    fetch_intact(f"{HOST}:{port}", payload_server)
    assert REAL not in client.output()  # the token is never logged


@pytest.mark.parametrize("kind", ["trisocks", "pywssocks"])
def test_wrong_url_token_is_final(kind, procs):
    server = (start_trisocks_server(procs, tokens=(REAL,)) if kind == "trisocks"
              else start_pywssocks_server(procs, token=REAL))
    # -t is right, the URL's token (which wins) is wrong: refused, and the client gives up
    client = start_client(procs, f"{server.url}/socket?token=wrong", token=REAL)
    assert client.wait_exit(15) == 1, client.describe()
    assert "server refused token" in client.stderr(), client.describe()
    assert not LISTENING.search(client.output())


# -- item 3: ready means ready, again after each reconnect ------------------------------------

def test_ready_line_only_when_port_accepts_and_again_after_reconnect(procs, payload_server):
    ws_port = free_port()
    url = f"ws://{HOST}:{ws_port}"
    client = start_client(procs, url, token=REAL)
    client.wait_for_log(r"cannot reach .*; retrying in", 15)
    assert "SOCKS5 proxy" not in client.output(), "ready before the server is even there"

    server_argv = trisocks_server_argv((REAL,), ws_port)
    server = start_trisocks_server(procs, argv=server_argv)
    port = int(client.wait_for_log(LISTENING, 30).group(1))
    assert port_open(HOST, port), "the readiness line came before the port accepts"
    fetch_intact(f"{HOST}:{port}", payload_server)

    server.proc.terminate()
    client.wait_for_log(r"connection 0 to server lost", 10)
    start_trisocks_server(procs, argv=server_argv, name="trisocks-server-again")
    ready = re.escape(f"SOCKS5 proxy ready on {HOST}:{port} (reconnected)")
    client.wait_for_log(ready, 30)
    fetch_intact(f"{HOST}:{port}", payload_server, seed=18)  # usable at once: no retry
    assert len(LISTENING.findall(client.output())) == 1


# -- item 5: SIGTERM closes the WebSocket, the pool fails over at once ------------------------

def test_sigterm_provider_leaves_pool_at_once(procs, payload_server):
    server, socks_port = start_trisocks_reverse_server(procs, REAL)
    providers = []
    for name in ("provider-a", "provider-b"):
        proc = procs.start([*trisocks_cmd(), "provider", "-u", server.url, "-t", REAL], name=name,
                           env=clean_env())
        proc.wait_for_log(r"provider ready on ws://", 30)
        providers.append(proc)
    server.proc.wait_for_port(socks_port, HOST)
    fetch_intact(f"{HOST}:{socks_port}", payload_server)
    # a slow download in flight through one of them
    slow_url = payload_server.bytes_url(50 << 20, 3)
    slow = subprocess.Popen([require_tool("curl"), "-s", "-o", "/dev/null", "--limit-rate", "200k",
                             "--socks5-hostname", f"{HOST}:{socks_port}",
                             slow_url], stdin=subprocess.DEVNULL,
                            env=clean_env())
    try:
        path = slow_url.split(payload_server.netloc, 1)[1]
        server.proc.wait_for(lambda: any(p == path for _, p in payload_server.requests),
                             "the slow download to start", 10)
        victim, other = providers
        victim.popen.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        server.proc.wait_for_log(r"gone: peer closed \(1001", 5)
        assert time.monotonic() - sigterm_at < 1.0, "the server learnt of the provider late"
        assert victim.wait_exit(5) == 0, victim.describe()
        assert "stopping (SIGTERM)" in victim.stderr()
        for seed in range(8):  # every new connection goes to the provider that is left
            fetch_intact(f"{HOST}:{socks_port}", payload_server, n=20_000, seed=seed)
        assert other.alive()
    finally:
        slow.kill()
        slow.wait()


# -- containment: an unexpected error costs one session, the client reconnects ---------------

FAULTY_CLIENT = """
import sys
import trisocks.tunnel.client as c
import trisocks.net.session as s

def fail_once(name, original):
    fired = []

    async def faulty(*args, **kw):
        if not fired:
            fired.append(1)
            raise RuntimeError(f"injected fault in {name}")
        return await original(*args, **kw)
    return faulty

c.client_handshake = fail_once("handshake", c.client_handshake)
s.Session.run = fail_once("session", s.Session.run)
from trisocks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_client_reconnects_after_unexpected_error(procs, payload_server):
    server = start_trisocks_server(procs, tokens=(REAL,))
    argv = [sys.executable, "-c", FAULTY_CLIENT, "client", "-u", server.url, "-t", REAL,
            "-s", HOST, "-p", "0"]
    client = start_client(procs, server.url, argv=argv, name="faulty-client")
    client.wait_for_log(r"internal error in connecting to .*injected fault in handshake", 10)
    client.wait_for_log(r"internal error in connection 0 to server.*injected fault in session", 10)
    # the first session failed before the port opened: it opens on the next one
    port = int(client.wait_for_log(LISTENING, 30).group(1))
    fetch_intact(f"{HOST}:{port}", payload_server)
    assert client.alive()
    assert client.stderr().count("Traceback") == 2
