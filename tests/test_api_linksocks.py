"""The LinkSocks-compatible token API (issue 4, point 2): every example of LinkSocks's
docs/guide/http-api.md over real HTTP, with exactly the documented JSON; tokens created
through it carry traffic at once, and deleting them cuts the traffic off."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import trio

from trisocks._version import __version__
from trisocks.wire import protocol

from .api_support import KEY, http, running_api, start_api_server, wait_until
from .inproc import RawPeer, Socks5Failure, echo_handler, echo_roundtrip, serve_tcp, socks_connect
from .support.curl import curl
from .support.peers import start_linksocks_client
from .support.procs import free_port, start_with_free_ports
from .support.tools import clean_env, require_peer

# LinkSocks's Go client library sends its whole TokenRequest struct, zero values included
GO_ZERO_STRUCT = {"type": "forward", "token": "", "port": 0, "username": "", "password": "",
                  "reverse_token": "", "allow_manage_connector": False}


async def test_every_documented_example_answers_exactly_as_documented():
    async with running_api() as api:
        # GET /api/status (no token yet)
        r = await api.get("/api/status", headers={"X-API-Key": KEY})
        assert r.status_code == 200
        assert r.json() == {"version": __version__, "tokens": []}

        # POST /api/token, forward
        r = await api.post("/api/token", json={"type": "forward", "token": "my_forward_token"},
                           headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_forward_token"})

        # the quick start's example
        r = await api.post("/api/token", json={"type": "forward", "token": "my_token"})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_token"})

        # POST /api/token, reverse, with every documented parameter
        port = free_port()
        r = await api.post("/api/token", json={
            "type": "reverse", "token": "my_reverse_token", "port": port, "username": "socks_user",
            "password": "socks_pass"})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_reverse_token",
                                                   "port": port})
        # autonomy mode: no SOCKS5 port at all, -1 as LinkSocks says
        r = await api.post("/api/token", json={"type": "reverse", "token": "my_autonomy_token",
                                               "allow_manage_connector": True})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_autonomy_token",
                                                   "port": -1})

        # POST /api/token, connector
        r = await api.post("/api/token", json={"type": "connector", "token": "my_connector_token",
                                               "reverse_token": "my_reverse_token"})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_connector_token"})

        # GET /api/status lists them as documented
        r = await api.get("/api/status")
        body = r.json()
        assert body["version"] == __version__
        assert sorted(body["tokens"], key=lambda t: t["token"]) == [
            {"token": "my_autonomy_token", "type": "reverse", "clients_count": 0, "port": -1},
            {"token": "my_forward_token", "type": "forward", "clients_count": 0},
            {"token": "my_reverse_token", "type": "reverse", "clients_count": 0, "port": port,
             "connector_tokens": ["my_connector_token"]},
            {"token": "my_token", "type": "forward", "clients_count": 0},
        ]

        # DELETE /api/token/{token}
        r = await api.delete("/api/token/my_token")
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_token"})

        # DELETE /api/token with a body
        r = await api.request("DELETE", "/api/token", json={"token": "my_forward_token"})
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_forward_token"})

        # the reverse token's connector goes with it
        r = await api.delete("/api/token/my_reverse_token")
        assert (r.status_code, r.json()) == (200, {"success": True, "token": "my_reverse_token"})
        assert (await api.delete("/api/token/my_autonomy_token")).status_code == 200
        assert (await api.get("/api/status")).json() == {"version": __version__, "tokens": []}

        # tokens are generated when not given; ports allocated when not given
        r = await api.post("/api/token", json={"type": "forward"})
        assert r.status_code == 200 and r.json()["success"] and len(r.json()["token"]) >= 16
        r = await api.post("/api/token", json={"type": "reverse"})
        body = r.json()
        assert r.status_code == 200 and body["success"] and 0 < body["port"] < 65536
        assert set(body) == {"success", "token", "port"}
        # what LinkSocks's Go client sends: every field, zero values for those not used
        r = await api.post("/api/token", json=GO_ZERO_STRUCT)
        assert r.status_code == 200 and r.json()["success"]


async def test_documented_errors_have_the_exact_messages_and_codes():
    async with running_api() as api:
        async def call(method, path, *, key=KEY, **kw):
            r = await api.anon.request(method, path, headers={"X-API-Key": key} if key else {}, **kw)
            return r.status_code, r.json()

        bad_key = (401, {"success": False, "error": "invalid API key"})
        assert await call("GET", "/api/status", key="wrong") == bad_key
        assert await call("GET", "/api/status", key=None) == bad_key
        assert await call("POST", "/api/token", key="wrong", json={"type": "forward"}) == bad_key
        assert await call("POST", "/api/token", content=b'{"type": "forward",') == (
            400, {"success": False, "error": "invalid request body"})
        assert await call("POST", "/api/token", json={"type": "socks4"}) == (
            400, {"success": False, "error": "invalid token type"})
        assert await call("DELETE", "/api/token", json={}) == (
            400, {"success": False, "error": "token not specified"})
        assert await call("DELETE", "/api/token", content=b"not json") == (
            400, {"success": False, "error": "token not specified"})
        assert await call("POST", "/api/token", json={"type": "connector", "token": "c1"}) == (
            400, {"success": False, "error": "reverse_token is required for connector token"})
        assert await call("DELETE", "/api/token/no-such-token") == (
            404, {"success": False, "error": "token not found"})
        assert await call("DELETE", "/api/token", json={"token": "no-such-token"}) == (
            404, {"success": False, "error": "token not found"})
        # and the ones LinkSocks has no fixed text for
        assert (await call("POST", "/api/token", json={"type": "forward", "token": "anonymous"}))[0] == 400
        assert (await call("POST", "/api/token", json={"type": "connector",
                                                       "reverse_token": "nope"}))[0] == 400
        assert await call("POST", "/api/token", json={"type": "forward", "token": "dup"}) == (
            200, {"success": True, "token": "dup"})
        assert await call("POST", "/api/token", json={"type": "reverse", "token": "dup"}) == (
            409, {"success": False, "error": "token already exists"})


async def test_a_token_created_through_the_api_carries_traffic_and_delete_cuts_it_off():
    async with running_api() as api, trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        r = await api.post("/api/token", json={"type": "forward", "token": "api-made-token-1"})
        assert r.json()["success"]
        socks_port = await api.client(nursery, "api-made-token-1")
        assert await echo_roundtrip(socks_port, echo, b"through the api token" * 1000)
        status = (await api.get("/api/status")).json()
        assert status["tokens"] == [{"token": "api-made-token-1", "type": "forward",
                                     "clients_count": 1}]

        live = await socks_connect(socks_port, "127.0.0.1", echo)
        await live.send_all(b"ping")
        assert await live.receive_some(10) == b"ping"

        r = await api.delete("/api/token/api-made-token-1")
        assert r.json() == {"success": True, "token": "api-made-token-1"}
        # the open connection is cut...
        with trio.fail_after(5):
            while await live.receive_some(100):
                pass
        # ...the client's session is gone (its reconnect is refused, which ends it)...
        await wait_until(lambda: api.refusals, "the client to be refused")
        assert "invalid token" in api.refusals[0]
        # ...and a fresh authentication with the token is refused
        peer = await RawPeer.connect(api.port)
        reply = await peer.authenticate("api-made-token-1")
        assert isinstance(reply, protocol.AuthResponse) and not reply.success
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_a_reverse_token_from_the_api_opens_its_socks5_port_and_delete_closes_it():
    async with running_api() as api, trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        r = await api.post("/api/token", json={"type": "reverse", "token": "rev-api-token-1",
                                               "username": "u1", "password": "p1"})
        port = r.json()["port"]
        await api.client(nursery, "rev-api-token-1", reverse=True)  # a provider
        await wait_until(lambda: api.server.services["rev-api-token-1"].pool.sessions,
                         "the provider to join")
        with trio.fail_after(10):
            stream = await socks_connect(port, "127.0.0.1", echo, auth=("u1", "p1"))
        await stream.send_all(b"via the provider")
        assert await stream.receive_some(100) == b"via the provider"
        try:
            await socks_connect(port, "127.0.0.1", echo, auth=("u1", "wrong"))
            raise AssertionError("wrong SOCKS5 password accepted")
        except Socks5Failure:
            pass
        status = (await api.get("/api/status")).json()["tokens"]
        assert status == [{"token": "rev-api-token-1", "type": "reverse", "clients_count": 1,
                           "port": port}]

        assert (await api.delete("/api/token/rev-api-token-1")).status_code == 200
        with trio.fail_after(5):
            while await stream.receive_some(100):
                pass

        def port_closed() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) != 0

        await wait_until(port_closed, "the SOCKS5 port to close")
        nursery.cancel_scope.cancel()


async def test_a_reverse_token_on_a_taken_port_is_refused_and_leaves_nothing_behind():
    async with running_api() as api:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            r = await api.post("/api/token", json={"type": "reverse", "token": "rev-x", "port": port})
            assert (r.status_code, r.json()) == (409, {"success": False,
                                                       "error": f"cannot allocate port: {port}"})
        assert (await api.get("/api/status")).json()["tokens"] == []
        assert "rev-x" not in api.server.services


# -- the same requests against LinkSocks itself ----------------------------------------------------

LINKSOCKS_WITH_API = """
import signal, sys, threading
import linksocks
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
server = linksocks.Server(ws_host="127.0.0.1", ws_port=int(sys.argv[1]), socks_host="127.0.0.1",
                          api_key=sys.argv[2])
server.wait_ready(timeout=10)
print("linksocks api ready", flush=True)
while not stop.wait(0.5):
    pass
server.close()
"""


@pytest.mark.interop
def test_the_same_requests_get_the_same_answers_from_linksocks(procs, tmp_path):
    """Differential: LinkSocks 1.8.9 and trisocks, the documented requests, the same JSON
    (LinkSocks adds an undocumented ``direct`` section and prefixes its version with v; the
    status codes of its 200-with-an-error answers differ, see docs/api.md)."""
    require_peer("linksocks")
    script = tmp_path / "linksocks_api.py"
    script.write_text(LINKSOCKS_WITH_API)

    def ready(proc, ports):
        proc.wait_for_log("linksocks api ready", 30)
        proc.wait_for_port(ports[0])

    linksocks_proc, (ls_port,) = start_with_free_ports(
        procs, lambda port: [sys.executable, str(script), str(port), KEY], ready, 1,
        name="linksocks-api", env=clean_env())
    ours = start_api_server(procs, db=tmp_path / "t.db")
    bases = {"linksocks": f"http://127.0.0.1:{ls_port}", "trisocks": ours.http_url}
    socks_ports = {"linksocks": free_port(), "trisocks": free_port()}

    def both(method, path, body=None, key=KEY, raw=None):
        answers = {}
        for name, base in bases.items():
            text = raw if raw is not None else (
                json.dumps(body).replace("\"SOCKSPORT\"", str(socks_ports[name])) if body else None)
            r = http(method, base + path, key=key, content=text)
            data = r.json()
            data.pop("direct", None)
            if "version" in data:
                data["version"] = "X"
            if data.get("port") == socks_ports[name]:
                data["port"] = "P"
            for t in data.get("tokens", []):
                if t.get("port") == socks_ports[name]:
                    t["port"] = "P"
            if "tokens" in data:
                data["tokens"].sort(key=lambda t: t["token"])
            answers[name] = (r.status_code, data)
        return answers["linksocks"], answers["trisocks"]

    def same(method, path, body=None, **kw):
        theirs, mine = both(method, path, body, **kw)
        assert mine == theirs, (method, path, body)
        return mine

    def same_body(method, path, body=None, **kw):
        (_, theirs), (_, mine) = both(method, path, body, **kw)
        assert mine == theirs, (method, path, body)

    assert same("GET", "/api/status") == (200, {"version": "X", "tokens": []})
    same("POST", "/api/token", {"type": "forward", "token": "my_forward_token"})
    same("POST", "/api/token", {"type": "reverse", "token": "my_reverse_token", "port": "SOCKSPORT",
                                "username": "socks_user", "password": "socks_pass"})
    same("POST", "/api/token", {"type": "connector", "token": "my_connector_token",
                                "reverse_token": "my_reverse_token"})
    same("POST", "/api/token", GO_ZERO_STRUCT | {"token": "go-style-token"})
    status = same("GET", "/api/status")
    assert len(status[1]["tokens"]) == 3
    same("DELETE", "/api/token/my_connector_token")
    same("DELETE", "/api/token", {"token": "my_forward_token"})
    same("GET", "/api/status")
    # errors: the same text (LinkSocks answers some of them with 200)
    same("GET", "/api/status", key="wrong")
    same("POST", "/api/token", raw='{"type": "forward",')
    same("POST", "/api/token", {"type": "socks4"})
    same_body("DELETE", "/api/token", {})
    same_body("POST", "/api/token", {"type": "connector", "token": "c1"})
    linksocks_proc.terminate()


@pytest.mark.interop
def test_a_linksocks_client_with_an_api_token_and_with_a_users_key(procs, tmp_path, payload_server):
    server = start_api_server(procs, db=tmp_path / "t.db")
    token = http("POST", f"{server.http_url}/api/token", json={"type": "forward"}).json()["token"]
    user = http("POST", f"{server.http_url}/api/users", json={"name": "go-client"}).json()
    for credential in (token, user["key"]):
        client = start_linksocks_client(procs, server.url, credential)
        curl(payload_server.url(f"/bytes/{1 << 20}"), socks=client.socks).check(200)
        client.proc.terminate()
    got = http("GET", f"{server.http_url}/api/users/{user['key']}").json()
    assert got["bytes_down"] > 1 << 20 and got["total_connections"] == 1
