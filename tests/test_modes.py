"""Reverse, agent and autonomy modes, load balancing, UDP, fast open, -T, TLS and reconnects,
with every part running in the test's process on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from trisocks.tunnel.client import Client, ClientConfig
from trisocks.tunnel.server import Server, ServerConfig
from trisocks.tunnel.tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable
from trisocks.wire import protocol, socks5
from trisocks.wire.errors import AuthError, TunnelError

from .inproc import (
    TOKEN,
    RawPeer,
    Socks5Failure,
    echo_handler,
    echo_roundtrip,
    serve_tcp,
    socks_connect,
    start_tunnel,
)

REV = "reverse-token-0123456789"
CONN = "connector-token-0123456789"


async def start_server(nursery, *, reverse=(), connectors=(), **cfg) -> Server:
    tokens = TokenTable()
    tokens.add_forward(TOKEN)
    for token, extra in reverse:
        tokens.add(TokenInfo(token, REVERSE, port=0, **extra))
    for token, rev in connectors:
        tokens.add(TokenInfo(token, CONNECTOR, reverse_token=rev))
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, **cfg), tokens)
    await nursery.start(server.serve)
    return server


async def start_client(nursery, server: Server, token: str, **cfg) -> tuple[Client, trio.CancelScope]:
    """A client (or provider with reverse=True) in its own cancel scope, so a test can kill it."""
    cfg.setdefault("socks_port", 0)
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{server.port}", token=token,
                                 socks_host="127.0.0.1", **cfg))
    scope = trio.CancelScope()

    client.exit_error = None

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            try:
                await client.run(task_status=task_status)
            except BaseExceptionGroup as group:
                # the end a real client meets (refused token, -R): recorded for the test to check
                leaf = group
                while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                    leaf = leaf.exceptions[0]
                if not isinstance(leaf, (AuthError, TunnelError)):
                    raise
                client.exit_error = leaf

    await nursery.start(run)
    return client, scope


def socks_port_of(server: Server, token: str) -> int:
    return server.services[token].socks.port


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# -- reverse mode --------------------------------------------------------------------------


async def test_reverse_mode_carries_traffic(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    echo = await serve_tcp(nursery, echo_handler)
    provider, _ = await start_client(nursery, server, REV, reverse=True)
    port = socks_port_of(server, REV)
    assert await echo_roundtrip(port, echo, os.urandom(8 << 20))
    assert provider.handler.channels_opened == 1


async def test_reverse_port_opens_with_the_first_provider(nursery):
    server = await start_server(nursery, reverse=[(REV, {})], provider_wait=0.3)
    port = socks_port_of(server, REV)
    with pytest.raises(OSError):  # bound but not listening: refused
        await trio.open_tcp_stream("127.0.0.1", port)
    echo = await serve_tcp(nursery, echo_handler)
    _, scope = await start_client(nursery, server, REV, reverse=True)
    assert await echo_roundtrip(port, echo, b"hello")
    # the provider leaves: the port stays open, and a request waits, then fails cleanly
    scope.cancel()
    await wait_for(lambda: not len(server.services[REV].pool))
    with pytest.raises(Socks5Failure) as failure:
        await socks_connect(port, "127.0.0.1", echo)
    assert failure.value.code == socks5.NETWORK_UNREACHABLE


async def test_reverse_socks_nowait_and_no_provider(nursery):
    server = await start_server(nursery, reverse=[(REV, {})], socks_nowait=True, provider_wait=0.3)
    port = socks_port_of(server, REV)
    with trio.fail_after(3):
        with pytest.raises(Socks5Failure) as failure:
            await socks_connect(port, "127.0.0.1", 9)
    assert failure.value.code == socks5.NETWORK_UNREACHABLE


async def test_reverse_socks_credentials(nursery):
    server = await start_server(nursery, reverse=[(REV, {"username": "alice", "password": "s3cret"})])
    echo = await serve_tcp(nursery, echo_handler)
    await start_client(nursery, server, REV, reverse=True)
    port = socks_port_of(server, REV)
    # no credentials offered: no acceptable method
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(socks5.client_greeting(False))
    assert await stream.receive_some(2) == bytes([5, socks5.NO_ACCEPTABLE])
    await stream.aclose()
    # wrong password: RFC 1929 failure
    with pytest.raises(Socks5Failure):
        await socks_connect(port, "127.0.0.1", echo, auth=("alice", "wrong"))
    # the right ones
    stream = await socks_connect(port, "127.0.0.1", echo, auth=("alice", "s3cret"))
    await stream.send_all(b"ok")
    assert await stream.receive_some(2) == b"ok"
    await stream.aclose()


async def test_load_balancing_and_failover(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    echo = await serve_tcp(nursery, echo_handler)
    providers = [await start_client(nursery, server, REV, reverse=True) for _ in range(3)]
    await wait_for(lambda: len(server.services[REV].pool) == 3)
    port = socks_port_of(server, REV)

    async def one() -> bool:
        return await echo_roundtrip(port, echo, os.urandom(1024))

    for _ in range(300):
        assert await one()
    counts = [p.handler.channels_opened for p, _ in providers]
    assert sum(counts) == 300
    assert min(counts) >= 60, counts  # each at least 20%

    # Kill one provider while it carries open channels: those end cleanly (EOF, no hang)...
    victim, victim_scope = providers[0]
    held = []
    for _ in range(6):
        held.append(await socks_connect(port, "127.0.0.1", echo))
    victim_scope.cancel()
    await wait_for(lambda: len(server.services[REV].pool) == 2)
    ended = 0
    for stream in held:
        await stream.send_all(b"x")
        with trio.fail_after(5):
            try:
                data = await stream.receive_some(10)
            except trio.BrokenResourceError:
                data = b""
        ended += data == b""
        await stream.aclose()
    assert ended >= 1  # round robin put some of them on the victim, and they closed
    # ...and after the failover no new connection fails.
    for _ in range(100):
        assert await one()


async def test_hung_provider_is_skipped(nursery):
    """A provider that stops answering pings (but keeps its connection) gets no new channels."""
    server = await start_server(nursery, reverse=[(REV, {})], provider_ping_interval=0.1)
    echo = await serve_tcp(nursery, echo_handler)
    good, _ = await start_client(nursery, server, REV, reverse=True)
    hung = await RawPeer.connect(server.port)  # authenticates, then never reads again
    await hung.send_message(protocol.Auth(REV, True, os.urandom(16)))
    pool = server.services[REV].pool
    await wait_for(lambda: len(pool) == 2)
    from trisocks.tunnel import pool as pool_module

    hung_port = hung.sock.getsockname()[1]
    hung_session = next(s for s in pool if s.name.endswith(f":{hung_port}"))
    await wait_for(lambda: not hung_session.responsive(trio.current_time(), pool_module.PING_GRACE),
                   timeout=pool_module.PING_GRACE + 2)
    for _ in range(10):
        assert await echo_roundtrip(socks_port_of(server, REV), echo, b"ping")
    assert good.handler.channels_opened == 10
    await hung.aclose()


# -- agent and autonomy --------------------------------------------------------------------------


async def test_agent_mode(nursery):
    server = await start_server(nursery, reverse=[(REV, {})], connectors=[(CONN, REV)])
    echo = await serve_tcp(nursery, echo_handler)
    provider, _ = await start_client(nursery, server, REV, reverse=True)
    connector, _ = await start_client(nursery, server, CONN)
    assert await echo_roundtrip(connector.socks_port, echo, os.urandom(8 << 20))
    assert provider.handler.channels_opened == 1
    await wait_for(lambda: connector.partners == 1 and provider.partners == 1)


async def test_agent_mode_many_channels_and_fast_open(nursery):
    server = await start_server(nursery, reverse=[(REV, {})], connectors=[(CONN, REV)])
    echo = await serve_tcp(nursery, echo_handler)
    await start_client(nursery, server, REV, reverse=True)
    connector, _ = await start_client(nursery, server, CONN, fast_open=True)
    results = []

    async def one(i):
        results.append(await echo_roundtrip(connector.socks_port, echo, os.urandom(64 << 10 | i)))

    async with trio.open_nursery() as inner:
        for i in range(40):
            inner.start_soon(one, i)
    assert results == [True] * 40


async def test_autonomy_connector_tokens_reach_only_their_provider(nursery):
    server = await start_server(nursery, reverse=[(REV, {"allow_manage_connector": True})])
    echo = await serve_tcp(nursery, echo_handler)
    a, _ = await start_client(nursery, server, REV, reverse=True, connector_token="ctok-of-provider-a")
    b, _ = await start_client(nursery, server, REV, reverse=True, connector_token="ctok-of-provider-b")
    await wait_for(lambda: server.tokens.get("ctok-of-provider-a")
                   and server.tokens.get("ctok-of-provider-b"))
    ca, _ = await start_client(nursery, server, "ctok-of-provider-a")
    cb, _ = await start_client(nursery, server, "ctok-of-provider-b")
    for _ in range(5):
        assert await echo_roundtrip(ca.socks_port, echo, b"to a")
    assert (a.handler.channels_opened, b.handler.channels_opened) == (5, 0)
    for _ in range(3):
        assert await echo_roundtrip(cb.socks_port, echo, b"to b")
    assert (a.handler.channels_opened, b.handler.channels_opened) == (5, 3)

    # a provider cannot remove another's token, and removing its own takes effect at once
    ok, _ = await a.manage_connector(a.sessions[0], "ctok-of-provider-b", protocol.REMOVE)
    assert not ok
    ok, _ = await a.manage_connector(a.sessions[0], "ctok-of-provider-a", protocol.REMOVE)
    assert ok
    assert server.tokens.get("ctok-of-provider-a") is None
    # the connector is disconnected at once, and its token no longer opens a session
    await wait_for(lambda: isinstance(ca.exit_error, AuthError))
    assert not ca.sessions
    assert await echo_roundtrip(cb.socks_port, echo, b"b is unaffected")


async def test_connector_management_refused_without_autonomy(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    provider, _ = await start_client(nursery, server, REV, reverse=True)
    ok, error = await provider.manage_connector(provider.sessions[0], "mine-now-123456", protocol.ADD)
    assert not ok and "not allowed" in error
    assert server.tokens.get("mine-now-123456") is None


# -- UDP ---------------------------------------------------------------------------------------


async def udp_echo(nursery) -> int:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve():
        while True:
            data, addr = await sock.recvfrom(65535)
            await sock.sendto(b"echo:" + data, addr)

    nursery.start_soon(serve)
    return sock.getsockname()[1]


async def udp_roundtrips(socks_port: int, echo_port: int, count: int = 5) -> None:
    control = await trio.open_tcp_stream("127.0.0.1", socks_port)
    await control.send_all(socks5.client_greeting(False))
    assert await control.receive_some(2) == b"\x05\x00"
    await control.send_all(socks5.client_request(socks5.CMD_UDP_ASSOCIATE, "0.0.0.0", 0))
    reply = await control.receive_some(64)
    code, relay_host, relay_port, _ = socks5.parse_reply(reply)
    assert code == socks5.SUCCEEDED
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    for i in range(count):
        payload = os.urandom(100 + i)
        await udp.sendto(socks5.udp_header("127.0.0.1", echo_port) + payload, (relay_host, relay_port))
        with trio.fail_after(5):
            data, _ = await udp.recvfrom(65535)
        frag, host, port, offset = socks5.parse_udp_header(data)
        assert (frag, host, port) == (0, "127.0.0.1", echo_port)  # the source, preserved
        assert data[offset:] == b"echo:" + payload
    # a fragmented datagram is dropped, and the association keeps working
    frag_dgram = bytearray(socks5.udp_header("127.0.0.1", echo_port) + b"frag")
    frag_dgram[2] = 1
    await udp.sendto(bytes(frag_dgram), (relay_host, relay_port))
    await udp.sendto(socks5.udp_header("127.0.0.1", echo_port) + b"after", (relay_host, relay_port))
    with trio.fail_after(5):
        data, _ = await udp.recvfrom(65535)
    assert data.endswith(b"echo:after")
    udp.close()
    await control.aclose()


async def test_udp_forward(nursery):
    tunnel = await start_tunnel(nursery)
    echo = await udp_echo(nursery)
    await udp_roundtrips(tunnel.socks_port, echo)
    # closing the control connection ends the association on both sides
    await wait_for(lambda: not any(s.channels for s in tunnel.server.sessions))


async def test_udp_reverse(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    await start_client(nursery, server, REV, reverse=True)
    echo = await udp_echo(nursery)
    await udp_roundtrips(socks_port_of(server, REV), echo)


async def test_udp_through_connector(nursery):
    server = await start_server(nursery, reverse=[(REV, {})], connectors=[(CONN, REV)])
    await start_client(nursery, server, REV, reverse=True)
    connector, _ = await start_client(nursery, server, CONN)
    echo = await udp_echo(nursery)
    await udp_roundtrips(connector.socks_port, echo)


# -- fast open, threads ----------------------------------------------------------------------------


async def test_fast_open(nursery):
    tunnel = await start_tunnel(nursery, client_cfg={"fast_open": True})
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(tunnel.socks_port, echo, os.urandom(1 << 20))
    # a refused target: the SOCKS5 client hears "succeeded", then the connection closes
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    stream = await socks_connect(tunnel.socks_port, "127.0.0.1", dead_port)
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(100)
        except trio.BrokenResourceError:
            data = b""
    assert data == b""
    await stream.aclose()


async def test_threads_spread_channels_and_survive_one_loss(nursery):
    tunnel = await start_tunnel(nursery, client_cfg={"threads": 4})
    await wait_for(lambda: len(tunnel.client.sessions) == 4)
    echo = await serve_tcp(nursery, echo_handler)
    streams = [await socks_connect(tunnel.socks_port, "127.0.0.1", echo) for _ in range(12)]
    per_session = [len(s.channels) for s in tunnel.client.sessions]
    assert per_session == [3, 3, 3, 3]
    # close one WebSocket from the server side
    victim = tunnel.client.sessions[0]
    doomed = set(victim.channels)
    server_side = next(s for s in tunnel.server.sessions if set(s.channels) == doomed)
    server_side.close(1001, "test")
    survivors = 0
    for stream in streams:
        await stream.send_all(b"still?")
        with trio.fail_after(5):
            try:
                data = await stream.receive_some(10)
            except trio.BrokenResourceError:
                data = b""
        survivors += data == b"still?"
        await stream.aclose()
    assert survivors == 9
    await wait_for(lambda: len(tunnel.client.sessions) == 4)  # and it reconnects


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    base = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    return str(base / "server.pem"), str(base / "ca.pem")


async def test_tls_with_the_right_ca(nursery, tls_files):
    cert, ca = tls_files
    server = await start_server(nursery, tls_cert=cert)
    echo = await serve_tcp(nursery, echo_handler)
    client = Client(ClientConfig(url=f"wss://127.0.0.1:{server.port}", token=TOKEN, socks_port=0,
                                 ca_file=ca))
    port = await nursery.start(client.run)
    assert await echo_roundtrip(port, echo, os.urandom(4 << 20))


async def test_tls_without_the_ca_fails_clearly(nursery, tls_files):
    cert, _ = tls_files
    server = await start_server(nursery, tls_cert=cert)
    client = Client(ClientConfig(url=f"wss://127.0.0.1:{server.port}", token=TOKEN, socks_port=0,
                                 reconnect=False))
    with trio.fail_after(10):
        with pytest.raises(BaseException) as raised:
            await client.run()
    leaf = raised.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, TunnelError)
    assert "certificate" in str(leaf) and "not trusted" in str(leaf)


# -- reconnects ---------------------------------------------------------------------------------


async def test_invalid_token_is_final(nursery):
    server = await start_server(nursery)
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{server.port}", token="wrong-token-123",
                                 socks_port=0))
    with trio.fail_after(5):
        with pytest.raises(BaseException) as raised:
            await client.run()
    leaf = raised.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, AuthError)


async def test_reconnect_after_server_restart(nursery):
    tokens = TokenTable()
    tokens.add_forward(TOKEN)
    echo = await serve_tcp(nursery, echo_handler)
    first_scope = trio.CancelScope()
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0), tokens)

    async def run_server(srv, scope, task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await srv.serve(task_status=task_status)

    port = await nursery.start(run_server, server, first_scope)
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{port}", token=TOKEN, socks_port=0,
                                 backoff_initial=0.1, backoff_max=0.5))
    socks_port = await nursery.start(client.run)
    assert await echo_roundtrip(socks_port, echo, b"before")
    first_scope.cancel()
    await wait_for(lambda: not client.sessions)
    # while the server is away, SOCKS5 clients fail fast instead of hanging
    with trio.fail_after(5):
        with pytest.raises(Socks5Failure):
            await socks_connect(socks_port, "127.0.0.1", echo)
    second = Server(ServerConfig(ws_host="127.0.0.1", ws_port=port), tokens)
    await nursery.start(run_server, second, trio.CancelScope())
    await wait_for(lambda: client.sessions, timeout=10)
    assert await echo_roundtrip(socks_port, echo, b"after")


async def test_provider_reconnects_without_server_restart(nursery):
    server = await start_server(nursery, reverse=[(REV, {})])
    echo = await serve_tcp(nursery, echo_handler)
    provider, _ = await start_client(nursery, server, REV, reverse=True, backoff_initial=0.1)
    port = socks_port_of(server, REV)
    assert await echo_roundtrip(port, echo, b"one")
    for session in list(server.services[REV].pool):
        session.close(1001, "test: drop the provider")
    await wait_for(lambda: len(server.services[REV].pool) == 0 or
                   all(s not in provider.sessions for s in server.services[REV].pool))
    await wait_for(lambda: len(server.services[REV].pool) == 1, timeout=10)
    assert await echo_roundtrip(port, echo, b"two")


async def test_no_reconnect_exits_on_loss(nursery):
    server = await start_server(nursery)
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{server.port}", token=TOKEN, socks_port=0,
                                 reconnect=False))
    done = trio.Event()
    outcome = []

    async def run():
        try:
            await client.run()
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    nursery.start_soon(run)
    await wait_for(lambda: client.sessions)
    for session in list(server.sessions):
        session.close(1001, "bye")
    with trio.fail_after(5):
        await done.wait()
    leaf = outcome[0]
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, TunnelError)


async def test_agent_mode_slow_reader_gets_everything(nursery, monkeypatch):
    import hashlib

    from trisocks.net import channel as channel_module
    from trisocks.tunnel import bridge as bridge_module

    monkeypatch.setattr(channel_module, "LINGER", 0.3)
    monkeypatch.setattr(bridge_module, "LINGER", 0.3)
    answer = os.urandom(6 << 20)

    async def say_and_close(stream):
        await stream.send_all(answer)
        await stream.aclose()

    port = await serve_tcp(nursery, say_and_close)
    server = await start_server(nursery, reverse=[(REV, {})], connectors=[(CONN, REV)])
    await start_client(nursery, server, REV, reverse=True)
    connector, _ = await start_client(nursery, server, CONN)
    stream = await socks_connect(connector.socks_port, "127.0.0.1", port)
    got = bytearray()
    with trio.fail_after(30):
        while data := await stream.receive_some(32 << 10):
            got += data
            await trio.sleep(0.01)  # a slow reader
    assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()
    await stream.aclose()


async def test_autonomy_restarted_provider_takes_its_token_back(nursery):
    server = await start_server(nursery, reverse=[(REV, {"allow_manage_connector": True})])
    echo = await serve_tcp(nursery, echo_handler)
    first, first_scope = await start_client(nursery, server, REV, reverse=True,
                                            connector_token="ctok-restart-1")
    await wait_for(lambda: server.tokens.get("ctok-restart-1"))
    other, _ = await start_client(nursery, server, REV, reverse=True)
    # a live owner keeps its token: another provider cannot take it
    ok, error = await other.manage_connector(other.sessions[0], "ctok-restart-1", protocol.ADD)
    assert not ok and error == "token already exists"
    first_scope.cancel()
    await wait_for(lambda: len(server.services[REV].pool) == 1)
    # the same provider, restarted (a new process has a new instance id), gets it back
    second, _ = await start_client(nursery, server, REV, reverse=True, connector_token="ctok-restart-1")
    await wait_for(lambda: server.tokens.get("ctok-restart-1").owner == second.instance)
    connector, _ = await start_client(nursery, server, "ctok-restart-1")
    assert await echo_roundtrip(connector.socks_port, echo, b"through the restarted provider")
    assert second.handler.channels_opened == 1 and other.handler.channels_opened == 0
    # Partners: the connector reaches one provider; only the owner counts the connector
    await wait_for(lambda: connector.partners == 1 and second.partners == 1 and other.partners == 0)


async def test_server_shutdown_says_going_away(nursery):
    tokens = TokenTable()
    tokens.add_forward(TOKEN)
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0), tokens)
    scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await server.serve(task_status=task_status)

    port = await nursery.start(run_server)
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{port}", token=TOKEN, socks_port=0,
                                 backoff_initial=5))
    await nursery.start(client.run)
    session = client.sessions[0]
    scope.cancel()
    with trio.fail_after(5):
        await session.closed.wait()
    assert "1001" in session.close_reason
