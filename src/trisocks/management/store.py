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

log = logging.getLogger("trisocks.management.store")

SCHEMA_VERSION = 1
EVENTS_KEPT = 100_000  # rows of the events table; older ones are pruned as new ones come


class StoreError(Exception):
    """The store cannot do what was asked (disk full, file corrupt, locked...)."""


class TokenRecord(msgspec.Struct, kw_only=True):
    token: str
    kind: str
    origin: str = "api"  # "api": created through the API and restored at start; "cli": from -t
    port: int | None = None  # reverse: the SOCKS5 port it had
    username: str = ""
    password: str = ""
    allow_manage_connector: bool = False
    reverse_token: str = ""
    created_at: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    total_connections: int = 0


class UserRecord(msgspec.Struct, kw_only=True):
    id: str
    key: str
    name: str
    limit_bytes: int | None = None
    expires_at: float | None = None
    status: str = "active"
    created_at: float = 0.0
    last_seen: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    total_connections: int = 0


class Counters(msgspec.Struct, kw_only=True):
    """One owner's traffic counters, as the flusher writes them."""

    owner: str  # "token" or "user"
    ident: str  # the token, or the user's id
    bytes_up: int
    bytes_down: int
    total_connections: int
    last_seen: float | None = None


class EventRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: int
    time: float
    type: str
    token: str | None = None
    user: str | None = None
    peer: str | None = None
    role: str | None = None
    detail: str | None = None


class Snapshot(msgspec.Struct):
    tokens: list[TokenRecord]
    users: list[UserRecord]
    events: list[EventRecord]


class Store(Protocol):
    """What the management plane needs from storage. Every method may raise StoreError."""

    description: str

    async def open(self) -> Snapshot:
        """Prepare the store and return everything kept (events: the most recent)."""

    async def put_token(self, record: TokenRecord) -> None:
        """Create or replace a token (counters included)."""

    async def delete_tokens(self, tokens: list[str]) -> None: ...

    async def put_user(self, record: UserRecord) -> None:
        """Create or replace a user by id (its key and name are unique)."""

    async def delete_user(self, user_id: str) -> None: ...

    async def flush(self, counters: list[Counters], events: list[EventRecord]) -> None:
        """Write counters (of owners that still exist) and append events, in one go."""

    async def check(self) -> None:
        """Raise StoreError unless the store can be written now."""

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
    total_connections INTEGER NOT NULL DEFAULT 0
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
    total_connections INTEGER NOT NULL DEFAULT 0
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
               "reverse_token", "created_at", "bytes_up", "bytes_down", "total_connections")
_USER_COLS = ("id", "key", "name", "limit_bytes", "expires_at", "status", "created_at", "last_seen",
              "bytes_up", "bytes_down", "total_connections")
_EVENT_COLS = ("id", "time", "type", "token", "user", "peer", "role", "detail")


class SQLiteStore:
    """The embedded store: a SQLite file (created 0600 in a 0700 directory)."""

    def __init__(self, path: str | os.PathLike, *, events_loaded: int = 10_000) -> None:
        self.path = Path(path)
        self.description = f"SQLite {self.path}"
        self.events_loaded = events_loaded
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened

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

    def _tx(self, statements):
        """Run (sql, params-list) pairs in one IMMEDIATE transaction."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                if rows:
                    conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- Store ----------------------------------------------------------------------------
    async def open(self) -> Snapshot:
        return await self._run(self._open_sync)

    def _open_sync(self) -> Snapshot:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            tokens = [TokenRecord(**dict(zip(_TOKEN_COLS, row, strict=False)))
                      for row in conn.execute(f"SELECT {','.join(_TOKEN_COLS)} FROM tokens ORDER BY rowid")]
            for t in tokens:
                t.allow_manage_connector = bool(t.allow_manage_connector)
            users = [UserRecord(**dict(zip(_USER_COLS, row, strict=False)))
                     for row in conn.execute(f"SELECT {','.join(_USER_COLS)} FROM users "
                                             "ORDER BY created_at, rowid")]
            events = [EventRecord(**dict(zip(_EVENT_COLS, row, strict=False)))
                      for row in conn.execute(f"SELECT {','.join(_EVENT_COLS)} FROM events "
                                              "ORDER BY id DESC LIMIT ?", (self.events_loaded,))]
        except BaseException:
            conn.close()
            raise
        events.reverse()
        self._conn = conn
        self._identity = self._stat_identity()
        return Snapshot(tokens, users, events)

    async def put_token(self, record: TokenRecord) -> None:
        row = tuple(getattr(record, c) for c in _TOKEN_COLS)
        sql = (f"INSERT OR REPLACE INTO tokens ({','.join(_TOKEN_COLS)}) "
               f"VALUES ({','.join('?' * len(_TOKEN_COLS))})")
        await self._run(self._tx, [(sql, [row])])

    async def delete_tokens(self, tokens: list[str]) -> None:
        await self._run(self._tx, [("DELETE FROM tokens WHERE token = ?", [(t,) for t in tokens])])

    async def put_user(self, record: UserRecord) -> None:
        row = tuple(getattr(record, c) for c in _USER_COLS)
        sql = (f"INSERT OR REPLACE INTO users ({','.join(_USER_COLS)}) "
               f"VALUES ({','.join('?' * len(_USER_COLS))})")
        await self._run(self._tx, [(sql, [row])])

    async def delete_user(self, user_id: str) -> None:
        await self._run(self._tx, [("DELETE FROM users WHERE id = ?", [(user_id,)])])

    async def flush(self, counters: list[Counters], events: list[EventRecord]) -> None:
        if not counters and not events:
            return
        token_rows = [(c.bytes_up, c.bytes_down, c.total_connections, c.ident)
                      for c in counters if c.owner == "token"]
        user_rows = [(c.bytes_up, c.bytes_down, c.total_connections, c.last_seen, c.ident)
                     for c in counters if c.owner == "user"]
        event_rows = [tuple(getattr(e, c) for c in _EVENT_COLS) for e in events]
        statements = [
            ("UPDATE tokens SET bytes_up = ?, bytes_down = ?, total_connections = ? WHERE token = ?",
             token_rows),
            (("UPDATE users SET bytes_up = ?, bytes_down = ?, total_connections = ?, last_seen = ? "
             "WHERE id = ?"), user_rows),
            ((f"INSERT OR REPLACE INTO events ({','.join(_EVENT_COLS)}) "
             f"VALUES ({','.join('?' * len(_EVENT_COLS))})"), event_rows),
        ]
        if event_rows:
            last = event_rows[-1][0]
            statements.append(("DELETE FROM events WHERE id <= ?", [(last - EVENTS_KEPT,)]))
        await self._run(self._tx, statements)

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


class MemoryStore:
    """A store that keeps nothing: the plane runs on it when persistence is off (tests)."""

    description = "memory (nothing is kept)"

    def __init__(self) -> None:
        self.broken: str | None = None  # set to make every call fail (tests of failure paths)

    def _check(self) -> None:
        if self.broken:
            raise StoreError(self.broken)

    async def open(self) -> Snapshot:
        self._check()
        return Snapshot([], [], [])

    async def put_token(self, record: TokenRecord) -> None:
        self._check()

    async def delete_tokens(self, tokens: list[str]) -> None:
        self._check()

    async def put_user(self, record: UserRecord) -> None:
        self._check()

    async def delete_user(self, user_id: str) -> None:
        self._check()

    async def flush(self, counters, events) -> None:
        self._check()

    async def check(self) -> None:
        self._check()

    async def close(self) -> None:
        pass
