"""Persistence (issue 4, point 6): tokens, users and counters survive a restart with the same
--db; counters reach the database within a second without a clean shutdown; concurrent API
writes are safe; a broken database shows in /healthz and in API answers."""

from __future__ import annotations

import shutil
import sqlite3
import time

import trio

from trisocks.management import MemoryStore, SQLiteStore

from .api_support import MiB, http, running_api, start_api_server
from .support.curl import curl
from .support.peers import start_trisocks_client


def db_rows(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path, timeout=5)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def test_tokens_users_and_counters_survive_a_restart(procs, tmp_path, payload_server):
    db = tmp_path / "state" / "trisocks.db"
    server = start_api_server(procs, db=db, tokens=["cli-token-000001"])
    base = server.http_url
    body = {"type": "forward", "token": "fwd-api-000001"}
    assert http("POST", f"{base}/api/token", json=body).json()["success"]
    rev = http("POST", f"{base}/api/token", json={"type": "reverse", "token": "rev-api-000001",
                                                  "username": "su", "password": "sp"}).json()
    assert http("POST", f"{base}/api/token", json={"type": "connector", "token": "con-api-000001",
                                                   "reverse_token": "rev-api-000001"}).json()["success"]
    alice = http("POST", f"{base}/api/users", json={"name": "alice", "limit_bytes": 64 * MiB,
                                                    "expires_at": "2099-01-01T00:00:00Z"}).json()
    bob = http("POST", f"{base}/api/users", json={"name": "bob", "status": "disabled"}).json()

    # traffic through a user's key and through a token
    for token, size in ((alice["key"], 3 * MiB), ("fwd-api-000001", 2 * MiB)):
        client = start_trisocks_client(procs, server.url, token, name=f"client-{size}")
        curl(payload_server.url(f"/bytes/{size}"), socks=client.socks).check(200)
        client.proc.terminate()
    before_users = {u["name"]: u for u in http("GET", f"{base}/api/users").json()["users"]}
    before_stats = {t["token"]: t for t in http("GET", f"{base}/api/stats").json()["tokens"]}
    before_status = http("GET", f"{base}/api/status").json()
    assert before_users["alice"]["bytes_down"] > 3 * MiB
    assert before_stats["fwd-api-000001"]["bytes_down"] > 2 * MiB
    server.proc.terminate()  # SIGTERM: a clean stop, counters saved on the way out
    assert "stopping (counters are being saved)" in server.output()

    again = start_api_server(procs, db=db, tokens=["cli-token-000001"], name="api-server-again")
    base = again.http_url
    assert http("GET", f"{base}/api/status").json() == before_status
    after_users = {u["name"]: u for u in http("GET", f"{base}/api/users").json()["users"]}
    for name in ("alice", "bob"):
        keep = ("key", "id", "bytes_up", "bytes_down", "total_connections", "limit_bytes",
                "expires_at", "status", "created_at", "blocked")
        assert {k: after_users[name][k] for k in keep} == {k: before_users[name][k] for k in keep}
    after_stats = {t["token"]: t for t in http("GET", f"{base}/api/stats").json()["tokens"]}
    for token in ("fwd-api-000001", "cli-token-000001"):
        for k in ("bytes_up", "bytes_down", "total_connections"):
            assert after_stats[token][k] == before_stats[token][k], (token, k)
    # the reverse token has its port again, the events are still there
    assert [t["port"] for t in http("GET", f"{base}/api/status").json()["tokens"]
            if t["token"] == "rev-api-000001"] == [rev["port"]]
    events = http("GET", f"{base}/api/events", params={"user": "alice"}).json()["events"]
    assert [e["type"] for e in events][:2] == ["user_created", "auth_success"]
    # and the restored credentials work
    client = start_trisocks_client(procs, again.url, alice["key"], name="client-after")
    curl(payload_server.url(f"/bytes/{MiB}"), socks=client.socks).check(200)
    assert http("GET", f"{base}/api/users/{bob['key']}").json()["blocked"] == "disabled"


def test_counters_reach_the_database_within_a_second_without_a_clean_stop(procs, tmp_path,
                                                                          payload_server):
    db = tmp_path / "t.db"
    server = start_api_server(procs, db=db)
    user = http("POST", f"{server.http_url}/api/users", json={"name": "crashy"}).json()
    client = start_trisocks_client(procs, server.url, user["key"])
    curl(payload_server.url(f"/bytes/{MiB}"), socks=client.socks).check(200)
    done = time.monotonic()
    deadline = done + 3

    def stored() -> int:
        rows = db_rows(db, "SELECT bytes_down FROM users WHERE name = 'crashy'")
        return rows[0][0] if rows else 0

    while stored() < MiB:
        assert time.monotonic() < deadline, "counters not in the database 3 s after the transfer"
        time.sleep(0.02)
    assert time.monotonic() - done <= 1.5  # the flusher runs every second
    live = http("GET", f"{server.http_url}/api/users/{user['key']}").json()
    server.proc.popen.kill()  # no chance to save anything more
    server.proc.wait_exit()
    again = start_api_server(procs, db=db, name="api-server-again")
    restored = http("GET", f"{again.http_url}/api/users/{user['key']}").json()
    assert restored["bytes_down"] == stored() == live["bytes_down"]


async def test_concurrent_writes_are_safe(tmp_path):
    db = tmp_path / "c.db"
    async with running_api(store=SQLiteStore(db)) as api:
        results: list[int] = []

        async def create(body):
            results.append((await api.post("/api/users", json=body)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(create, {"name": "same-name"})
        assert sorted(results) == [201] + [409] * 19
        results.clear()
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(create, {"name": f"user-{i:02d}", "limit_bytes": i})
        assert results == [201] * 30
        users = (await api.get("/api/users")).json()["users"]
        keys = [u["key"] for u in users]

        async def mutate(key, i):
            await api.put(f"/api/users/{key}/limit", json={"limit_bytes": 1000 + i})
            await api.post(f"/api/users/{key}/reset")
            await api.patch(f"/api/users/{key}", json={"name": f"renamed-{i:02d}"})

        async with trio.open_nursery() as nursery:
            for i, key in enumerate(keys):
                nursery.start_soon(mutate, key, i)
    rows = db_rows(db, "SELECT name, limit_bytes FROM users ORDER BY name")
    assert rows == [("renamed-00", 1000)] + [(f"renamed-{i:02d}", 1000 + i) for i in range(1, 31)]


async def test_healthz_turns_503_when_the_database_is_unusable(tmp_path):
    state = tmp_path / "state"
    async with running_api(store=SQLiteStore(state / "h.db")) as api:
        r = await api.anon.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok",
                                                   "checks": {"database": "ok", "listener": "ok"}})
        shutil.rmtree(state)  # the file the server writes to is gone: nothing would survive
        r = await api.anon.get("/healthz")
        assert (r.status_code, r.json()) == (503, {"status": "error",
                                                   "checks": {"database": "error", "listener": "ok"}})


async def test_a_failing_store_refuses_changes_and_shows_in_health():
    store = MemoryStore()
    async with running_api(store=store, flush_interval=0.05) as api:
        await api.create_user(name="before")
        store.broken = "disk I/O error"
        r = await api.post("/api/users", json={"name": "after"})
        assert (r.status_code, r.json()) == (503, {"success": False, "error": "database unavailable"})
        assert [u["name"] for u in (await api.get("/api/users")).json()["users"]] == ["before"]
        r = await api.post("/api/token", json={"type": "reverse", "token": "rev-nodb"})
        assert r.status_code == 503 and "rev-nodb" not in api.server.services
        assert (await api.anon.get("/healthz")).status_code == 503
        store.broken = None
        assert (await api.anon.get("/healthz")).status_code == 200
        assert (await api.post("/api/users", json={"name": "after"})).status_code == 201


async def test_a_restored_reverse_token_whose_port_is_taken_gets_another(tmp_path, caplog):
    import socket

    db = tmp_path / "r.db"
    async with running_api(store=SQLiteStore(db)) as api:
        port = (await api.post("/api/token", json={"type": "reverse", "token": "rev-moving"})).json()["port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        async with running_api(store=SQLiteStore(db)) as api:
            (token,) = (await api.get("/api/status")).json()["tokens"]
            assert token["token"] == "rev-moving" and token["port"] not in (port, 0)
            moved = token["port"]
    assert "is taken" in caplog.text
    async with running_api(store=SQLiteStore(db)) as api:  # and it keeps the new one
        assert (await api.get("/api/status")).json()["tokens"][0]["port"] == moved
