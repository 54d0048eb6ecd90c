"""trisocks.management.redis_store against a real redis-server: the contract of
tests/unit/test_store.py where it applies, what sharing needs (two stores at once), and
what happens when Redis goes away and comes back."""

from __future__ import annotations

import time

import coredis
import pytest
import trio

from trisocks.management.redis_store import RedisStore, parse_store_url
from trisocks.management.rows import (
    Counters,
    EventRecord,
    NodeRecord,
    StoreError,
    TokenRecord,
    UserRecord,
    WebhookRecord,
)

from .support.redis import redis_server, start_redis  # noqa: F401  (a fixture)


@pytest.fixture
async def stores(redis_server):  # noqa: F811
    """``stores(n=1, **options)``: opened RedisStores on the server, closed after the test."""
    opened = []

    async def make(n: int = 1, url: str | None = None, **options):
        for _ in range(n):
            store = RedisStore(url or redis_server.url, **options)
            await store.open()
            opened.append(store)
        return opened[-n:] if n > 1 else opened[-1]

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


async def raw(server, *command):
    """One command on a connection of its own, past the store (to look at or spoil keys)."""
    async with coredis.Redis(unix_socket_path=server.socket, password=server.password) as c:
        return await c.create_request(command[0].encode(), *command[1:], callback=lambda r: r)


async def reopened(store: RedisStore, **options):
    """What a node starting now would get from open()."""
    again = RedisStore(store.target.where, prefix=store.prefix, **options)
    try:
        return await again.open()
    finally:
        await again.close()


def counts(rec) -> tuple:
    return rec.bytes_up, rec.bytes_down, rec.total_connections


def user(uid: str, key: str, name: str, **kw) -> UserRecord:
    return UserRecord(id=uid, key=key, name=name, created_at=1.6e9, **kw)


# -- the Store contract -------------------------------------------------------------------

async def test_tokens_round_trip_in_creation_order(stores):
    db = await stores()
    await db.put_token(TokenRecord(token="fwd", kind="forward", created_at=1.5e9))
    await db.put_token(TokenRecord(token="rev", kind="reverse", port=1080, username="u",
                                   password="p", allow_manage_connector=True, created_at=1.6e9))
    await db.put_token(TokenRecord(token="con", kind="connector", reverse_token="rev",
                                   created_at=1.7e9))
    await db.put_token(TokenRecord(token="rev", kind="reverse", port=1081, created_at=1.6e9))
    await db.delete_tokens(["fwd"])
    snap = await reopened(db)
    assert [t.token for t in snap.tokens] == ["rev", "con"]  # an update keeps its place
    rev = snap.tokens[0]
    assert (rev.port, rev.username, rev.allow_manage_connector) == (1081, "", False)
    assert snap.tokens[1].reverse_token == "rev"


async def test_an_update_keeps_the_counters_stored(stores):
    db = await stores()
    await db.put_user(user("u1", "key1", "alice", limit_bytes=1000, expires_at=2e9))
    await db.put_token(TokenRecord(token="tok", kind="forward", created_at=1.6e9))
    await db.flush([Counters(owner="user", ident="u1", bytes_up=10, bytes_down=20,
                             total_connections=1, last_seen=1.7e9),
                    Counters(owner="token", ident="tok", bytes_up=3, bytes_down=4,
                             total_connections=5)], [])
    await db.put_user(user("u1", "key1", "alice2", status="disabled", bytes_up=999))
    await db.put_token(TokenRecord(token="tok", kind="forward", created_at=1.6e9, bytes_up=999))
    snap = await reopened(db)
    [u] = snap.users
    assert (u.name, u.limit_bytes, u.status) == ("alice2", None, "disabled")
    assert (*counts(u), u.last_seen) == (10, 20, 1, 1.7e9)
    assert counts(snap.tokens[0]) == (3, 4, 5)


async def test_a_key_or_name_of_another_user_is_an_error(stores):
    db = await stores()
    await db.put_user(user("u1", "key1", "alice"))
    with pytest.raises(StoreError, match="another user has that key"):
        await db.put_user(user("u2", "key1", "bob"))
    with pytest.raises(StoreError, match="another user has that name"):
        await db.put_user(user("u2", "key2", "alice"))
    await db.put_user(user("u1", "key1b", "alice"))  # u1 leaves key1 behind...
    await db.put_user(user("u2", "key1", "bob"))  # ...which is free now
    snap = await db.snapshot()
    assert sorted((u.id, u.key, u.name) for u in snap.users) == [
        ("u1", "key1b", "alice"), ("u2", "key1", "bob")]


async def test_two_nodes_racing_for_one_key_or_name_one_wins(stores):
    a, b = await stores(2)
    outcomes: dict[str, list[str]] = {}

    async def claim(store, uid, key, name):
        try:
            await store.put_user(user(uid, key, name))
            outcomes.setdefault(key + name, []).append(uid)
        except StoreError:
            pass

    async with trio.open_nursery() as nursery:
        for i in range(30):  # the same key with other names, then the same name
            nursery.start_soon(claim, a, f"a{i}", f"k{i}", f"a{i}")
            nursery.start_soon(claim, b, f"b{i}", f"k{i}", f"b{i}")
            nursery.start_soon(claim, a, f"c{i}", f"ck{i}", f"n{i}")
            nursery.start_soon(claim, b, f"d{i}", f"dk{i}", f"n{i}")
    users = (await a.snapshot()).users
    assert len(users) == 60
    assert len({u.key for u in users}) == len({u.name for u in users}) == 60


async def test_counters_of_two_nodes_add_up_exactly(stores):
    a, b = await stores(2)
    await a.put_user(user("u1", "k", "n"))
    await a.put_token(TokenRecord(token="tok", kind="forward", created_at=1.6e9))
    gen = await a.generation()

    async def flusher(store, seen):
        for i in range(40):
            await store.flush([
                Counters(owner="user", ident="u1", bytes_up=1, bytes_down=2, total_connections=1,
                         last_seen=seen + i),
                Counters(owner="token", ident="tok", bytes_up=100, bytes_down=1,
                         total_connections=0),
                Counters(owner="user", ident="gone", bytes_up=5, bytes_down=6, total_connections=1),
            ], [], hour=1000 + i % 2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher, a, 1.7e9)
        nursery.start_soon(flusher, b, 1.65e9)
    snap = await b.snapshot()
    [u] = snap.users  # "gone" was not created by its increments
    assert (*counts(u), u.last_seen) == (80, 160, 80, 1.7e9 + 39)  # the later time is kept
    assert counts(snap.tokens[0]) == (8000, 80, 0)
    assert await a.usage("user", "u1", 0, 2000) == [(1000, 40, 80, 40), (1001, 40, 80, 40)]
    assert await a.usage("user", "gone", 0, 2000) == []
    # the server's total counts every byte carried, the deleted owner's too
    assert await a.usage("server", "", 1000, 1000) == [(1000, 40 * 106, 40 * 9, 40 * 2)]
    assert await b.generation() == gen  # counters are not a change to re-read


async def test_reset_and_delete_user(redis_server, stores):  # noqa: F811
    db = await stores()
    await db.put_user(user("u1", "k1", "a"))
    await db.put_user(user("u2", "k2", "b"))
    await db.flush([Counters(owner="user", ident=u, bytes_up=5, bytes_down=6, total_connections=3)
                    for u in ("u1", "u2")], [], hour=7)
    await db.reset_user("u1")
    await db.reset_user("nobody")  # not created by a reset
    await db.delete_user("u2")
    await db.flush([Counters(owner="user", ident="u2", bytes_up=1, bytes_down=1,
                             total_connections=1, last_seen=1.8e9)], [], hour=8)
    snap = await reopened(db)
    [u] = snap.users
    assert (u.id, *counts(u)) == ("u1", 0, 0, 3)
    assert await db.usage("user", "u2", 0, 100) == []  # forgotten, and not brought back
    assert await db.usage("user", "u1", 0, 100) == [(7, 5, 6, 3)]  # history is not reset
    assert await raw(redis_server, "EXISTS", "trisocks:user:u2", "trisocks:user:nobody") == 0
    await db.put_user(user("u3", "k2", "b"))  # u2's key and name are free again


async def test_events_numbered_by_the_store_most_recent_loaded(stores):
    a, b = await stores(2)
    await a.flush([], [EventRecord(id=1, time=1.6e9 + i, type="x", detail=f"a{i}")
                       for i in range(3)])
    await b.flush([], [EventRecord(id=1, time=1.7e9 + i, type="y", token="t", detail=f"b{i}")
                       for i in range(2)])
    snap = await reopened(a, events_loaded=3)
    assert [(e.id, e.type, e.detail) for e in snap.events] == [
        (3, "x", "a2"), (4, "y", "b0"), (5, "y", "b1")]
    assert snap.events[1].token == "t" and snap.events[1].time == 1.7e9


async def test_events_are_capped(redis_server, stores):  # noqa: F811
    db = await stores(events_kept=100)
    for batch in range(10):
        await db.flush([], [EventRecord(id=0, time=1.6e9, type="x", detail=str(batch * 100 + i))
                            for i in range(100)])
    kept = await raw(redis_server, "XLEN", "trisocks:events")
    assert 100 <= kept <= 200  # trimmed approximately: whole stream nodes of 100
    snap = await reopened(db, events_loaded=10)
    assert [e.detail for e in snap.events] == [str(n) for n in range(990, 1000)]


async def test_usage_history_and_pruning(stores):
    db = await stores()
    await db.put_token(TokenRecord(token="tok", kind="forward", created_at=1.6e9))
    for hour in (10, 12, 11, 12):
        await db.flush([Counters(owner="token", ident="tok", bytes_up=hour, bytes_down=1,
                                 total_connections=1)], [], hour)
    await db.flush([Counters(owner="token", ident="tok", bytes_up=1, bytes_down=0,
                             total_connections=0)], [])  # no hour: counters only
    assert await db.usage("token", "tok", 0, 99) == [(10, 10, 1, 1), (11, 11, 1, 1),
                                                     (12, 24, 2, 2)]
    assert await db.usage("token", "tok", 11, 11) == [(11, 11, 1, 1)]
    assert counts((await db.snapshot()).tokens[0]) == (46, 4, 4)
    await db.prune_usage(12)
    assert await db.usage("token", "tok", 0, 99) == [(12, 24, 2, 2)]
    assert await db.usage("server", "", 0, 99) == [(12, 24, 2, 2)]


async def test_webhooks_round_trip(stores):
    db = await stores()
    await db.put_webhook(WebhookRecord(name="a", url="https://a", secret="s", events=["x"],
                                       created_at=1.6e9))
    await db.put_webhook(WebhookRecord(name="b", url="https://b", secret="t"))
    await db.put_webhook(WebhookRecord(name="a", url="https://a2", secret="s2"))
    await db.put_webhook(WebhookRecord(name="c", url="https://c", secret="u"))
    await db.delete_webhook("c")
    hooks = (await reopened(db)).webhooks
    assert [(h.name, h.url, h.events) for h in hooks] == [("b", "https://b", None),
                                                          ("a", "https://a2", None)]


async def test_generation_moves_with_every_change(stores):
    db = await stores()
    seen = [await db.generation()]
    changes = [db.put_user(user("u1", "k1", "a")), db.reset_user("u1"),
               db.put_token(TokenRecord(token="t", kind="forward")), db.delete_tokens(["t"]),
               db.put_webhook(WebhookRecord(name="w", url="https://w", secret="s")),
               db.delete_webhook("w"), db.delete_user("u1")]
    for change in changes:
        await change
        seen.append(await db.generation())
    assert len(set(seen)) == len(seen)
    await db.flush([], [EventRecord(id=1, time=1.0, type="x")], hour=3)
    await db.prune_usage(10)
    await db.put_node(NodeRecord(id="n1"))
    assert await db.generation() == seen[-1]


async def test_node_heartbeats_expire_by_themselves(redis_server, stores):  # noqa: F811
    a, b = await stores(2)
    await b.put_node(NodeRecord(id="n2", seen_at=6.0))
    await a.put_node(NodeRecord(id="n1", url="ws://127.0.0.1:1", seen_at=5.0, providers={"rev": 2}))
    assert [(n.id, n.providers) for n in await b.nodes()] == [("n1", {"rev": 2}), ("n2", {})]
    assert 25_000 < await raw(redis_server, "PTTL", "trisocks:node:n1") <= 30_000
    await a.delete_node("n1")
    assert [n.id for n in await b.nodes()] == ["n2"]
    short = await stores(node_ttl=0.1)
    await short.put_node(NodeRecord(id="n3"))
    assert "n3" in [n.id for n in await a.nodes()]
    with trio.fail_after(5):
        while "n3" in [n.id for n in await a.nodes()]:
            await trio.sleep(0.02)  # polling Redis's own expiry, not a guess at it
    await b.put_node(NodeRecord(id="n2", seen_at=7.0))  # ...and the list forgets it
    assert list(await raw(redis_server, "ZRANGE", "trisocks:nodes", "0", "-1")) == [b"n2"]


async def test_prefixes_keep_deployments_apart(redis_server, stores):  # noqa: F811
    a = await stores(prefix="blue")
    b = await stores(prefix="green")
    await a.put_user(user("u1", "k1", "alice"))
    await b.put_user(user("u1", "k1", "alice"))  # the same key: another deployment
    await a.flush([Counters(owner="user", ident="u1", bytes_up=1, bytes_down=1,
                            total_connections=1)], [EventRecord(id=1, time=1.0, type="x")], 5)
    await a.put_node(NodeRecord(id="n"))
    assert counts((await b.snapshot()).users[0]) == (0, 0, 0)
    assert await b.usage("user", "u1", 0, 10) == [] and await b.nodes() == []
    keys = await raw(redis_server, "KEYS", "*")
    assert keys and all(k.startswith((b"blue:", b"green:")) for k in keys)


async def test_unix_socket_url(redis_server, stores):  # noqa: F811
    db = await stores(url=redis_server.unix_url)
    assert db.description == f"Redis unix://{redis_server.socket}?db=0 (keys trisocks:*)"
    await db.put_user(user("u1", "k1", "a"))
    assert [u.id for u in (await reopened(db)).users] == ["u1"]


async def test_a_password_protected_redis(tmp_path):
    server = start_redis(tmp_path, password="s3cret/@")
    try:
        url = f"redis://default:s3cret%2F%40@127.0.0.1:{server.port}/0"
        store = RedisStore(url)
        assert "s3cret" not in store.description and "default@" in store.description
        await store.open()
        await store.check()
        await store.close()
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:\d+/0: Redis wants a password"):
            await RedisStore(server.url).open()
        with pytest.raises(StoreError, match=r"default@127\.0\.0\.1:\d+/0: authentication "
                           r"refused: .*password") as exc:
            await RedisStore(url.replace("s3cret", "wrong")).open()
        assert "wrong" not in str(exc.value)
    finally:
        server.close()


async def test_tls_with_the_ca_of_the_url(tmp_path):
    server = start_redis(tmp_path, tls=True)
    try:
        trusted = RedisStore(f"{server.url}?ssl_ca_certs={server.ca_file}")
        await trusted.open()
        await trusted.put_user(user("u1", "k1", "a"))
        await trusted.close()
        with pytest.raises(StoreError, match="TLS: .*certificate"):
            await RedisStore(server.url).open()  # the system's CAs do not know this one
        unchecked = RedisStore(f"{server.url}?ssl_cert_reqs=none")
        assert [u.id for u in (await unchecked.open()).users] == ["u1"]
        await unchecked.close()
    finally:
        server.close()


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379", "expected redis://"),
    ("redis//127.0.0.1", "expected redis://"),
    ("", "not a redis://"),
    ("redis://:6379/0", "no host"),
    ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1:port/0", "port"),
    ("redis://127.0.0.1:6379/zero", "database is a number"),
    ("redis://127.0.0.1:6379/-1", "database is a number"),
    ("redis://127.0.0.1:6379/0?db=1", "given twice"),
    ("redis://127.0.0.1/0?timeout=3", "unknown parameter 'timeout'"),
    ("redis://127.0.0.1/0?ssl_ca_certs=/x", "unknown parameter"),
    ("rediss://127.0.0.1/0?ssl_ca_certs=/nonexistent.pem", "cannot load the TLS files"),
    ("rediss://127.0.0.1/0?ssl_cert_reqs=maybe", "none, optional or required"),
    ("unix://host/tmp/redis.sock", "no host"),
    ("unix://", "absolute path"),
    ("redis://u:pw@127.0.0.1:6379/0#x", "fragment"),
    ("redis://127.0.0.1 :6379/0", "not a redis://"),
])
def test_malformed_urls_are_value_errors(url, message):
    with pytest.raises(ValueError, match=message) as exc:
        RedisStore(url)
    assert "pw" not in str(exc.value)


def test_urls_and_what_they_show():
    t = parse_store_url("redis://alice:p%40ss@Redis.Example:6390/3")
    assert (t.host, t.port, t.db, t.username, t.password) == ("redis.example", 6390, 3, "alice", "p@ss")
    assert t.where == "redis://alice@redis.example:6390/3"
    assert parse_store_url("redis://[::1]").where == "redis://[::1]:6379/0"
    assert parse_store_url("unix:///run/redis.sock?db=2").where == "unix:///run/redis.sock?db=2"
    assert parse_store_url("rediss://h/0").ssl_context.check_hostname  # checked by default
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://h", prefix="a:b")


# -- what is stored is checked when read --------------------------------------------------

async def test_garbage_is_read_safely(redis_server, stores):  # noqa: F811
    db = await stores()
    await db.put_user(user("u1", "k", "n"))
    await db.put_user(user("u2", "k2", "n2"))
    await db.put_token(TokenRecord(token="t", kind="forward"))
    await db.flush([], [EventRecord(id=1, time=1.0, type="x")])
    await raw(redis_server, "HSET", "trisocks:user:u1", "bytes_up", "lots", "bytes_down", "-5",
              "last_seen", "never", "rec", '{"id":"u1","key":"k","name":"n","status":"weird"}')
    await raw(redis_server, "HSET", "trisocks:user:u2", "rec", "{not json")
    await raw(redis_server, "HSET", "trisocks:token:t", "rec", '{"kind":"forward"}')  # no token
    await raw(redis_server, "XADD", "trisocks:events", "*", "id", "x", "e", "[]")
    await raw(redis_server, "ZADD", "trisocks:users", "99", "ghost")
    snap = await reopened(db)
    [u] = snap.users
    assert (u.id, u.bytes_up, u.bytes_down, u.last_seen, u.status) == ("u1", 0, 0, None, "disabled")
    assert snap.tokens == [] and [e.type for e in snap.events] == ["x"]
    # a flush over a garbage count starts it again from 0 rather than failing
    await db.flush([Counters(owner="user", ident="u1", bytes_up=3, bytes_down=0,
                             total_connections=0)], [])
    assert (await db.snapshot()).users[0].bytes_up == 3


async def test_a_newer_layout_is_refused(redis_server):  # noqa: F811
    await raw(redis_server, "SET", "trisocks:schema", "99")
    with pytest.raises(StoreError, match="newer trisocks"):
        await RedisStore(redis_server.url).open()
    store = RedisStore(redis_server.url, prefix="other")  # another prefix is another layout
    await store.open()
    await store.close()
    assert await raw(redis_server, "GET", "other:schema") == b"1"


async def test_a_closed_store_refuses_calls_until_opened_again(stores):
    db = await stores()
    await db.close()
    with pytest.raises(StoreError, match="closed"):
        await db.put_token(TokenRecord(token="x", kind="forward"))
    await db.open()
    await db.put_token(TokenRecord(token="x", kind="forward"))


async def test_open_and_close_in_any_task_and_scope(redis_server):  # noqa: F811
    """As the plane does: open() under a deadline that ends before the store does, close()
    from a shielded scope of another task (a pool held by the caller would break both)."""
    store = RedisStore(redis_server.url)
    with trio.fail_after(5):
        await store.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put_user, user("u1", "k1", "a"))
    assert [u.id for u in (await store.snapshot()).users] == ["u1"]

    async def close():
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await store.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close)
    with pytest.raises(StoreError, match="closed"):
        await store.check()


# -- when Redis goes away -----------------------------------------------------------------

def _every_call(db: RedisStore):
    yield "check", db.check()
    yield "generation", db.generation()
    yield "snapshot", db.snapshot()
    yield "put_token", db.put_token(TokenRecord(token="t2", kind="forward"))
    yield "delete_tokens", db.delete_tokens(["t"])
    yield "put_user", db.put_user(user("u2", "k2", "b"))
    yield "reset_user", db.reset_user("u1")
    yield "delete_user", db.delete_user("u1")
    yield "put_webhook", db.put_webhook(WebhookRecord(name="w", url="https://w", secret="s"))
    yield "delete_webhook", db.delete_webhook("w")
    yield "flush", db.flush([Counters(owner="user", ident="u1", bytes_up=1, bytes_down=1,
                                      total_connections=1)], [EventRecord(id=1, time=1.0, type="x")], 1)
    yield "usage", db.usage("user", "u1", 0, 10)
    yield "prune_usage", db.prune_usage(0)
    yield "put_node", db.put_node(NodeRecord(id="n"))
    yield "nodes", db.nodes()
    yield "delete_node", db.delete_node("n")


async def test_every_call_fails_fast_while_redis_is_down_then_works_again(redis_server, stores):  # noqa: F811
    db = await stores()
    await db.put_user(user("u1", "k1", "a"))
    redis_server.stop()
    for name, call in _every_call(db):
        start = time.monotonic()
        with pytest.raises(StoreError, match=rf"^redis://127\.0\.0\.1:{redis_server.port}/0: "):
            await call
        assert time.monotonic() - start < 5, name
    with pytest.raises(StoreError, match="connection refused"):
        await db.check()
    redis_server.start()  # empty: this one keeps nothing
    for _name, call in _every_call(db):
        await call
    assert [u.id for u in (await db.snapshot()).users] == ["u2"]


async def test_a_flush_that_failed_counts_once_when_retried(tmp_path, stores):
    server = start_redis(tmp_path, appendonly=True)  # what was written survives the restart
    try:
        db = await stores(url=server.url)
        await db.put_user(user("u1", "k1", "a"))
        grown = [Counters(owner="user", ident="u1", bytes_up=7, bytes_down=1, total_connections=1)]
        await db.flush(grown, [], 5)
        server.stop()
        with pytest.raises(StoreError):
            await db.flush(grown, [EventRecord(id=2, time=2.0, type="x")], 5)
        server.start()
        await db.flush(grown, [EventRecord(id=2, time=2.0, type="x")], 5)  # the flusher's retry
        snap = await reopened(db)
        assert counts(snap.users[0]) == (14, 2, 2)
        assert await db.usage("user", "u1", 5, 5) == [(5, 14, 2, 2)]
        assert [e.type for e in snap.events] == ["x"]
    finally:
        server.close()


async def test_open_while_redis_is_down_is_a_store_error(redis_server):  # noqa: F811
    redis_server.stop()
    store = RedisStore(redis_server.url)
    with pytest.raises(StoreError, match="connection refused"):
        await store.open()
    redis_server.start()
    assert (await store.open()).users == []  # a later try works
    await store.close()


async def test_a_redis_that_does_not_answer_times_out(redis_server, stores):  # noqa: F811
    db = await stores()
    redis_server.freeze()
    try:
        start = time.monotonic()
        with pytest.raises(StoreError, match="no answer within 2 s"):
            await db.check()
        assert 1.5 < time.monotonic() - start < 5
    finally:
        redis_server.thaw()
    await db.check()
