"""The declared interface between the server and the management plane (issue 10, item 4),
against a real Server in the test's process on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from trisocks.tunnel.server import Server, ServerConfig
from trisocks.tunnel.socks_server import Credentials
from trisocks.tunnel.tokens import CONNECTOR, FORWARD, REVERSE, TokenTable

from .inproc import (
    TOKEN,
    Socks5Failure,
    echo_handler,
    echo_roundtrip,
    serve_tcp,
    socks_connect,
    start_tunnel,
)
from .test_modes import REV, start_client, start_server, wait_for

AUTONOMY = "autonomy-token-0123456789"


async def test_address_and_readiness(nursery):
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0), TokenTable())
    assert not server.ready.is_set()
    port = await nursery.start(server.serve)
    assert server.ready.is_set()
    assert server.port == port != 0
    assert server.scheme == "ws"
    assert server.host == "127.0.0.1"


async def test_sessions_and_closing_by_account(nursery):
    tunnel = await start_tunnel(nursery)
    server = tunnel.server
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(tunnel.socks_port, echo, b"x" * 1000)
    infos = server.session_tokens()
    assert [(i.token, i.kind) for i in infos] == [(TOKEN, FORWARD)]

    [session] = server.sessions
    account = object()
    assert server.close_sessions_of(account, "nobody's") == 0
    assert not session.close_reason
    infos[0].account = account
    assert server.close_sessions_of(account, "quota used up") == 1
    assert session.close_reason == "quota used up"
    await wait_for(lambda: session not in server.sessions)


async def test_providers_and_ports(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    await server.add_reverse_token(AUTONOMY, allow_manage_connector=True)
    assert server.provider_count(REV) == 0
    assert server.provider_count("no-such-token") == 0
    assert server.reverse_port(REV) == server.services[REV].socks.port != 0
    assert server.reverse_port(AUTONOMY) is None
    assert server.reverse_port("no-such-token") is None

    await start_client(nursery, server, REV, reverse=True)
    await start_client(nursery, server, REV, reverse=True)
    await wait_for(lambda: server.provider_count(REV) == 2)
    assert sorted(i.kind for i in server.session_tokens()) == [REVERSE, REVERSE]
    server.remove_token(REV)
    assert server.provider_count(REV) == 0
    assert server.reverse_port(REV) is None


class Everyone:
    """A credentials checker that takes any pair and remembers what it was built from."""

    def __init__(self, own) -> None:
        self.own = own

    def check(self, username, password) -> bool:
        return True


async def test_socks_credentials_hook(nursery):
    server = await start_server(nursery, reverse=[(REV, {"username": "u", "password": "p"})],
                                socks_nowait=True)
    assert server.socks_credentials_hook is None
    own = server.services[REV].socks.credentials
    assert isinstance(own, Credentials) and own.check("u", "p")

    built = []

    def hook(own):
        built.append(own)
        return Everyone(own)

    server.socks_credentials_hook = hook  # existing ports at once
    assert server.socks_credentials_hook is hook
    assert built == [own]
    assert isinstance(server.services[REV].socks.credentials, Everyone)

    info = await server.add_reverse_token("second-reverse-0123456789")  # ... and new ones
    assert built[-1] is None
    assert server.services[info.token].socks.credentials.own is None

    # the port really asks the hook's checker: a pair the token's own would refuse gets in
    await start_client(nursery, server, REV, reverse=True)
    await wait_for(lambda: server.provider_count(REV) == 1)
    echo = await serve_tcp(nursery, echo_handler)
    stream = await socks_connect(server.reverse_port(REV), "127.0.0.1", echo,
                                 auth=("someone", "else"))
    await stream.send_all(b"ping")
    assert await stream.receive_some(4) == b"ping"
    await stream.aclose()

    server.socks_credentials_hook = None  # back to each token's own pair
    assert server.services[REV].socks.credentials is own


async def test_client_address_behind_trusted_proxy(nursery):
    plain = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0), TokenTable())
    assert not plain.trusts_proxies
    assert plain.client_address("127.0.0.1", {"x-forwarded-for": "203.0.113.9"}) == "127.0.0.1"

    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, trusted_proxies=("127.0.0.0/8",)),
                    TokenTable())
    assert server.trusts_proxies
    headers = {"x-forwarded-for": "198.51.100.1, 203.0.113.9, 127.0.0.2"}
    assert server.client_address("127.0.0.1", headers) == "203.0.113.9"
    assert server.client_address("192.0.2.1", headers) == "192.0.2.1"  # not a trusted peer
    assert server.client_address("127.0.0.1", {}) == "127.0.0.1"
    assert server.client_address("127.0.0.1", {"x-forwarded-for": "junk"}) == "127.0.0.1"


async def test_added_listener_is_not_dialled(nursery):
    tunnel = await start_tunnel(nursery)
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(tunnel.socks_port, echo, b"x" * 1000)  # reachable while not ours
    tunnel.server.add_listener("127.0.0.1", echo)
    with pytest.raises(Socks5Failure) as caught:
        await socks_connect(tunnel.socks_port, "127.0.0.1", echo)
    assert caught.value.code == 2  # not allowed by ruleset


async def test_check_socks_port(nursery):
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, socks_host="127.0.0.1"), TokenTable())
    with socket.socket() as probe:  # a free port passes...
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    server.check_socks_port(free)
    with socket.socket() as taken:  # ... a listening one does not, and the error says where
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            server.check_socks_port(port)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert caught.value.strerror


async def test_connector_token_counts_as_session(nursery):
    """session_tokens lists connectors too (one entry per session), with their own TokenInfo."""
    conn = "connector-token-interface-01"
    server = await start_server(nursery, reverse=[(REV, {})], connectors=[(conn, REV)])
    await start_client(nursery, server, REV, reverse=True)
    await start_client(nursery, server, conn)
    await wait_for(lambda: len(server.session_tokens()) == 2)
    kinds = sorted(i.kind for i in server.session_tokens())
    assert kinds == [CONNECTOR, REVERSE]
    assert server.provider_count(REV) == 1
    assert server.close_sessions_of(None, "all plain tokens") == 2
    await wait_for(lambda: not server.sessions)
