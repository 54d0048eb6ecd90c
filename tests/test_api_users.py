"""Users (issue 4, point 3): the endpoints and their validation, and what they do to live
traffic through real clients: the quota cut, reset, limit changes, disable, expiry, rotation
and deletion, counters exact to the byte, reverse-mode SOCKS5 users, and subscriptions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from trisocks._version import __version__
from trisocks.wire import protocol, socks5

from .api_support import MiB, running_api, wait_until
from .inproc import (
    RawPeer,
    Socks5Failure,
    echo_handler,
    echo_roundtrip,
    firehose_handler,
    serve_tcp,
    socks_connect,
)
from .support.curl import curl
from .support.peers import start_trisocks_client

USER_FIELDS = {"key", "name", "id", "bytes_up", "bytes_down", "connections", "total_connections",
               "clients", "limit_bytes", "expires_at", "status", "blocked", "created_at",
               "last_seen", "policy", "rules_in_force", "live", "reset_strategy", "next_reset",
               "last_reset", "on_hold_duration"}
CUT_WITHIN = 1.0  # seconds: how fast a change must reach live traffic


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Live:
    """A connection through the tunnel that reads a firehose target until it ends."""

    received: int = 0
    ended: trio.Event = field(default_factory=trio.Event)
    ended_at: float = 0.0
    flowing: trio.Event = field(default_factory=trio.Event)


async def live_download(nursery, socks_port: int, target_port: int) -> Live:
    stream = await socks_connect(socks_port, "127.0.0.1", target_port)
    live = Live()

    async def reader():
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        break
                    live.received += len(data)
                    if live.received > 1 * MiB:
                        live.flowing.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            live.ended_at = trio.current_time()
            live.ended.set()

    nursery.start_soon(reader)
    with trio.fail_after(10):
        await live.flowing.wait()
    return live


async def assert_cut(live: Live, within: float = CUT_WITHIN) -> None:
    """The live connection ends within ``within`` seconds from now."""
    start = trio.current_time()
    with trio.move_on_after(within):
        await live.ended.wait()
    assert live.ended.is_set(), f"live traffic still flowing {within} s later"
    assert live.ended_at - start <= within


async def refused_reason(port: int, token: str) -> str | None:
    """Authenticate a raw WebSocket with ``token``: None if accepted, else the server's reason."""
    peer = await RawPeer.connect(port)
    try:
        reply = await peer.authenticate(token)
    finally:
        await peer.aclose()
    assert isinstance(reply, protocol.AuthResponse)
    return None if reply.success else reply.error


# -- endpoints -------------------------------------------------------------------------------------


async def test_user_endpoints_and_fields():
    async with running_api() as api:
        r = await api.post("/api/users")  # no body at all: everything generated
        assert r.status_code == 201
        anon = r.json()
        assert set(anon) == USER_FIELDS
        assert len(anon["key"]) == 32 and anon["name"].startswith("user-")
        assert anon | {"key": None, "name": None, "id": None, "created_at": None} == {
            "key": None, "name": None, "id": None, "created_at": None, "bytes_up": 0, "bytes_down": 0,
            "connections": 0, "total_connections": 0, "clients": 0, "limit_bytes": None,
            "expires_at": None, "status": "active", "blocked": None, "last_seen": None,
            "reset_strategy": "none", "next_reset": None, "last_reset": None,
            "on_hold_duration": None, "policy": {},
            "rules_in_force": [{"level": "server", "rules": ["deny own", "allow loopback"]},
                               {"level": "default", "rules": [
                "deny own", "deny loopback", "deny link-local", "deny unspecified",
                "deny multicast", "deny private"]}],
            "live": {"rate_up": 0.0, "rate_down": 0.0, "channels": 0, "devices": [], "refused": {}}}

        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        alice = await api.create_user(key="alice-key-0001", name="alice", limit_bytes=5 * MiB,
                                      expires_at=rfc3339(expires))
        assert alice["key"] == "alice-key-0001" and alice["name"] == "alice"
        assert alice["limit_bytes"] == 5 * MiB and alice["expires_at"] == rfc3339(expires)
        assert (await api.user("alice-key-0001")) == alice

        listed = (await api.get("/api/users")).json()
        assert listed["total"] == 2 and [u["name"] for u in listed["users"]] == [anon["name"], "alice"]
        status = (await api.get("/api/server/status")).json()
        assert status["version"] == __version__ and status["total_users"] == 2
        assert status["status"] == "running" and status["uptime_seconds"] >= 0

        r = await api.put("/api/users/alice-key-0001/limit", json={"limit_bytes": None})
        assert r.status_code == 200 and r.json()["limit_bytes"] is None
        r = await api.put("/api/users/alice-key-0001/expiry", json={"expires_at": None})
        assert r.json()["expires_at"] is None
        r = await api.patch("/api/users/alice-key-0001", json={"status": "disabled"})
        assert r.json()["status"] == "disabled" and r.json()["blocked"] == "disabled"
        r = await api.patch("/api/users/alice-key-0001", json={"status": "active", "name": "alice2"})
        assert (r.json()["status"], r.json()["name"], r.json()["blocked"]) == ("active", "alice2", None)
        r = await api.post("/api/users/alice-key-0001/rotate")
        new_key = r.json()["key"]
        assert r.status_code == 200 and new_key != "alice-key-0001" and len(new_key) == 32
        assert (await api.get("/api/users/alice-key-0001")).status_code == 404
        assert (await api.post(f"/api/users/{new_key}/reset")).json()["bytes_down"] == 0
        r = await api.delete(f"/api/users/{new_key}")
        assert (r.status_code, r.json()) == (200, {"success": True, "key": new_key})
        assert (await api.get(f"/api/users/{new_key}")).status_code == 404
        assert (await api.get("/api/server/status")).json()["total_users"] == 1


async def test_user_validation_and_conflicts():
    async with running_api(tokens=["a-plain-token"]) as api:
        await api.create_user(key="bob-key-00001", name="bob")

        async def status(method, path, **kw):
            r = await api.request(method, path, **kw)
            return r.status_code, r.json()

        assert await status("POST", "/api/users", json={"key": "bob-key-00001"}) == (
            409, {"success": False, "error": "key already exists"})
        assert await status("POST", "/api/users", json={"name": "bob"}) == (
            409, {"success": False, "error": "name already exists"})
        assert (await status("POST", "/api/users", json={"key": "a-plain-token"}))[0] == 409
        # the token API cannot take a user's key either, nor see it
        assert (await status("POST", "/api/token", json={"type": "forward",
                                                          "token": "bob-key-00001"}))[0] == 409
        assert (await status("DELETE", "/api/token/bob-key-00001"))[0] == 404
        assert [t["token"] for t in (await api.get("/api/status")).json()["tokens"]] == ["a-plain-token"]

        for body, field_name in (
            ({"limit_bytes": "lots"}, "limit_bytes"),
            ({"limit_bytes": -1}, "limit_bytes"),
            ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no time zone
            ({"expires_at": "next tuesday"}, "expires_at"),
            ({"key": "short"}, "key"),
            ({"key": "has space in it"}, "key"),
            ({"name": ""}, "name"),
            ({"status": "sleeping"}, "status"),
            ({"colour": "blue"}, "colour"),
        ):
            code, body_out = await status("POST", "/api/users", json=body)
            assert code == 422, (body, body_out)
            assert body_out["success"] is False and body_out["field"] == field_name, body_out
        assert await status("POST", "/api/users", content=b"{nope") == (
            400, {"success": False, "error": "invalid request body"})
        code, out = await status("PUT", "/api/users/bob-key-00001/limit", json={})
        assert (code, out["field"]) == (422, "limit_bytes")
        code, out = await status("PUT", "/api/users/bob-key-00001/expiry", json={"expires": None})
        assert code == 422
        assert (await status("PUT", "/api/users/bob-key-00001/limit", content=b""))[0] == 400
        assert await status("PUT", "/api/users/nobody-000/limit", json={"limit_bytes": 1}) == (
            404, {"success": False, "error": "user not found"})
        for path in ("/api/users/nobody-000/reset", "/api/users/nobody-000/rotate"):
            assert (await status("POST", path))[0] == 404
        assert (await status("PATCH", "/api/users/nobody-000", json={"status": "active"}))[0] == 404
        assert (await status("DELETE", "/api/users/nobody-000"))[0] == 404


# -- traffic -----------------------------------------------------------------------------------------


async def test_counters_are_exact_to_the_byte_for_finished_channels():
    async with running_api() as api, trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="carol")
        socks_port = await api.client(nursery, user["key"])
        sizes = [1, 70_001, 3 * MiB + 17]
        for size in sizes:
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            assert await echo_roundtrip(socks_port, echo, payload)
        await wait_until(lambda: not api.plane.users[user["key"]].channels, "channels to finish")
        got = await api.user(user["key"])
        assert got["bytes_up"] == sum(sizes) and got["bytes_down"] == sum(sizes)
        assert got["total_connections"] == 3 and got["connections"] == 0 and got["clients"] == 1
        assert got["last_seen"] is not None
        stats = (await api.get("/api/stats")).json()
        (mine,) = [u for u in stats["users"] if u["name"] == "carol"]
        assert (mine["bytes_up"], mine["bytes_down"]) == (sum(sizes), sum(sizes))
        assert stats["totals"]["bytes_up"] >= sum(sizes)
        nursery.cancel_scope.cancel()


async def test_a_50_mib_limit_cuts_a_100_mib_download_near_50_mib_and_reset_restores_it(payload_server):
    async with running_api() as api, trio.open_nursery() as nursery:
        user = await api.create_user(name="dave", limit_bytes=50 * MiB)
        key = user["key"]
        socks_port = await api.client(nursery, key)
        socks = f"127.0.0.1:{socks_port}"
        result = await trio.to_thread.run_sync(
            lambda: curl(payload_server.url(f"/bytes/{100 * MiB}"), socks=socks, timeout=60))
        assert result.returncode != 0, "the download should have been cut"
        assert 49 * MiB <= result.size <= 50 * MiB, result.size
        await wait_until(lambda: not api.plane.users[key].channels, "the channel to finish")
        got = await api.user(key)
        assert 49 * MiB <= got["bytes_down"] <= 50 * MiB
        assert got["bytes_up"] + got["bytes_down"] <= 50 * MiB
        assert got["bytes_down"] >= result.size
        assert got["blocked"] == "traffic limit reached"
        events = (await api.get("/api/events", params={"user": key, "type": "quota_exceeded"})).json()
        assert [e["user"] for e in events["events"]] == ["dave"]

        # over the limit: new connections are refused on the same session (the forward
        # client turns the server's reason into a SOCKS5 failure reply)
        try:
            await socks_connect(socks_port, "127.0.0.1", payload_server.port)
            raise AssertionError("a connection was allowed over the limit")
        except Socks5Failure as exc:
            assert exc.code != socks5.SUCCEEDED

        # reset: the same client, still connected, downloads again at once
        r = await api.post(f"/api/users/{key}/reset")
        assert r.json()["bytes_down"] == 0 and r.json()["blocked"] is None
        again = await trio.to_thread.run_sync(
            lambda: curl(payload_server.url(f"/bytes/{2 * MiB}"), socks=socks))
        again.check(200)
        assert again.size == 2 * MiB
        await wait_until(lambda: not api.plane.users[key].channels, "the channel to finish")
        got = await api.user(key)
        assert 2 * MiB < got["bytes_down"] < 2 * MiB + 4096
        assert api.refusals == []
        nursery.cancel_scope.cancel()


async def test_limit_changes_take_effect_on_live_traffic():
    async with running_api() as api, trio.open_nursery() as nursery:
        hose = await serve_tcp(nursery, firehose_handler())
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="erin")
        key = user["key"]
        socks_port = await api.client(nursery, key)

        # lowering the limit below what is used cuts a live download
        live = await live_download(nursery, socks_port, hose)
        r = await api.put(f"/api/users/{key}/limit", json={"limit_bytes": 1 * MiB})
        assert r.json()["blocked"] == "traffic limit reached"
        await assert_cut(live)

        # raising it lets traffic flow again, on the same session
        limit = (await api.user(key))["bytes_down"] + 20 * MiB
        r = await api.put(f"/api/users/{key}/limit", json={"limit_bytes": limit})
        assert r.json()["blocked"] is None
        assert await echo_roundtrip(socks_port, echo, b"z" * 100_000)

        # crossing the limit on one connection closes the user's idle ones within a second
        idle = await socks_connect(socks_port, "127.0.0.1", echo)
        idle_live = Live()

        async def idle_reader():
            async with idle:
                try:
                    while await idle.receive_some(100):
                        pass
                except (trio.BrokenResourceError, OSError):
                    pass
            idle_live.ended_at = trio.current_time()
            idle_live.ended.set()

        nursery.start_soon(idle_reader)
        cut = await live_download(nursery, socks_port, hose)
        with trio.fail_after(10):
            await cut.ended.wait()
        with trio.fail_after(CUT_WITHIN + 0.5):
            await idle_live.ended.wait()
        assert idle_live.ended_at - cut.ended_at <= CUT_WITHIN
        got = await api.user(key)
        assert got["blocked"] == "traffic limit reached"
        nursery.cancel_scope.cancel()


async def test_disable_and_enable_on_live_traffic():
    async with running_api() as api, trio.open_nursery() as nursery:
        hose = await serve_tcp(nursery, firehose_handler())
        user = await api.create_user(name="frank")
        key = user["key"]
        socks_port = await api.client(nursery, key)
        live = await live_download(nursery, socks_port, hose)
        r = await api.patch(f"/api/users/{key}", json={"status": "disabled"})
        assert r.json()["blocked"] == "disabled"
        await assert_cut(live)
        # the session is closed too, and the key is refused with the reason
        await wait_until(lambda: api.refusals, "the client to be refused")
        assert "disabled" in api.refusals[0]
        assert await refused_reason(api.port, key) == "disabled"
        answer = await api.get("/api/events", params={"user": "frank"})
        events = [e["type"] for e in answer.json()["events"]]
        assert "auth_failure" in events and "user_updated" in events
        # enabled again: a client gets in and moves traffic
        await api.patch(f"/api/users/{key}", json={"status": "active"})
        assert await refused_reason(api.port, key) is None
        socks_port = await api.client(nursery, key)
        live = await live_download(nursery, socks_port, hose)
        assert not live.ended.is_set()
        nursery.cancel_scope.cancel()


async def test_a_past_expiry_and_an_expiry_passing_cut_live_traffic():
    async with running_api() as api, trio.open_nursery() as nursery:
        hose = await serve_tcp(nursery, firehose_handler())
        user = await api.create_user(name="grace")
        key = user["key"]
        socks_port = await api.client(nursery, key)

        # an expiry in the past: at once
        live = await live_download(nursery, socks_port, hose)
        past = rfc3339(datetime.now(UTC) - timedelta(minutes=5))
        r = await api.put(f"/api/users/{key}/expiry", json={"expires_at": past})
        assert r.json()["blocked"] == "expired"
        await assert_cut(live)
        assert await refused_reason(api.port, key) == "expired"

        # an expiry that passes while traffic flows: within a second of it
        user2 = await api.create_user(name="heidi")
        socks2 = await api.client(nursery, user2["key"])
        live2 = await live_download(nursery, socks2, hose)
        expiry = time.time() + 1.5
        await api.put(f"/api/users/{user2['key']}/expiry",
                      json={"expires_at": rfc3339(datetime.fromtimestamp(expiry, UTC))})
        with trio.fail_after(10):
            await live2.ended.wait()
        ended_wall = time.time() - (trio.current_time() - live2.ended_at)
        assert expiry - 0.05 <= ended_wall <= expiry + CUT_WITHIN, ended_wall - expiry
        assert (await api.user(user2["key"]))["blocked"] == "expired"
        types = [e["type"] for e in (await api.get("/api/events", params={"user": "heidi"})).json()["events"]]
        assert "user_expired" in types
        nursery.cancel_scope.cancel()


async def test_rotate_and_delete_on_live_traffic():
    async with running_api() as api, trio.open_nursery() as nursery:
        hose = await serve_tcp(nursery, firehose_handler())
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="ivan")
        old = user["key"]
        socks_port = await api.client(nursery, old)
        live = await live_download(nursery, socks_port, hose)
        r = await api.post(f"/api/users/{old}/rotate")
        new = r.json()["key"]
        await assert_cut(live)
        assert await refused_reason(api.port, old) == "invalid token"
        # the counters stay with the user, and the new key works at once
        assert (await api.user(new))["bytes_down"] >= live.received
        socks_new = await api.client(nursery, new)
        assert await echo_roundtrip(socks_new, echo, b"new key" * 1000)

        live = await live_download(nursery, socks_new, hose)
        assert (await api.delete(f"/api/users/{new}")).status_code == 200
        await assert_cut(live)
        assert await refused_reason(api.port, new) == "invalid token"
        nursery.cancel_scope.cancel()


async def test_users_on_reverse_mode_socks5_ports():
    async with running_api() as api, trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        answer = await api.post("/api/token", json={"type": "reverse", "token": "rev-open-1"})
        open_port = answer.json()["port"]
        answer = await api.post("/api/token", json={"type": "reverse", "token": "rev-own-1",
                                                    "username": "svc", "password": "svc-pw"})
        own_port = answer.json()["port"]
        await api.client(nursery, "rev-open-1", reverse=True)
        await api.client(nursery, "rev-own-1", reverse=True)
        for token in ("rev-open-1", "rev-own-1"):
            await wait_until(lambda t=token: api.server.services[t].pool.sessions, "a provider")
        user = await api.create_user(name="judy")
        key = user["key"]

        async def roundtrip(port, auth, size):
            with trio.fail_after(10):
                stream = await socks_connect(port, "127.0.0.1", echo, auth=auth)
                async with stream:
                    await stream.send_all(b"r" * size)
                    got = 0
                    while got < size:
                        got += len(await stream.receive_some(size))

        # a user's name + key on both ports, metered to the user
        await roundtrip(open_port, ("judy", key), 10_000)
        await roundtrip(own_port, ("judy", key), 20_000)
        await wait_until(lambda: not api.plane.users[key].channels, "channels to finish")
        got = await api.user(key)
        assert (got["bytes_up"], got["bytes_down"]) == (30_000, 30_000)
        # the port's own pair still works; an open port still takes clients without auth
        await roundtrip(own_port, ("svc", "svc-pw"), 1000)
        await roundtrip(open_port, None, 1000)
        # wrong keys and disabled users are refused
        for port in (open_port, own_port):
            try:
                await roundtrip(port, ("judy", "not-the-key"), 10)
                raise AssertionError("a wrong key was accepted")
            except Socks5Failure:
                pass
        await api.patch(f"/api/users/{key}", json={"status": "disabled"})
        try:
            await roundtrip(open_port, ("judy", key), 10)
            raise AssertionError("a disabled user was let through")
        except Socks5Failure as exc:
            assert exc.code == socks5.NOT_ALLOWED
        assert (await api.user(key))["bytes_up"] == 30_000
        nursery.cancel_scope.cancel()


# -- subscribe ------------------------------------------------------------------------------------------


async def test_subscribe_answers_with_the_key_alone(payload_server, procs):
    async with running_api() as api, trio.open_nursery() as nursery:
        user = await api.create_user(name="kim", limit_bytes=10 * MiB)
        key = user["key"]
        # no API key: the user's key in the path is the credential
        r = await api.anon.get(f"/api/subscribe/{key}")
        assert r.status_code == 200
        assert r.json() == {
            "server": api.ws_url, "token": key, "mode": "forward", "socks_port": 9870,
            "share_link": f"trisocks://{key}@127.0.0.1:{api.port}", "name": "kim",
            "expires_at": None, "limit_bytes": 10 * MiB}
        r = await api.anon.get(f"/api/subscribe/{key}", headers={"Accept": "text/plain"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == f"trisocks://{key}@127.0.0.1:{api.port}\n"
        assert (await api.anon.get("/api/subscribe/not-a-user-key")).json() == {
            "success": False, "error": "unknown key"}

        # trisocks client --subscribe URL: a working client, metered to the user
        url = f"{api.url}/api/subscribe/{key}"
        client = await trio.to_thread.run_sync(lambda: start_trisocks_client(
            procs, None, None, extra=["--subscribe", url]))
        result = await trio.to_thread.run_sync(
            lambda: curl(payload_server.url(f"/bytes/{MiB}"), socks=client.socks))
        result.check(200)
        await wait_until(lambda: not api.plane.users[key].channels, "the channel to finish")
        figures = await api.user(key)
        assert figures["bytes_down"] > MiB
        # panel-aware clients read the traffic and expiry from headers
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)
        await api.put(f"/api/users/{key}/expiry", json={"expires_at": rfc3339(expires)})
        r = await api.anon.get(f"/api/subscribe/{key}")
        assert r.headers["subscription-userinfo"] == (
            f"upload={figures['bytes_up']}; download={figures['bytes_down']}; "
            f"total={10 * MiB}; expire={int(expires.timestamp())}")
        assert r.headers["profile-update-interval"] == "12"
        # and the share link form
        link = f"trisocks://{key}@127.0.0.1:{api.port}"
        client2 = await trio.to_thread.run_sync(lambda: start_trisocks_client(
            procs, None, None, extra=["--subscribe", link], name="link-client"))
        (await trio.to_thread.run_sync(lambda: curl(payload_server.url("/"), socks=client2.socks))).check(200)

        # a disabled user's subscription says so
        await api.patch(f"/api/users/{key}", json={"status": "disabled"})
        r = await api.anon.get(f"/api/subscribe/{key}")
        assert (r.status_code, r.json()) == (403, {"success": False, "error": "disabled"})
        nursery.cancel_scope.cancel()
