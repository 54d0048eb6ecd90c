"""Upstream proxies in the tunnel: the server's target connections (-x on the server) and the
client's WebSocket connection (-x on the client, or the proxy environment variables)."""

from __future__ import annotations

import os

import pytest

from trisocks.net.upstream import parse_proxy
from trisocks.tunnel.client import Client, ClientConfig
from trisocks.tunnel.egress import proxy_dialer

from .inproc import TOKEN, echo_handler, echo_roundtrip, serve_tcp, start_tunnel
from .test_upstream import HttpProxy, Socks5Proxy, start


@pytest.mark.parametrize("kind", ["socks5", "http"])
async def test_server_reaches_targets_through_the_upstream(nursery, kind):
    proxy = Socks5Proxy(users={"up": "stream"}) if kind == "socks5" else HttpProxy(auth=("up", "stream"))
    proxy_port = await start(nursery, proxy)
    dialer = proxy_dialer(parse_proxy(f"{kind}://up:stream@127.0.0.1:{proxy_port}"))
    tunnel = await start_tunnel(nursery, server_cfg={"dialer": dialer})
    echo = await serve_tcp(nursery, echo_handler)
    for _ in range(3):
        assert await echo_roundtrip(tunnel.socks_port, echo, os.urandom(1 << 20))
    # every target connection went through the proxy, to the target we asked for
    assert proxy.relayed == 3
    if kind == "socks5":
        assert [(h, p) for _, h, p in proxy.requests] == [("127.0.0.1", echo)] * 3
    else:
        assert proxy.targets == [f"127.0.0.1:{echo}"] * 3


async def test_server_reports_upstream_refusal_as_socks_failure(nursery):
    from .inproc import Socks5Failure, socks_connect

    proxy = Socks5Proxy(fail=5)  # connection refused
    proxy_port = await start(nursery, proxy)
    dialer = proxy_dialer(parse_proxy(f"socks5://127.0.0.1:{proxy_port}"))
    tunnel = await start_tunnel(nursery, server_cfg={"dialer": dialer})
    with pytest.raises(Socks5Failure) as failure:
        await socks_connect(tunnel.socks_port, "127.0.0.1", 9)
    assert failure.value.code == 5


@pytest.mark.parametrize("how", ["flag", "environment"])
async def test_client_reaches_the_server_through_a_proxy(nursery, monkeypatch, how):
    proxy = HttpProxy()
    proxy_port = await start(nursery, proxy)
    tunnel = await start_tunnel(nursery)  # a plain tunnel, only to get a server
    url = f"ws://127.0.0.1:{tunnel.ws_port}"
    if how == "flag":
        cfg = ClientConfig(url=url, token=TOKEN, socks_port=0,
                           upstream_proxy=f"http://127.0.0.1:{proxy_port}")
    else:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cfg = ClientConfig(url=url, token=TOKEN, socks_port=0)
    client = Client(cfg)
    socks_port = await nursery.start(client.run)
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(socks_port, echo, b"via the proxy")
    assert proxy.targets == [f"127.0.0.1:{tunnel.ws_port}"]


async def test_no_env_proxy_ignores_the_environment(nursery, monkeypatch):
    proxy = HttpProxy()
    proxy_port = await start(nursery, proxy)
    tunnel = await start_tunnel(nursery)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    client = Client(ClientConfig(url=f"ws://127.0.0.1:{tunnel.ws_port}", token=TOKEN, socks_port=0,
                                 env_proxy=False))
    socks_port = await nursery.start(client.run)
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(socks_port, echo, b"direct")
    assert proxy.accepted == 0


def test_malformed_proxy_url_is_a_startup_error():
    with pytest.raises(ValueError, match="unsupported scheme"):
        Client(ClientConfig(url="ws://127.0.0.1:1", upstream_proxy="ftp://x"))


async def test_rules_hold_through_the_upstream_proxy(nursery):
    """Through -x the proxy resolves names: the server checks the name, and the addresses its
    own resolver gives, before it asks the proxy (docs/policy.md)."""
    from trisocks.policy.rules import RuleSet

    from .inproc import Socks5Failure, socks_connect

    proxy = Socks5Proxy()
    proxy_port = await start(nursery, proxy)
    dialer = proxy_dialer(parse_proxy(f"socks5://127.0.0.1:{proxy_port}"))
    echo = await serve_tcp(nursery, echo_handler)
    rules = RuleSet.parse([f"allow 127.0.0.1:{echo}", "deny loopback", "deny .example.test"])
    tunnel = await start_tunnel(nursery, server_cfg={"dialer": dialer, "rules": rules})
    assert await echo_roundtrip(tunnel.socks_port, echo, b"allowed")
    for host, port in (("127.0.0.1", 9), ("localhost", 9), ("db.example.test", 80)):
        with pytest.raises(Socks5Failure) as failure:
            await socks_connect(tunnel.socks_port, host, port)
        assert failure.value.code == 2, (host, port)
    assert proxy.relayed == 1  # the refused ones never reached the proxy
    assert tunnel.server.refused_destinations == 3
