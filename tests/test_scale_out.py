"""Issue 13's acceptance for hosts: three `trisocks server` processes on one real Redis
(docs/scale-out.md), real clients, providers and curl. A user made on node 1 works through
node 3; a quota holds over downloads through all three; disabling on node 2 cuts nodes 1
and 3 within a second; a restarted node keeps its state; Redis stopped for 10 s and started
again loses no count; a provider on node 1 serves SOCKS5 clients entering node 2."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .api_support import KEY, MiB, http
from .support.curl import curl
from .support.nginx import start_nginx
from .support.payload import payload_sha256
from .support.peers import HOST, start_trisocks_client, start_trisocks_provider
from .support.procs import free_port
from .support.redis import start_redis
from .support.tools import clean_env, trisocks_cmd

_READY = re.compile(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)")
REV = "rev-scale-out-token"
# docs/scale-out.md: per node, 1 MiB and what it carries for the user while it writes its
# counters and reads the others' (some ms; at full loopback speed on 2 busy cores, 3-15 MiB)
OVER_PER_NODE = 16 * MiB


class Node:
    def __init__(self, procs, store: str, secret_file, n: int) -> None:
        self.port, self.socks = free_port(), free_port()
        self.argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", str(self.port), "-k", KEY,
                     "--store", store, "--deny", "own", "--allow", "loopback",
                     "--cluster-secret-file", str(secret_file),
                     "--node-url", f"ws://{HOST}:{self.port}",
                     # each node serves the reverse token on a SOCKS5 port of its own
                     "-r", "-t", REV, "-p", str(self.socks), "-i"]
        self.procs, self.name = procs, f"node-{n}"
        self.start()

    def start(self) -> None:
        self.proc = self.procs.start(self.argv, name=self.name, env=clean_env())
        self.proc.wait_for_log("management plane on", 30.0)
        self.proc.wait_for_port(self.port, HOST)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def api(self, method: str, path: str, **kw):
        return http(method, self.url + path, **kw)

    def user(self, key: str) -> dict:
        r = self.api("GET", f"/api/users/{key}")
        assert r.status_code == 200, r.text
        return r.json()


def wait(predicate, what: str, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def cluster(procs, tmp_path):
    redis = start_redis(tmp_path / "redis", appendonly=True)
    secret = tmp_path / "cluster-secret"
    secret.write_text("a-cluster-secret-of-some-length\n")
    try:
        nodes = [Node(procs, redis.url, secret, n) for n in (1, 2, 3)]
        wait(lambda: len(nodes[0].api("GET", "/api/cluster").json()["nodes"]) == 3,
             "node 1 to see all three nodes")
        yield redis, nodes
    finally:
        redis.close()


def test_three_nodes_on_one_redis(cluster, procs, payload_server):
    redis, (one, two, three) = cluster
    limit = 50 * MiB
    r = one.api("POST", "/api/users", json={"name": "ann", "limit_bytes": limit})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    wait(lambda: three.api("GET", f"/api/users/{key}").status_code == 200, "node 3 to know ann", 1.0)

    clients = [start_trisocks_client(procs, f"ws://{HOST}:{n.port}", key, name=f"client-{i}")
               for i, n in enumerate((one, two, three), 1)]
    socks = [f"{HOST}:{c.port}" for c in clients]
    small = curl(payload_server.url(f"/bytes/{MiB}"), socks=socks[2])
    small.check(200)
    assert small.sha256 == payload_sha256(MiB)

    # the quota: three downloads at once, one through each node, stop near the limit
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda s: curl(payload_server.url(f"/bytes/{100 * MiB}"),
                                               socks=s, timeout=60), socks))
    moved = small.size + sum(res.size for res in results)
    assert all(res.returncode != 0 for res in results), "every download should be cut"
    assert limit - 4 * MiB <= moved <= limit + 3 * OVER_PER_NODE, moved / MiB
    for node in (one, two, three):
        wait(lambda n=node: n.user(key)["blocked"] == "traffic limit reached",
             f"{node.name} to see the limit reached", 3)
    print(f"quota {limit / MiB:.0f} MiB over three nodes: {moved / MiB:.1f} MiB moved")

    # no limit now; live downloads through nodes 1 and 3 are cut when node 2 disables ann
    assert two.api("PATCH", f"/api/users/{key}", json={"limit_bytes": None}).status_code == 200
    wait(lambda: one.user(key)["blocked"] is None and three.user(key)["blocked"] is None,
         "nodes 1 and 3 to lift the limit", 1.0)
    with ThreadPoolExecutor(2) as pool:
        live = [pool.submit(_timed_curl, payload_server.url(f"/bytes/{8 << 30}"), s)
                for s in (socks[0], socks[2])]
        wait(lambda: sum(n.user(key)["connections"] for n in (one, three)) >= 2,
             "both downloads to run")
        t0 = time.monotonic()
        assert two.api("PATCH", f"/api/users/{key}", json={"status": "disabled"}).status_code == 200
        ends = [f.result(timeout=10) for f in live]
    assert all(end - t0 <= 1.0 for end in ends), [round(end - t0, 3) for end in ends]

    # a restarted node keeps its state: the user, disabled, with its counters
    before = one.user(key)
    three.proc.terminate()
    three.start()
    after = three.user(key)
    assert after["status"] == "disabled" and after["bytes_down"] >= before["bytes_down"]

    # Redis away for 10 s: a known user's traffic goes on, /healthz says degraded, and
    # every byte is counted once Redis is back
    assert one.api("PATCH", f"/api/users/{key}", json={"status": "active"}).status_code == 200
    wait(lambda: three.user(key)["status"] == "active", "node 3 to enable ann", 1.0)
    wait(lambda: not any(n.user(key)["connections"] for n in (one, two, three)), "channels to end")
    # the disabled clients back off for 30 s: fresh ones
    again = [start_trisocks_client(procs, f"ws://{HOST}:{n.port}", key, name=f"again-{n.name}")
             for n in (one, two, three)]
    socks = [f"{HOST}:{c.port}" for c in again]
    base = one.user(key)
    base_down = wait(lambda: _settled([one, two, three], key), "the nodes to agree")
    redis.stop()
    stopped = time.monotonic()
    health = wait(lambda: _degraded(two), "node 2 to report the store down")
    assert health["checks"]["database"] == "error"
    during = [curl(payload_server.url(f"/bytes/{5 * MiB}"), socks=s) for s in (socks[0], socks[2])]
    for res in during:
        res.check(200)
        assert res.sha256 == payload_sha256(5 * MiB)
    wait(lambda: time.monotonic() - stopped >= 10, "10 s of Redis away", 12, 0.2)
    redis.start()
    got = wait(lambda: _settled([one, two, three], key, base_down + 10 * MiB),
               "the nodes to agree on the counts of the outage", 10)
    assert base_down + 10 * MiB <= got < base_down + 10 * MiB + 64 * 1024, (got, base_down)
    assert base["bytes_up"] <= one.user(key)["bytes_up"]
    assert http("GET", two.url + "/healthz", key=None).json()["status"] == "ok"


def _timed_curl(url: str, socks: str) -> float:
    curl(url, socks=socks, timeout=30)
    return time.monotonic()


def _settled(nodes: list[Node], key: str, at_least: int = 0) -> int | None:
    """bytes_down once every node counts the same (all flushed and read back), at least
    ``at_least``."""
    seen = {n.user(key)["bytes_down"] for n in nodes}
    return seen.pop() if len(seen) == 1 and min(seen | {at_least}) >= at_least else None


def _degraded(node: Node) -> dict | None:
    r = http("GET", node.url + "/healthz", key=None)
    return r.json() if r.status_code == 200 and r.json()["status"] == "degraded" else None


def test_a_provider_on_node_1_serves_socks5_clients_entering_node_2(cluster, procs,
                                                                     payload_server):
    _, (one, two, _three) = cluster
    provider = start_trisocks_provider(procs, f"ws://{HOST}:{one.port}", REV)
    wait(lambda: _providers(two).get(REV) == 1, "node 2 to hear of node 1's provider", 5)
    size = 100 * MiB
    res = curl(payload_server.url(f"/bytes/{size}"), socks=f"{HOST}:{two.socks}", timeout=60)
    res.check(200)
    assert res.size == size and res.sha256 == payload_sha256(size)
    # many small ones at once, through node 3 as well
    with ThreadPoolExecutor(8) as pool:
        small = list(pool.map(lambda i: curl(payload_server.url(f"/bytes/{1000 + i}"),
                                             socks=f"{HOST}:{(two, _three)[i % 2].socks}"),
                              range(32)))
    assert all(r.returncode == 0 and r.size == 1000 + i for i, r in enumerate(small))
    assert provider.alive()


def _providers(node: Node) -> dict:
    nodes = node.api("GET", "/api/cluster").json()["nodes"]
    out: dict = {}
    for n in nodes:
        if not n["this"]:
            for token, count in n["providers"].items():
                out[token] = out.get(token, 0) + count
    return out


def _doc_block(name: str) -> str:
    text = (Path(__file__).parent.parent / "docs" / "scale-out.md").read_text()
    match = re.search(rf"<!-- test: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/scale-out.md has no block marked {name}"
    return match.group(1)


def test_the_guides_nginx_spreads_clients_over_the_nodes(cluster, procs, tmp_path, payload_server):
    """docs/scale-out.md's nginx configuration in front of the three nodes: clients through
    it land on several nodes and all of them work, with no affinity."""
    _, nodes = cluster
    site = _doc_block("scale-out-nginx")
    for n, node in enumerate(nodes, 1):
        site = site.replace(f"10.0.0.{n}:8765", f"{HOST}:{node.port}")
    port = free_port()
    start_nginx(procs, tmp_path / "nginx", site.replace("listen 80;", f"listen {HOST}:{port};"),
                port)

    # the API on a node itself (through the balancer it is a remote caller: 403)
    assert http("GET", f"http://{HOST}:{port}/api/users").status_code == 403
    key = nodes[2].api("POST", "/api/users", json={"name": "via-lb"}).json()["key"]
    clients = [start_trisocks_client(procs, f"ws://{HOST}:{port}", key, name=f"lb-client-{i}")
               for i in range(6)]
    for c in clients:
        res = curl(payload_server.url("/bytes/200000"), socks=f"{HOST}:{c.port}")
        res.check(200)
        assert res.sha256 == payload_sha256(200_000)
    cluster_view = wait(lambda: _all_sessions(nodes[0], 6), "the six sessions in /api/cluster")
    busy = [n for n in cluster_view["nodes"] if n["sessions"]]
    assert len(busy) >= 2, cluster_view  # round robin: never all on one node
    wait(lambda: nodes[1].user(key)["clients"] == 6, "node 2 to count the six clients", 5)


def _all_sessions(node: Node, n: int) -> dict | None:
    view = node.api("GET", "/api/cluster").json()
    return view if view["sessions"] == n else None


def test_workers_share_a_reverse_port_and_reach_one_provider(procs, tmp_path, payload_server):
    """`--workers 2 -r`: the reverse token's SOCKS5 port is bound by both workers; the one
    provider is on one of them, and connections the kernel gives the other are bridged (20
    of them: all on the provider's worker has a chance of one in a million)."""
    port, socks = free_port(), free_port()
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", str(port), "--workers", "2", "-k", KEY,
            "--db", str(tmp_path / "w.db"), "-r", "-t", REV, "-p", str(socks), "-i"]
    server = procs.start(argv, name="workers", env=clean_env())
    server.wait_for_log("2 workers", 30.0)
    provider = start_trisocks_provider(procs, f"ws://{HOST}:{port}", REV)

    def provider_known():
        nodes = http("GET", f"http://{HOST}:{port}/api/cluster").json()["nodes"]
        return len(nodes) == 2 and sum(n["providers"].get(REV, 0) for n in nodes) == 1
    wait(provider_known, "both workers to know where the provider is", 5)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: curl(payload_server.url(f"/bytes/{MiB}?seed={i}"),
                                               socks=f"{HOST}:{socks}"), range(20)))
    for i, res in enumerate(results):
        res.check(200)
        assert res.sha256 == payload_sha256(MiB, seed=i), i
    assert provider.alive()


def test_a_store_that_cannot_be_used_is_one_clear_line():
    """No Redis where --store points: exit 1 with the URL and what to check; a store URL of
    an unknown kind or a malformed one: a usage error (exit 2) naming it."""
    dead = f"redis://{HOST}:{free_port()}/0"
    base = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "-k", KEY]
    done = subprocess.run([*base, "--store", dead], capture_output=True, text=True, timeout=30,
                          env=clean_env())
    assert done.returncode == 1, done.stderr
    assert f"store: {dead}: connection refused (is Redis running" in done.stderr
    assert "Traceback" not in done.stderr
    for url, said in (("memcache://x", "expected redis://, rediss://, unix://"),
                      ("redis://:x@127.0.0.1:notaport/0", "--store")):
        done = subprocess.run([*base, "--store", url], capture_output=True, text=True,
                              timeout=30, env=clean_env())
        assert done.returncode == 2 and said in done.stderr, (url, done.stderr)
        assert "Traceback" not in done.stderr and ":x@" not in done.stderr
