"""Where tokens, users, counters and events are kept between runs.

The API and the tunnel side reach stored state only through :class:`Store`, an async
interface, so that a shared backend (Redis, for several server nodes) can replace the
embedded one later. :class:`SQLiteStore` is the embedded default: one file, one
connection, every call run in a worker thread (``trio.to_thread``) under a lock, so the
event loop never waits on the disk and the data path never touches the database.

Durability: every API change is one committed transaction before the API answers.
Counters and events are written by the management plane's flusher once a second and at
shutdown. The database runs in WAL mode with ``synchronous=NORMAL``: a crash of the
process loses nothing committed; a power loss may lose the last transactions.

One server per file: the store holds an exclusive lock (``flock`` on ``<db>.lock``) for as
long as it is open, and a second server on the same file refuses to start
(:class:`StoreInUse`). Two servers on one file double-spent quotas and replaced each
other's users. Counters are written as increments and API changes never write counters
(only a reset zeroes them), so even two writers that met would lose no bytes.

What is read back is checked: a value no version of trisocks would write (a date outside
the API's range, a text where a number belongs) is logged and replaced by a safe one,
so an old or hand-edited file cannot break a listing or a start.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

import msgspec
import trio

from .lock import lock_database, lock_path_of
from .rows import (
    Counters,
    EventRecord,
    NodeRecord,
    Snapshot,
    StoreError,
    StoreInUse,
    TokenRecord,
    UserRecord,
    WebhookRecord,
    clean_event,
    clean_token,
    clean_user,
    usage_rows,
    webhook_from_row,
)

log = logging.getLogger("trisocks.management.store")

# 1: 0.1.0. 2: a policy (JSON, trisocks.policy.spec) per token and user.
# 3: usage history (hourly buckets per owner). The webhooks table came later: a table of its
# own, created when missing, so an older trisocks opening the file just ignores it.
SCHEMA_VERSION = 3
EVENTS_KEPT = 100_000  # rows of the events table; older ones are pruned as new ones come


class Store(Protocol):
    """What the management plane needs from storage. Every method may raise StoreError.

    A ``shared`` store is written by other server processes too (workers of one host on one
    SQLite file, or nodes on one Redis): the plane then re-reads it (``generation`` tells
    when an API change was committed anywhere, ``snapshot`` what is stored now) and keeps a
    heartbeat in it (``put_node``/``nodes``); see management/cluster.py."""

    description: str
    shared: bool

    async def open(self) -> Snapshot:
        """Prepare the store and return everything kept (events: the most recent)."""

    async def put_token(self, record: TokenRecord) -> None:
        """Create a token, or update a stored one (its counters are kept as stored)."""

    async def delete_tokens(self, tokens: list[str]) -> None: ...

    async def put_user(self, record: UserRecord) -> None:
        """Create a user, or update one by id; counters of a stored one are kept as stored.
        A key or name that another user has is an error, never a replacement."""

    async def reset_user(self, user_id: str) -> None:
        """Zero a user's byte counters."""

    async def delete_user(self, user_id: str) -> None: ...

    async def put_webhook(self, record: WebhookRecord) -> None:
        """Create a webhook, or replace the one of that name."""

    async def delete_webhook(self, name: str) -> None: ...

    async def flush(self, counters: list[Counters], events: list[EventRecord],
                    hour: int | None = None) -> None:
        """Add counter increments (of owners that still exist) and append events, in one go;
        with ``hour`` (unix time // 3600) the increments go to that hour's usage too."""

    async def usage(self, owner: str, ident: str, first: int, last: int) -> list[tuple]:
        """(hour, bytes up, bytes down, connections) of one owner's hours first..last; owner
        "user" (ident: the user's id), "token" (the token) or "server" (ident "")."""

    async def prune_usage(self, before: int) -> None:
        """Forget the usage of hours before ``before``."""

    async def check(self) -> None:
        """Raise StoreError unless the store can be written now."""

    async def snapshot(self) -> Snapshot:
        """Tokens, users (their counters as stored now) and webhooks; no events."""

    async def generation(self) -> int:
        """A number that changes with every committed put, delete or reset (not with flush)."""

    async def put_node(self, node: NodeRecord) -> None: ...  # create or replace a heartbeat
    async def nodes(self) -> list[NodeRecord]: ...  # the last heartbeats (judge by seen_at)

    async def delete_node(self, node_id: str) -> None: ...

    async def close(self) -> None: ...


def default_path() -> Path:
    """``$XDG_STATE_HOME/trisocks/trisocks.db``, or ``~/.local/state/trisocks/trisocks.db``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "trisocks" / "trisocks.db"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,
    port INTEGER,
    username TEXT NOT NULL DEFAULT '',
    password TEXT NOT NULL DEFAULT '',
    allow_manage_connector INTEGER NOT NULL DEFAULT 0,
    reverse_token TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    total_connections INTEGER NOT NULL DEFAULT 0,
    policy TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    limit_bytes INTEGER,
    expires_at REAL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen REAL,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    total_connections INTEGER NOT NULL DEFAULT 0,
    policy TEXT NOT NULL DEFAULT '',
    reset_strategy TEXT NOT NULL DEFAULT 'none',
    next_reset REAL,
    last_reset REAL,
    on_hold_duration INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT NOT NULL,
    ident TEXT NOT NULL,
    hour INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    connections INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, ident, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    seen_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    token TEXT,
    user TEXT,
    peer TEXT,
    role TEXT,
    detail TEXT
);
"""

_TOKEN_COLS = ("token", "kind", "origin", "port", "username", "password", "allow_manage_connector",
               "reverse_token", "created_at", "bytes_up", "bytes_down", "total_connections", "policy")
_USER_COLS = ("id", "key", "name", "limit_bytes", "expires_at", "status", "created_at", "last_seen",
              "bytes_up", "bytes_down", "total_connections", "policy", "reset_strategy",
              "next_reset", "last_reset", "on_hold_duration")
_WEBHOOK_COLS = ("name", "url", "secret", "events", "created_at")
_EVENT_COLS = ("id", "time", "type", "token", "user", "peer", "role", "detail")
_COUNTER_COLS = ("bytes_up", "bytes_down", "total_connections", "last_seen")


def _upsert(table: str, cols: tuple[str, ...], key: str) -> str:
    """Insert a row, or update a stored one without touching its counters."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != key and c not in _COUNTER_COLS)
    return (f"INSERT INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
            f"ON CONFLICT({key}) DO UPDATE SET {updates}")


# columns added since schema 1 (0.1.0): a database from then gets them at open
_ADDED = (("tokens", "policy", "TEXT NOT NULL DEFAULT ''"),
          ("users", "policy", "TEXT NOT NULL DEFAULT ''"),
          ("users", "reset_strategy", "TEXT NOT NULL DEFAULT 'none'"),
          ("users", "next_reset", "REAL"), ("users", "last_reset", "REAL"),
          ("users", "on_hold_duration", "INTEGER"))


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database of an older schema up to this one (the tables exist by now)."""
    for table, column, kind in _ADDED:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            log.info("database: %s.%s added (schema %d)", table, column, SCHEMA_VERSION)


def _read(conn: sqlite3.Connection) -> Snapshot:
    """Tokens, users and webhooks as stored (events: none)."""
    tokens = [clean_token(TokenRecord(**dict(zip(_TOKEN_COLS, row, strict=False))))
              for row in conn.execute(f"SELECT {','.join(_TOKEN_COLS)} FROM tokens ORDER BY rowid")]
    for t in tokens:
        t.allow_manage_connector = bool(t.allow_manage_connector)
    users = [clean_user(UserRecord(**dict(zip(_USER_COLS, row, strict=False))))
             for row in conn.execute(f"SELECT {','.join(_USER_COLS)} FROM users ORDER BY rowid")]
    users.sort(key=lambda u: u.created_at)  # stable: rowid order among equals
    hooks = [webhook_from_row(*row) for row in conn.execute(
        f"SELECT {','.join(_WEBHOOK_COLS)} FROM webhooks ORDER BY rowid")]
    return Snapshot(tokens, users, [], [h for h in hooks if h is not None])


_BUMP = ("INSERT INTO meta (key, value) VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE "
         "SET value = CAST(value AS INTEGER) + 1")


class SQLiteStore:
    """The embedded store: a SQLite file (created 0600 in a 0700 directory)."""

    def __init__(self, path: str | os.PathLike, *, events_loaded: int = 10_000,
                 shared: bool = False) -> None:
        self.path = Path(path)
        self.description = f"SQLite {self.path}"
        self.events_loaded = events_loaded
        # shared: one of the workers of `trisocks server --workers N`, whose supervisor holds
        # the file's lock (lock_database) for all of them; every worker writes the file
        self.shared = shared
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened
        self._lock_fd: int | None = None  # holds the flock on <db>.lock while open

    @property
    def lock_path(self) -> Path:
        return lock_path_of(self.path)

    # -- plumbing -------------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(self._locked, fn, args)

    def _locked(self, fn, args):
        with self._lock:
            if self._conn is None and getattr(fn, "__func__", None) is not SQLiteStore._open_sync:
                raise StoreError("database is closed")
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if self._conn is not None and self._conn.in_transaction:
                    try:
                        self._conn.rollback()
                    except sqlite3.Error:
                        pass
                raise StoreError(f"{self.path}: {exc}") from None

    def _tx(self, statements, change: bool = False):
        """Run (sql, params-list) pairs in one IMMEDIATE transaction; ``change``: an API
        change, which moves the generation other processes watch."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                if rows:
                    conn.executemany(sql, rows)
            if change:
                conn.execute(_BUMP)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- Store ----------------------------------------------------------------------------
    async def open(self) -> Snapshot:
        return await self._run(self._open_sync)

    def _take_lock(self) -> None:
        if not self.shared:
            self._lock_fd = lock_database(self.path)

    def _drop_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _open_sync(self) -> Snapshot:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        self._take_lock()
        try:
            return self._open_locked()
        except BaseException:
            self._drop_lock()
            raise

    def _open_locked(self) -> Snapshot:
        try:
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer trisocks (schema {version}, "
                                 f"this one knows {SCHEMA_VERSION})")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            snap = _read(conn)
            events = [clean_event(EventRecord(**dict(zip(_EVENT_COLS, row, strict=False))))
                      for row in conn.execute(f"SELECT {','.join(_EVENT_COLS)} FROM events "
                                              "ORDER BY id DESC LIMIT ?", (self.events_loaded,))]
        except BaseException:
            conn.close()
            raise
        events.reverse()
        snap.events = events
        self._conn = conn
        self._identity = self._stat_identity()
        return snap

    async def snapshot(self) -> Snapshot:
        return await self._run(lambda: _read(self._conn))

    async def generation(self) -> int:
        rows = await self._run(self._query, "SELECT value FROM meta WHERE key = 'generation'", ())
        return int(rows[0][0]) if rows else 0

    async def put_node(self, node: NodeRecord) -> None:
        row = (node.id, node.seen_at, msgspec.json.encode(node).decode())
        await self._run(self._tx, [("INSERT OR REPLACE INTO nodes (id, seen_at, body) VALUES (?, ?, ?)",
                                    [row])])

    async def nodes(self) -> list[NodeRecord]:
        rows = await self._run(self._query, "SELECT body FROM nodes ORDER BY id", ())
        out = []
        for (body,) in rows:
            try:
                out.append(msgspec.json.decode(body, type=NodeRecord))
            except msgspec.DecodeError:
                log.warning("database: a node row cannot be read; ignored")
        return out

    async def delete_node(self, node_id: str) -> None:
        await self._run(self._tx, [("DELETE FROM nodes WHERE id = ?", [(node_id,)])])

    async def put_token(self, record: TokenRecord) -> None:
        row = tuple(getattr(record, c) for c in _TOKEN_COLS)
        await self._run(self._tx, [(_upsert("tokens", _TOKEN_COLS, "token"), [row])], True)

    async def delete_tokens(self, tokens: list[str]) -> None:
        await self._run(self._tx, [("DELETE FROM tokens WHERE token = ?", [(t,) for t in tokens])], True)

    async def put_user(self, record: UserRecord) -> None:
        row = tuple(getattr(record, c) for c in _USER_COLS)
        await self._run(self._tx, [(_upsert("users", _USER_COLS, "id"), [row])], True)

    async def reset_user(self, user_id: str) -> None:
        await self._run(self._tx, [("UPDATE users SET bytes_up = 0, bytes_down = 0 WHERE id = ?",
                                    [(user_id,)])], True)

    async def delete_user(self, user_id: str) -> None:
        await self._run(self._tx, [("DELETE FROM users WHERE id = ?", [(user_id,)]),
                                   ("DELETE FROM usage WHERE owner = 'user' AND ident = ?",
                                    [(user_id,)])], True)

    async def put_webhook(self, record: WebhookRecord) -> None:
        events = None if record.events is None else msgspec.json.encode(record.events).decode()
        row = (record.name, record.url, record.secret, events, record.created_at)
        await self._run(self._tx, [(f"INSERT OR REPLACE INTO webhooks ({','.join(_WEBHOOK_COLS)}) "
                                    "VALUES (?, ?, ?, ?, ?)", [row])], True)

    async def delete_webhook(self, name: str) -> None:
        await self._run(self._tx, [("DELETE FROM webhooks WHERE name = ?", [(name,)])], True)

    async def flush(self, counters: list[Counters], events: list[EventRecord],
                    hour: int | None = None) -> None:
        if not counters and not events:
            return
        token_rows = [(c.bytes_up, c.bytes_down, c.total_connections, c.ident)
                      for c in counters if c.owner == "token"]
        user_rows = [(c.bytes_up, c.bytes_down, c.total_connections, c.last_seen, c.ident)
                     for c in counters if c.owner == "user"]
        # A shared file has other writers whose event ids count on their own: there the
        # database numbers the rows.
        cols = _EVENT_COLS[1:] if self.shared else _EVENT_COLS
        event_rows = [tuple(getattr(e, c) for c in cols) for e in events]
        user_rows = [(up, down, conns, seen, seen, ident) for up, down, conns, seen, ident in user_rows]
        statements = [
            (("UPDATE tokens SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?, "
              "total_connections = total_connections + ? WHERE token = ?"), token_rows),
            # last_seen: the later of the two (max() is NULL when either is)
            (("UPDATE users SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?, "
              "total_connections = total_connections + ?, "
              "last_seen = COALESCE(MAX(last_seen, ?), last_seen, ?) WHERE id = ?"), user_rows),
            ((f"INSERT OR REPLACE INTO events ({','.join(cols)}) "
             f"VALUES ({','.join('?' * len(cols))})"), event_rows),
        ]
        if hour is not None:
            statements.append((
                "INSERT INTO usage (owner, ident, hour, bytes_up, bytes_down, connections) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, ident, hour) DO UPDATE SET "
                "bytes_up = bytes_up + excluded.bytes_up, "
                "bytes_down = bytes_down + excluded.bytes_down, "
                "connections = connections + excluded.connections", usage_rows(counters, hour)))
        if event_rows:
            statements.append(("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                               [(EVENTS_KEPT,)]))
        await self._run(self._tx, statements)

    async def usage(self, owner: str, ident: str, first: int, last: int) -> list[tuple]:
        return await self._run(self._query, (
            "SELECT hour, bytes_up, bytes_down, connections FROM usage WHERE owner = ? AND "
            "ident = ? AND hour BETWEEN ? AND ? ORDER BY hour"), (owner, ident, first, last))

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    async def prune_usage(self, before: int) -> None:
        await self._run(self._tx, [("DELETE FROM usage WHERE hour < ?", [(before,)])])

    async def check(self) -> None:
        await self._run(self._check_sync)

    def _stat_identity(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror or exc}") from None
        return st.st_dev, st.st_ino

    def _check_sync(self) -> None:
        # The open connection keeps writing into a file that was deleted or replaced, and
        # nothing of it would survive a restart: that is a broken store too.
        if self._stat_identity() != self._identity:
            raise StoreError(f"{self.path} was replaced or removed while in use")
        self._tx([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   [("health", str(time.time()))])])

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error:
                    pass
                self._conn = None
            self._drop_lock()



__all__ = ["Counters", "EventRecord", "NodeRecord", "SQLiteStore", "Snapshot", "Store", "StoreError",
           "StoreInUse", "TokenRecord", "UserRecord", "WebhookRecord", "default_path",
           "lock_database"]
