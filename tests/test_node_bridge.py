"""Reverse and agent modes across the nodes of a cluster (issue 13): a provider on node A, a
SOCKS5 client or a connector on node B, and the node-to-node bridge between them
(trisocks.tunnel.nodes). Two real servers in the test's process on 127.0.0.1, each with its
own node listener; each one's ``peers`` names the other."""

from __future__ import annotations

import hashlib
import logging
import os
import string

import pytest
import trio

from trisocks.tunnel import nodes
from trisocks.tunnel.client import Client, ClientConfig
from trisocks.tunnel.nodes import BRIDGE_PREFIX, BridgeKeys, StaticPeers, bridge_token
from trisocks.tunnel.server import Server, ServerConfig
from trisocks.tunnel.tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable, generate
from trisocks.wire import socks5
from trisocks.wire.errors import AuthError

from .inproc import (
    Socks5Failure,
    echo_handler,
    echo_roundtrip,
    firehose_handler,
    serve_tcp,
    socks_connect,
)
from .test_modes import start_client, wait_for

REV = "reverse-token-0123456789"
CONN = "connector-token-0123456789"
SECRET = b"cluster-secret-for-tests-0123456789"
MiB = 1 << 20


# -- the bridge token -----------------------------------------------------------------------


def test_bridge_token_shape():
    token = bridge_token(SECRET, REV)
    assert token.startswith(BRIDGE_PREFIX)
    assert token == bridge_token(SECRET, REV)  # the same on every node
    assert len(token.encode()) <= 255 and token.isascii()
    assert token != bridge_token(SECRET + b"x", REV)
    assert token != bridge_token(SECRET, REV + "x")
    assert REV not in token and SECRET.decode() not in token  # neither is readable from it
    # Generated tokens and user keys (url-safe base64) can never look like a bridge token,
    # and no configured token may start with the prefix.
    alphabet = set(string.ascii_letters + string.digits + "-_")
    assert not set(BRIDGE_PREFIX) <= alphabet
    assert all(set(generate(n)) <= alphabet for n in (16, 24) for _ in range(50))
    with pytest.raises(ValueError, match="reserved"):
        TokenTable().add(TokenInfo(token, REVERSE))
    with pytest.raises(ValueError, match="reserved"):
        TokenTable().add_forward(BRIDGE_PREFIX + "mine")


def test_bridge_keys_recognise_only_the_right_token(monkeypatch):
    keys = BridgeKeys()
    token = bridge_token(SECRET, REV)
    compared = []
    real = nodes.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(nodes.hmac, "compare_digest", spy)
    assert keys.recognise(SECRET, token, [REV, "other-reverse-token"]) == REV
    assert compared == [(token.encode(), token.encode())]  # the last word is constant-time
    assert keys.recognise(None, token, [REV]) is None  # no secret here: no bridges at all
    assert keys.recognise(b"another-secret-0123456789", token, [REV]) is None
    assert keys.recognise(SECRET, token, ["other-reverse-token"]) is None  # not ours (any more)
    assert keys.recognise(SECRET, token[:-1] + ("A" if token[-1] != "A" else "B"), [REV]) is None
    assert keys.recognise(SECRET, token[len(BRIDGE_PREFIX):], [REV]) is None  # no prefix
    assert keys.recognise(SECRET, REV, [REV]) is None  # the reverse token itself
    # a new secret: the old tokens stop working, the new ones work
    assert keys.recognise(b"rotated-secret-0123456789", bridge_token(b"rotated-secret-0123456789",
                                                                     REV), [REV]) == REV
    assert keys.recognise(b"rotated-secret-0123456789", token, [REV]) is None


# -- two nodes ------------------------------------------------------------------------------


class Node:
    def __init__(self, server: Server, scope: trio.CancelScope) -> None:
        self.server = server
        self.scope = scope
        self.events: list[tuple[str, dict]] = []
        server.events = lambda kind, **fields: self.events.append((kind, fields))

    @property
    def socks_port(self) -> int:
        return self.server.services[REV].socks.port


async def start_node(nursery, *, secret: bytes | None = SECRET, **cfg) -> Node:
    tokens = TokenTable()
    tokens.add(TokenInfo(REV, REVERSE, port=0))
    tokens.add(TokenInfo(CONN, CONNECTOR, reverse_token=REV))
    cfg.setdefault("socks_nowait", True)  # B's port must open without a provider of its own
    server = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, node_listen=("127.0.0.1", 0),
                                 **cfg), tokens)
    server.cluster_secret = secret
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await server.serve(task_status=task_status)

    await nursery.start(run)
    return Node(server, scope)


@pytest.fixture
def clean_logs(caplog):
    """Whatever happens (a node dying included), nothing is logged as an error: no bug report,
    no traceback."""
    caplog.set_level(logging.INFO)
    yield caplog
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@pytest.fixture
async def cluster(nursery, clean_logs):
    """Nodes A (with a provider) and B (without), each naming the other as its peer."""
    a = await start_node(nursery)
    b = await start_node(nursery)
    a.server.peers = StaticPeers([b.server.node_url])
    b.server.peers = StaticPeers([a.server.node_url])
    provider, _ = await start_client(nursery, a.server, REV, reverse=True)
    await wait_for(lambda: a.server.provider_counts() == {REV: 1})
    assert b.server.provider_counts() == {REV: 0}
    return a, b, provider


def sender_of(size: int):
    """A target that sends ``size`` random bytes (after its sha256: 32 bytes) and closes."""
    blob = os.urandom(size)

    async def handler(stream):
        async with stream:
            await stream.send_all(hashlib.sha256(blob).digest())
            view = memoryview(blob)
            for i in range(0, size, MiB):
                await stream.send_all(view[i:i + MiB])

    return handler


async def sink(stream):
    """A target that reads until EOF and answers with the sha256 of what it read."""
    async with stream:
        digest = hashlib.sha256()
        async for data in stream:
            digest.update(data)
        await stream.send_all(digest.digest())


async def read_all(stream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(MiB):
        out += data
    return bytes(out)


async def test_node_url_and_provider_counts(nursery):
    lone = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0), TokenTable())
    await nursery.start(lone.serve)
    assert lone.node_url == "" and lone.peers is None and lone.cluster_secret is None
    node = await start_node(nursery)
    server = node.server
    assert server.node_url == f"ws://127.0.0.1:{server.nodes.port}" != f"ws://127.0.0.1:{server.port}"
    assert ("127.0.0.1", server.nodes.port) in server._own_listeners()  # tunnel users cannot dial it
    assert server.provider_counts() == {REV: 0}
    given = Server(ServerConfig(ws_host="127.0.0.1", ws_port=0, node_url="ws://10.0.0.7:8765"),
                   TokenTable())
    assert given.node_url == "ws://10.0.0.7:8765"
    # the node listener is the same front door: a provider may connect there too
    await start_client(nursery, server, REV, reverse=True)
    await wait_for(lambda: server.provider_counts() == {REV: 1})


async def test_bulk_both_ways_through_the_bridge(nursery, cluster):
    a, b, provider = cluster
    down = await serve_tcp(nursery, sender_of(100 * MiB))
    up = await serve_tcp(nursery, sink)
    with trio.fail_after(30):
        stream = await socks_connect(b.socks_port, "127.0.0.1", down)
        got = await read_all(stream)
        await stream.aclose()
        assert len(got) == 32 + 100 * MiB
        assert hashlib.sha256(got[32:]).digest() == got[:32]

        payload = os.urandom(100 * MiB)
        stream = await socks_connect(b.socks_port, "127.0.0.1", up)
        view = memoryview(payload)
        for i in range(0, len(payload), MiB):
            await stream.send_all(view[i:i + MiB])
        await stream.send_eof()  # half-close: the answer still comes back
        assert await read_all(stream) == hashlib.sha256(payload).digest()
        await stream.aclose()
    assert provider.handler.channels_opened == 2
    # one bridge session carried both; internal: no client of either node, no events
    assert b.server.nodes.opened == 1 and len(a.server.nodes.incoming) == 1
    assert [i.kind for i in a.server.session_tokens()] == [REVERSE]
    assert b.server.session_tokens() == []
    assert not [e for e in a.events if e[1].get("role") == CONNECTOR]


async def test_many_parallel_small_requests(nursery, cluster):
    a, b, provider = cluster
    echo = await serve_tcp(nursery, echo_handler)
    results = []
    limit = trio.Semaphore(50)

    async def one(i):
        async with limit:
            results.append(await echo_roundtrip(b.socks_port, echo, os.urandom(1024 + i)))

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for i in range(300):
                inner.start_soon(one, i)
    assert results == [True] * 300
    assert provider.handler.channels_opened == 300
    assert b.server.nodes.opened == 1 and len(a.server.nodes.incoming) == 1


async def test_a_connector_on_b_reaches_the_provider_on_a(nursery, cluster):
    a, b, provider = cluster
    echo = await serve_tcp(nursery, echo_handler)
    connector, _ = await start_client(nursery, b.server, CONN)
    with trio.fail_after(20):
        assert await echo_roundtrip(connector.socks_port, echo, os.urandom(8 * MiB))
        assert all([await echo_roundtrip(connector.socks_port, echo, b"x" * n) for n in range(1, 20)])
    assert provider.handler.channels_opened == 20
    assert b.server.nodes.opened == 1
    # the connector is B's client (metered there), the bridge is no client of A's
    assert sorted(i.kind for i in b.server.session_tokens()) == [CONNECTOR]
    assert [i.kind for i in a.server.session_tokens()] == [REVERSE]


async def test_a_local_provider_comes_first(nursery, cluster):
    a, b, _ = cluster
    echo = await serve_tcp(nursery, echo_handler)
    local, _ = await start_client(nursery, b.server, REV, reverse=True)
    await wait_for(lambda: b.server.provider_counts() == {REV: 1})
    for _ in range(5):
        assert await echo_roundtrip(b.socks_port, echo, b"stays on B")
    assert local.handler.channels_opened == 5 and b.server.nodes.opened == 0


async def test_a_wrong_secret_is_refused_and_the_client_hears_it_at_once(nursery, clean_logs):
    a = await start_node(nursery)
    b = await start_node(nursery, secret=b"not-the-cluster-secret-0123")  # provider_wait: 10 s
    b.server.peers = StaticPeers([a.server.node_url])
    await start_client(nursery, a.server, REV, reverse=True)
    await wait_for(lambda: a.server.provider_counts() == {REV: 1})
    echo = await serve_tcp(nursery, echo_handler)
    start = trio.current_time()
    for _ in range(3):
        with trio.fail_after(5), pytest.raises(Socks5Failure) as failure:
            await socks_connect(b.socks_port, "127.0.0.1", echo)
        assert failure.value.code == socks5.NETWORK_UNREACHABLE
    assert trio.current_time() - start < 3  # far from provider_wait: no node could take it
    # A refused it as it refuses a wrong token, and counted it; a peer that failed is not
    # dialled again for every request
    assert [kind for kind, _ in a.events] == ["auth_success", "auth_failure"]
    assert not a.server.nodes.incoming and b.server.nodes.opened == 0
    warnings = [r for r in clean_logs.records if "node bridge to" in r.getMessage()]
    assert len(warnings) == 1 and "invalid token" in warnings[0].getMessage()


async def test_bridge_tokens_a_node_does_not_accept(nursery, clean_logs):
    a = await start_node(nursery)
    lone = await start_node(nursery, secret=None)

    async def auth(node: Node, token: str, reverse: bool = False) -> str:
        client = Client(ClientConfig(url=f"ws://127.0.0.1:{node.server.nodes.port}", token=token,
                                     reverse=reverse, env_proxy=False))
        try:
            session = await client.connect()
        except AuthError as exc:
            return str(exc)
        session.close()
        return "accepted"

    assert await auth(a, bridge_token(SECRET, REV)) == "accepted"
    # for a reverse token A does not have, with another secret, as a provider, without one
    assert "invalid token" in await auth(a, bridge_token(SECRET, "a-token-a-does-not-have"))
    assert "invalid token" in await auth(a, bridge_token(b"another-secret-0123456", REV))
    assert "invalid token" in await auth(a, bridge_token(SECRET, REV), reverse=True)
    assert "invalid token" in await auth(lone, bridge_token(SECRET, REV))
    failures = [f for kind, f in a.events if kind == "auth_failure"]
    assert len(failures) == 3
    assert a.server.auth_limiter.retry_after("127.0.0.1") == 0  # counted, below the threshold


async def test_a_node_dying_cuts_only_its_channels(nursery, cluster, clean_logs, monkeypatch):
    a, b, _ = cluster
    monkeypatch.setattr(nodes, "DOWN_HOLD", 0.2)
    firehose = await serve_tcp(nursery, firehose_handler())
    echo = await serve_tcp(nursery, echo_handler)
    # another reverse token of B's, with a provider on B: a channel that needs no other node
    other = await b.server.add_reverse_token("another-reverse-token-0123", port=0)
    await start_client(nursery, b.server, other.token, reverse=True)
    await wait_for(lambda: b.server.provider_count(other.token) == 1)
    local = await socks_connect(b.server.reverse_port(other.token), "127.0.0.1", echo)
    bridged = await socks_connect(b.socks_port, "127.0.0.1", firehose)
    assert len(await bridged.receive_some(MiB)) > 0  # the bridged transfer runs
    a.scope.cancel()  # node A stops (its provider and the bridge session go with it)
    with trio.fail_after(10):
        try:
            while await bridged.receive_some(MiB):
                pass
        except trio.BrokenResourceError:
            pass  # a reset is a fine end too: what matters is that it ends
    await bridged.aclose()
    await wait_for(lambda: not b.server.nodes.links)
    # B's own channel goes on
    await local.send_all(b"still here")
    with trio.fail_after(5):
        assert await local.receive_some(100) == b"still here"
    await local.aclose()
    # B stays up: new requests for A's token fail with the usual reply, within the timeouts
    for _ in range(3):
        with trio.fail_after(5), pytest.raises(Socks5Failure) as failure:
            await socks_connect(b.socks_port, "127.0.0.1", echo)
        assert failure.value.code == socks5.NETWORK_UNREACHABLE
    # the peer's loss is logged once, not once per channel or request
    warnings = [r.getMessage() for r in clean_logs.records if "node bridge to" in r.getMessage()]
    assert len(warnings) == 1 and "bridge session lost" in warnings[0], warnings
    # and when a provider of that token comes to B, B serves it itself
    await start_client(nursery, b.server, REV, reverse=True)
    await wait_for(lambda: b.server.provider_counts()[REV] == 1)
    assert await echo_roundtrip(b.socks_port, echo, b"B is fine")


async def test_an_idle_bridge_closes_and_reopens_on_demand(nursery, cluster, monkeypatch):
    a, b, provider = cluster
    monkeypatch.setattr(nodes, "IDLE_CLOSE", 0.3)
    monkeypatch.setattr(nodes, "IDLE_CHECK", 0.05)
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(b.socks_port, echo, b"one")
    await wait_for(lambda: not b.server.nodes.links and not a.server.nodes.incoming)
    assert await echo_roundtrip(b.socks_port, echo, b"two")
    assert b.server.nodes.opened == 2 and provider.handler.channels_opened == 2


async def test_a_bridged_channel_is_never_bridged_again(nursery, clean_logs):
    # A's provider has just left, but the peers still say A has one, and A's peers say B has:
    # the channel bridged from B to A waits for a provider of A's own, then fails; no loop
    a = await start_node(nursery, provider_wait=0.5)
    b = await start_node(nursery, provider_wait=0.5)
    a.server.peers = StaticPeers([b.server.node_url])
    b.server.peers = StaticPeers([a.server.node_url])
    echo = await serve_tcp(nursery, echo_handler)
    with trio.fail_after(5), pytest.raises(Socks5Failure) as failure:
        await socks_connect(b.socks_port, "127.0.0.1", echo)
    assert failure.value.code == socks5.NETWORK_UNREACHABLE  # "no provider available" from A
    assert b.server.nodes.opened == 1 and a.server.nodes.opened == 0
    assert len(a.server.nodes.incoming) == 1 and not b.server.nodes.incoming


async def test_udp_associate_through_the_bridge(nursery, cluster):
    from .test_modes import udp_echo, udp_roundtrips

    a, b, provider = cluster
    echo = await udp_echo(nursery)
    await udp_roundtrips(b.socks_port, echo)
    assert b.server.nodes.opened == 1 and len(a.server.nodes.incoming) == 1  # it went via A
