"""Nodes on one shared store (management/cluster.py), in this process: two planes on one
SQLite file opened shared, as the workers of `trisocks server --workers N` open it. What one
node's API changes reaches the other's live traffic; counters add up over the nodes; the API
of either answers with the cluster's figures. (The same over Redis, three nodes as real
processes, with Redis stopped and started: tests/test_scale_out.py.)"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from trisocks.management import SQLiteStore
from trisocks.management.cluster import fold_counters
from trisocks.management.model import UserAccount

from .api_support import MiB, running_api, wait_until
from .inproc import echo_handler, echo_roundtrip, firehose_handler, serve_tcp
from .test_api_users import assert_cut, live_download, refused_reason

SYNCED = 1.0  # seconds: how fast a change on one node reaches another's traffic


async def two_nodes(stack: AsyncExitStack, path):
    one = await stack.enter_async_context(running_api(store=SQLiteStore(path, shared=True)))
    two = await stack.enter_async_context(running_api(store=SQLiteStore(path, shared=True)))
    return one, two


async def test_a_user_made_on_one_node_works_and_is_cut_on_the_other(tmp_path):
    async with AsyncExitStack() as stack:
        one, two = await two_nodes(stack, tmp_path / "c.db")
        nursery = await stack.enter_async_context(trio.open_nursery())
        hose = await serve_tcp(nursery, firehose_handler())
        echo = await serve_tcp(nursery, echo_handler)
        user = await one.create_user(name="ann")
        key = user["key"]
        await wait_until(lambda: key in two.plane.users, "node 2 to learn of the user", SYNCED)

        socks = await two.client(nursery, key)
        assert await echo_roundtrip(socks, echo, b"q" * 100_000)
        live = await live_download(nursery, socks, hose)
        # node 1's view counts the session on node 2 (heartbeats, about once a second)
        await wait_until(async_field(one, key, "clients", 1), "node 1 to count the client", 5)

        r = await one.patch(f"/api/users/{key}", json={"status": "disabled"})
        assert r.json()["blocked"] == "disabled"
        await assert_cut(live, within=SYNCED)
        assert await refused_reason(two.port, key) == "disabled"

        # rotated on node 2: the new key works on node 1, the old one nowhere
        await two.patch(f"/api/users/{key}", json={"status": "active"})
        new = (await two.post(f"/api/users/{key}/rotate")).json()["key"]
        await wait_until(lambda: new in one.plane.users, "node 1 to learn of the new key", SYNCED)
        assert await refused_reason(one.port, key) is not None
        assert await refused_reason(one.port, new) is None

        # deleted on node 1: gone on node 2, its session with it
        socks = await two.client(nursery, new)
        live = await live_download(nursery, socks, hose)
        assert (await one.delete(f"/api/users/{new}")).status_code == 200
        await assert_cut(live, within=SYNCED)
        await wait_until(lambda: new not in two.plane.users, "node 2 to forget the user", SYNCED)
        nursery.cancel_scope.cancel()


def async_field(api, key: str, name: str, value):
    async def check():
        r = await api.get(f"/api/users/{key}")
        return r.status_code == 200 and r.json()[name] == value
    return check


async def test_a_limit_holds_over_the_traffic_of_both_nodes(tmp_path):
    """20 MiB through node 1, then node 2 knows: its next download is cut near the limit."""
    async with AsyncExitStack() as stack:
        one, two = await two_nodes(stack, tmp_path / "q.db")
        nursery = await stack.enter_async_context(trio.open_nursery())
        echo = await serve_tcp(nursery, echo_handler)
        hose = await serve_tcp(nursery, firehose_handler())
        key = (await one.create_user(name="bo", limit_bytes=30 * MiB))["key"]
        await wait_until(lambda: key in two.plane.users, "node 2 to learn of the user", SYNCED)
        via_one = await one.client(nursery, key)
        for _ in range(10):
            assert await echo_roundtrip(via_one, echo, b"z" * MiB)  # 20 MiB: 10 up, 10 down
        await wait_until(lambda: two.plane.users[key].used >= 20 * MiB,
                         "node 2 to count node 1's traffic", 10)
        via_two = await two.client(nursery, key)
        live = await live_download(nursery, via_two, hose)
        with trio.fail_after(10):
            await live.ended.wait()
        # node 2 stopped at the limit less what node 1 had used (its own bound: one read)
        assert 9 * MiB <= live.received <= 11 * MiB, live.received
        for api in (one, two):
            # the other node's counters come with its next flush and our next re-read
            await wait_until(async_field(api, key, "blocked", "traffic limit reached"),
                             "both nodes to see the limit reached", 10)
        total = await wait_until(lambda: _flushed_total(one, key), "the counters to settle", 5)
        assert 29 * MiB <= total <= 31 * MiB, total

        # a reset on node 2 lets node 1's client go on at once
        await two.post(f"/api/users/{key}/reset")
        await wait_until(lambda: one.plane.users[key].used < MiB, "node 1 to see the reset", SYNCED)
        assert await echo_roundtrip(via_one, echo, b"r" * 100_000)
        nursery.cancel_scope.cancel()


async def _flushed_total(api, key: str) -> int | None:
    got = (await api.get(f"/api/users/{key}")).json()
    user = api.plane.users[key]
    if user.channels:
        return None
    return got["bytes_up"] + got["bytes_down"]


async def test_tokens_and_cluster_figures(tmp_path):
    async with AsyncExitStack() as stack:
        one, two = await two_nodes(stack, tmp_path / "t.db")
        nursery = await stack.enter_async_context(trio.open_nursery())
        r = await one.post("/api/token", json={"type": "forward", "token": "fwd-cluster-1"})
        assert r.json()["success"], r.text
        await wait_until(lambda: two.plane.tokens.get("fwd-cluster-1") is not None,
                         "node 2 to learn of the token", SYNCED)
        echo = await serve_tcp(nursery, echo_handler)
        socks = await two.client(nursery, "fwd-cluster-1")
        assert await echo_roundtrip(socks, echo, b"t" * 1000)

        async def counted():
            status = (await one.get("/api/status")).json()
            (tok,) = [t for t in status["tokens"] if t["token"] == "fwd-cluster-1"]
            return tok["clients_count"] == 1
        await wait_until(counted, "node 1 to count node 2's client", 5)

        async def both_nodes():
            c = (await one.get("/api/cluster")).json()
            return c if len(c["nodes"]) == 2 else None
        cluster = await wait_until(both_nodes, "node 1 to see node 2", 5)
        assert cluster["shared"] is True and [n["this"] for n in cluster["nodes"]] == [True, False]
        assert cluster["sessions"] == 1

        # removed on node 2: its client on node 2 is cut, node 1 forgets it
        r = await two.request("DELETE", "/api/token", json={"token": "fwd-cluster-1"})
        assert r.json()["success"], r.text
        await wait_until(lambda: one.plane.tokens.get("fwd-cluster-1") is None,
                         "node 1 to forget the token", SYNCED)
        nursery.cancel_scope.cancel()


def test_folding_the_other_nodes_counters_keeps_this_nodes_growth():
    user = UserAccount(id="u", key="k", name="n", bytes_up=100, bytes_down=200)
    user.done_up += 10  # this node's growth, not flushed yet
    fold_counters(user, 150, 260, 3)  # the store: others added 50 up, 60 down, 3 connections
    assert (user.done_up, user.done_down, user.used) == (160, 260, 300 + 50 + 60)
    assert user.flushed[:3] == (150, 260, 3)
    # what the next flush writes is this node's 10 bytes, nothing of the others'
    assert user.done_up - user.flushed[0] == 10


async def test_downloads_through_both_nodes_at_once_stop_near_the_limit(tmp_path):
    """Both nodes carry the same user at full speed: checkpoints make each flush and look
    at the other's counters before it goes far, so the total passes the limit by little."""
    async with AsyncExitStack() as stack:
        one, two = await two_nodes(stack, tmp_path / "p.db")
        nursery = await stack.enter_async_context(trio.open_nursery())
        hose = await serve_tcp(nursery, firehose_handler())
        limit = 40 * MiB
        key = (await one.create_user(name="cy", limit_bytes=limit))["key"]
        await wait_until(lambda: key in two.plane.users and two.plane.users[key].nodes == 2,
                         "node 2 to learn of the user and of node 1", 5)
        await wait_until(lambda: one.plane.users[key].nodes == 2, "node 1 to see node 2", 5)
        lives = [await live_download(nursery, await api.client(nursery, key), hose)
                 for api in (one, two)]
        with trio.fail_after(20):
            for live in lives:
                await live.ended.wait()
        received = sum(live.received for live in lives)
        # the documented bound: per node 1 MiB and what it carries while it writes its
        # counters and reads the other's (here all four ends share one process and one core)
        assert limit - 2 * MiB <= received <= limit + 2 * 12 * MiB, received / MiB
        nursery.cancel_scope.cancel()


async def test_the_bridge_prefix_is_refused_for_users_and_tokens():
    """`~node~` names node bridges (tunnel/nodes.py): the API refuses it for a user's key and
    a token with a 400 naming why, and stores nothing (it once answered 500 after storing)."""
    async with running_api() as api:
        r = await api.post("/api/users", json={"name": "x", "key": "~node~abcdefghijklmnop"})
        assert r.status_code == 400 and "reserved for node bridges" in r.json()["error"]
        r = await api.post("/api/token", json={"type": "forward", "token": "~node~abc"})
        assert r.status_code == 400 and "reserved for node bridges" in r.json()["error"]
        assert (await api.get("/api/users")).json()["total"] == 0
        assert all(not t["token"].startswith("~node~")
                   for t in (await api.get("/api/status")).json()["tokens"])
