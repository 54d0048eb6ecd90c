"""trisocks.management.store: the SQLite store, on a temporary file."""

from __future__ import annotations

import pytest

from trisocks.management.store import (
    Counters,
    EventRecord,
    SQLiteStore,
    StoreError,
    StoreInUse,
    TokenRecord,
    UserRecord,
)


@pytest.fixture
async def db(tmp_path):
    path = tmp_path / "state" / "t.db"
    store = SQLiteStore(path)
    snap = await store.open()
    assert (snap.tokens, snap.users, snap.events) == ([], [], [])
    try:
        yield store
    finally:
        await store.close()


async def reopen(store: SQLiteStore):
    await store.close()
    again = SQLiteStore(store.path)
    return again, await again.open()


async def test_tokens_round_trip(db):
    await db.put_token(TokenRecord(token="fwd", kind="forward", created_at=1.5e9))
    await db.put_token(TokenRecord(token="rev", kind="reverse", port=1080, username="u", password="p",
                                   allow_manage_connector=True, created_at=1.6e9))
    await db.put_token(TokenRecord(token="con", kind="connector", reverse_token="rev", created_at=1.7e9))
    await db.delete_tokens(["fwd"])
    store, snap = await reopen(db)
    try:
        assert [t.token for t in snap.tokens] == ["rev", "con"]
        rev = snap.tokens[0]
        assert (rev.port, rev.username, rev.password, rev.allow_manage_connector) == (1080, "u", "p", True)
        assert snap.tokens[1].reverse_token == "rev"
    finally:
        await store.close()


async def test_users_round_trip_and_update_keeps_counters(db):
    rec = UserRecord(id="u1", key="key1", name="alice", limit_bytes=1000, expires_at=2e9,
                     created_at=1.6e9)
    await db.put_user(rec)
    await db.flush([Counters(owner="user", ident="u1", bytes_up=10, bytes_down=20, total_connections=1,
                             last_seen=1.7e9)], [])
    # an API change: counters in the record are not written
    await db.put_user(UserRecord(id="u1", key="key1", name="alice2", limit_bytes=None, status="disabled",
                                 created_at=1.6e9, bytes_up=999))
    store, snap = await reopen(db)
    try:
        [u] = snap.users
        assert (u.name, u.limit_bytes, u.status) == ("alice2", None, "disabled")
        assert (u.bytes_up, u.bytes_down, u.total_connections, u.last_seen) == (10, 20, 1, 1.7e9)
    finally:
        await store.close()


async def test_a_key_or_name_of_another_user_is_an_error(db):
    await db.put_user(UserRecord(id="u1", key="key1", name="alice", created_at=1.6e9))
    with pytest.raises(StoreError):
        await db.put_user(UserRecord(id="u2", key="key1", name="bob", created_at=1.6e9))
    with pytest.raises(StoreError):
        await db.put_user(UserRecord(id="u2", key="key2", name="alice", created_at=1.6e9))
    await db.put_user(UserRecord(id="u2", key="key2", name="bob", created_at=1.6e9))  # still usable


async def test_counters_are_added_as_increments(db):
    await db.put_token(TokenRecord(token="tok", kind="forward", created_at=1.6e9))
    await db.put_user(UserRecord(id="u1", key="k", name="n", created_at=1.6e9))
    for seen in (1.7e9, 1.65e9):
        await db.flush([Counters(owner="token", ident="tok", bytes_up=100, bytes_down=1, total_connections=2),
                        Counters(owner="user", ident="u1", bytes_up=5, bytes_down=6, total_connections=1,
                                 last_seen=seen),
                        Counters(owner="user", ident="gone", bytes_up=5, bytes_down=6, total_connections=1)],
                       [])
    store, snap = await reopen(db)
    try:
        [t] = snap.tokens
        assert (t.bytes_up, t.bytes_down, t.total_connections) == (200, 2, 4)
        [u] = snap.users
        assert (u.bytes_up, u.bytes_down, u.total_connections) == (10, 12, 2)
        assert u.last_seen == 1.7e9  # the later time is kept
    finally:
        await store.close()


async def test_reset_and_delete_user(db):
    await db.put_user(UserRecord(id="u1", key="k1", name="a", created_at=1.6e9))
    await db.put_user(UserRecord(id="u2", key="k2", name="b", created_at=1.6e9))
    await db.flush([Counters(owner="user", ident="u1", bytes_up=5, bytes_down=6, total_connections=3)], [])
    await db.reset_user("u1")
    await db.delete_user("u2")
    store, snap = await reopen(db)
    try:
        [u] = snap.users
        assert (u.id, u.bytes_up, u.bytes_down, u.total_connections) == ("u1", 0, 0, 3)
    finally:
        await store.close()


async def test_events_round_trip_most_recent_loaded(tmp_path):
    store = SQLiteStore(tmp_path / "e.db", events_loaded=3)
    await store.open()
    events = [EventRecord(id=i, time=1.6e9 + i, type="auth_success", token="t", detail=f"d{i}")
              for i in range(1, 6)]
    await store.flush([], events[:2])
    await store.flush([], events[2:])
    await store.close()
    again = SQLiteStore(tmp_path / "e.db", events_loaded=3)
    snap = await again.open()
    try:
        assert snap.events == events[2:]
    finally:
        await again.close()


async def test_a_second_store_on_the_same_file_is_refused(db):
    second = SQLiteStore(db.path)
    with pytest.raises(StoreInUse, match="in use"):
        await second.open()
    await db.check()  # the first one is unharmed
    await db.close()
    snap = await second.open()  # free once the first closed
    assert snap.users == []
    await second.close()


async def test_a_closed_store_refuses_calls(db):
    await db.close()
    with pytest.raises(StoreError, match="closed"):
        await db.put_token(TokenRecord(token="x", kind="forward"))


async def test_check_notices_a_replaced_file(db):
    await db.check()
    db.path.unlink()
    db.path.write_bytes(b"")
    with pytest.raises(StoreError, match="replaced or removed"):
        await db.check()


async def test_a_file_from_a_newer_schema_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    # the lock was dropped with the failure: another try gets the same answer, not "in use"
    with pytest.raises(StoreError, match="newer"):
        await SQLiteStore(path).open()


async def test_garbage_counters_are_read_as_zero(tmp_path):
    import sqlite3

    path = tmp_path / "g.db"
    store = SQLiteStore(path)
    await store.open()
    await store.put_user(UserRecord(id="u1", key="k", name="n", created_at=1.6e9))
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE users SET bytes_up = 'lots', bytes_down = -5, status = 'weird'")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    snap = await store.open()
    await store.close()
    [u] = snap.users
    assert (u.bytes_up, u.bytes_down, u.status) == (0, 0, "disabled")


async def test_generation_moves_with_changes_not_with_flushes(db):
    first = await db.generation()
    await db.put_user(UserRecord(id="u1", key="k1", name="a", status="active", created_at=1.0))
    after_put = await db.generation()
    assert after_put != first
    await db.flush([Counters(owner="user", ident="u1", bytes_up=5, bytes_down=7,
                             total_connections=1, last_seen=2.0)], [])
    assert await db.generation() == after_put  # counters are not a change to re-read
    await db.reset_user("u1")
    assert await db.generation() != after_put
    snap = await db.snapshot()
    assert [(u.id, u.bytes_up, u.bytes_down) for u in snap.users] == [("u1", 0, 0)]
    assert snap.events == []


async def test_workers_share_one_file_under_the_supervisors_lock(tmp_path):
    """Workers open the file shared (the supervisor holds the lock for them): each sees the
    other's changes and counters, their events do not replace each other's, and a lone
    server on the same file is still refused."""
    from trisocks.management.rows import NodeRecord
    from trisocks.management.store import lock_database

    path = tmp_path / "w.db"
    held = lock_database(path)
    a, b = SQLiteStore(path, shared=True), SQLiteStore(path, shared=True)
    try:
        await a.open()
        await b.open()
        with pytest.raises(StoreInUse):
            await SQLiteStore(path).open()
        await a.put_user(UserRecord(id="u1", key="k1", name="a", status="active", created_at=1.0))
        seen = await b.generation()
        assert [u.id for u in (await b.snapshot()).users] == ["u1"]
        await b.flush([Counters(owner="user", ident="u1", bytes_up=1, bytes_down=2,
                                total_connections=1, last_seen=3.0)],
                      [EventRecord(id=1, time=1.0, type="x")])
        await a.flush([Counters(owner="user", ident="u1", bytes_up=10, bytes_down=20,
                                total_connections=1, last_seen=4.0)],
                      [EventRecord(id=1, time=2.0, type="y")])
        assert await a.generation() == seen
        (user,) = (await a.snapshot()).users
        assert (user.bytes_up, user.bytes_down, user.total_connections) == (11, 22, 2)
        await a.put_node(NodeRecord(id="n1", url="ws://127.0.0.1:1", seen_at=5.0,
                                    providers={"rev": 2}))
        await b.put_node(NodeRecord(id="n2", seen_at=6.0))
        assert [(n.id, n.providers) for n in await b.nodes()] == [("n1", {"rev": 2}), ("n2", {})]
        await a.delete_node("n1")
        assert [n.id for n in await b.nodes()] == ["n2"]
    finally:
        await a.close()
        await b.close()
    import os
    os.close(held)
    again = SQLiteStore(path)
    snap = await again.open()
    assert sorted(e.type for e in snap.events) == ["x", "y"]
    await again.close()
