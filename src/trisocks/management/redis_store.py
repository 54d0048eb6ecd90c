"""The shared store: the management plane's state in Redis, for several server processes
and hosts (``--store redis://...``, docs/scale-out.md), through coredis.

Key layout. ``P`` is the prefix (``trisocks`` unless ``--store-prefix`` says otherwise);
nothing is written outside ``P:``, so several deployments can share one Redis::

    P:schema            version of this layout (SCHEMA_VERSION); a newer one is refused
    P:generation        INCR'd with every put, delete and reset (never by a flush)
    P:seq               a counter that orders creations (listings keep that order)
    P:tokens            zset: token -> seq
    P:token:<token>     hash: rec (JSON of the TokenRecord without its counters),
                        bytes_up, bytes_down, total_connections
    P:users             zset: user id -> seq
    P:user:<id>         hash: rec, key, name, bytes_up, bytes_down, total_connections,
                        last_seen
    P:user-keys         hash: key -> user id    (the unique indexes: put_user refuses a
    P:user-names        hash: name -> user id    key or name of another user, atomically)
    P:webhooks          zset: name -> seq; P:webhook: hash name -> JSON of the webhook
    P:events            stream of {id, e: JSON of the event}, trimmed to ~EVENTS_KEPT
    P:event-id          the last event id handed out (nodes' own numbers would collide)
    P:usage:<hour>      hash "<owner>:<u|d|c>:<ident>" -> count; hour = unix time // 3600
    P:usage-hours       zset of the hours that have a P:usage:<hour>
    P:node:<id>         JSON of a node's heartbeat, expiring ``node_ttl`` s after it
    P:nodes             zset of node ids (members whose key expired are dropped on put)
    P:health            written by check()

Every change is one Lua script, so it is atomic across nodes: a key or name check and
the write that depends on it, counters added with HINCRBY only to owners that still exist
(an increment for a deleted user does not bring it back), the generation moved with the
change. Counters are only ever added to, and API writes never touch them.

Failure: any error (refused, reset, TLS, authentication, a Redis error) and any call that
has no answer within ``timeout`` (2 s) raises StoreError naming the URL without its
password ("redis://127.0.0.1:6390/0: connection refused"). The plane keeps serving from
memory and the flusher keeps its increments; when Redis answers again the next call opens a
new connection, no restart needed. coredis never retries by itself: a flush whose answer was
lost is retried by the flusher, so it may count twice, never zero times.

URLs (redis_url.py): ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS,
checked against the system's CAs or ``?ssl_ca_certs=FILE``), ``unix:///path/redis.sock?db=N``.
A standalone Redis or Valkey; not Redis Cluster (the scripts build their keys).

The connection pool of coredis lives in a Trio system task, so that open() and close() may
be called from any task and under any cancel scope.
"""

from __future__ import annotations

import logging
import re
import time

import coredis
import msgspec
import trio

from .redis_scripts import SCRIPTS
from .redis_url import RedisTarget, parse_store_url, reason_of
from .rows import (
    Counters,
    EventRecord,
    NodeRecord,
    Snapshot,
    StoreError,
    TokenRecord,
    UserRecord,
    WebhookRecord,
    clean_event,
    clean_token,
    clean_user,
    usage_rows,
    webhook_from_row,
)
from .store import EVENTS_KEPT

log = logging.getLogger("trisocks.management.store")

SCHEMA_VERSION = 1
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_COUNTS = ("bytes_up", "bytes_down", "total_connections")


class _OneLine(logging.Filter):
    """coredis logs a lost connection with its traceback, and every reload of a script at
    INFO: the StoreError says what matters, once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


logging.getLogger("coredis").addFilter(_OneLine())
logging.getLogger("coredis").setLevel(logging.WARNING)


# -- reading what is stored ---------------------------------------------------------------

def _pairs(flat) -> dict[str, bytes]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _text(raw) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _number(raw, default):
    """A stored count or time; a text that is not a number is handed on for clean_* to log."""
    if raw is None:
        return default
    text = _text(raw)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _json(raw, what: str):
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, TypeError):
        body = None
    if not isinstance(body, dict):
        log.warning("redis: %s cannot be read; skipped", what)
        return None
    return body


def _record(cls, ident: str, fields: dict[str, bytes], counters: tuple[str, ...]):
    what = f"{cls.__name__} {ident!r}"
    body = _json(fields.get("rec"), what)
    if body is None:
        return None
    known = {k: v for k, v in body.items() if k in cls.__struct_fields__ and k not in counters}
    for name in counters:
        known[name] = _number(fields.get(name), None if name == "last_seen" else 0)
    try:
        return cls(**known)
    except TypeError:
        log.warning("redis: %s lacks a field; skipped", what)
        return None


def _body(record, counters: tuple[str, ...]) -> bytes:
    body = msgspec.structs.asdict(record)
    for name in counters:
        body.pop(name)
    return msgspec.json.encode(body)


def _arg(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


class RedisStore:
    """The :class:`~trisocks.management.store.Store` of a cluster: one Redis, many nodes."""

    shared = True

    def __init__(self, url: str, *, prefix: str = "trisocks", events_loaded: int = 10_000,
                 events_kept: int = EVENTS_KEPT, timeout: float = 2.0,
                 node_ttl: float = 30.0) -> None:
        self.target = parse_store_url(url)
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"the key prefix {prefix!r} must be 1 to 64 letters, digits, "
                             "'_', '.' or '-'")
        self.prefix = prefix
        self.where = self.target.where
        self.description = f"Redis {self.where} (keys {prefix}:*)"
        self.events_loaded = events_loaded
        self.events_kept = events_kept
        self.timeout = timeout
        self.node_ttl = node_ttl
        self._open = False
        self._client: coredis.Redis | None = None
        self._scripts: dict = {}
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None  # set when the client's task has ended
        self._starting = trio.Lock()

    # -- plumbing -------------------------------------------------------------------------
    async def _start_client(self) -> None:
        """A client whose pool lives in a system task: open() and close() may then be called
        from any task and under any cancel scope, and calls from every task share it."""
        client = self.target.client(self.timeout)
        stop, stopped, entered = trio.Event(), trio.Event(), trio.Event()
        trio.lowlevel.spawn_system_task(self._hold, client, entered, stop, stopped,
                                        name=f"redis {self.where}")
        await entered.wait()
        if stopped.is_set():
            raise StoreError(f"{self.where}: the Redis client did not start")
        self._client, self._stop, self._stopped = client, stop, stopped
        self._scripts = {name: client.register_script(code) for name, code in SCRIPTS.items()}

    async def _hold(self, client, entered: trio.Event, stop: trio.Event,
                    stopped: trio.Event) -> None:
        try:
            async with client:
                entered.set()
                await stop.wait()
        except Exception as exc:  # a system task must not raise: that would end the process
            log.warning("%s: the Redis client ended: %s", self.where, reason_of(exc) or repr(exc))
        finally:
            stopped.set()
            entered.set()

    async def _call(self, request):
        """Await ``request(client)`` within the timeout; every failure becomes StoreError."""
        if not self._open:
            raise StoreError(f"{self.where}: the store is closed")
        try:
            with trio.fail_after(self.timeout):
                if self._stopped is None or self._stopped.is_set():
                    async with self._starting:  # the first call, or the client's task ended
                        if self._stopped is None or self._stopped.is_set():
                            await self._start_client()
                return await request(self._client)
        except trio.TooSlowError:
            raise StoreError(f"{self.where}: no answer within {self.timeout:g} s") from None
        except Exception as exc:
            reason = reason_of(exc)
            if reason is None:
                raise
            raise StoreError(f"{self.where}: {reason}") from None

    async def _script(self, name: str, *args):
        args = [self.prefix, *map(_arg, args)]
        return await self._call(lambda _: self._scripts[name](args=args))

    # -- Store ----------------------------------------------------------------------------
    async def open(self) -> Snapshot:
        self._open = True
        try:
            stored = await self._script("schema", SCHEMA_VERSION)
            version = _number(stored, 0)
            if not isinstance(version, int):
                raise StoreError(f"{self.where}: {self.prefix}:schema holds {stored!r}, "
                                 "not a schema version")
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.where}: {self.prefix}:* was written by a newer "
                                 f"trisocks (schema {version}, this one knows {SCHEMA_VERSION})")
            snap = await self.snapshot()
            snap.events = await self._events()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        return snap

    async def _events(self) -> list[EventRecord]:
        out = []
        for _sid, flat in await self._script("events", self.events_loaded):
            fields = _pairs(flat)
            body = _json(fields.get("e"), "an event")
            ident = _number(fields.get("id"), None)
            if body is None or not isinstance(ident, int):
                continue
            body = {k: v for k, v in body.items() if k in EventRecord.__struct_fields__}
            body["id"] = ident
            try:
                out.append(clean_event(EventRecord(**body)))
            except TypeError:
                log.warning("redis: event %d lacks a field; skipped", ident)
        out.reverse()
        return out

    async def snapshot(self) -> Snapshot:
        raw_tokens, raw_users, raw_hooks = await self._script("snapshot")
        tokens = []
        for i in range(0, len(raw_tokens) - 1, 2):
            rec = _record(TokenRecord, _text(raw_tokens[i]), _pairs(raw_tokens[i + 1]), _COUNTS)
            if rec is not None:
                rec.allow_manage_connector = bool(rec.allow_manage_connector)
                tokens.append(clean_token(rec))
        users = []
        for i in range(0, len(raw_users) - 1, 2):
            rec = _record(UserRecord, _text(raw_users[i]), _pairs(raw_users[i + 1]),
                          (*_COUNTS, "last_seen"))
            if rec is not None:
                users.append(clean_user(rec))
        users.sort(key=lambda u: u.created_at)  # stable: creation order among equals
        hooks = []
        for raw in raw_hooks:
            body = _json(raw, "a webhook")
            if body is None:
                continue
            events = body.get("events")
            hook = webhook_from_row(body.get("name"), body.get("url"), body.get("secret"),
                                    None if events is None else msgspec.json.encode(events),
                                    body.get("created_at"))
            if hook is not None:
                hooks.append(hook)
        return Snapshot(tokens, users, [], hooks)

    async def generation(self) -> int:
        raw = await self._call(lambda c: c.get(f"{self.prefix}:generation"))
        value = _number(raw, 0)
        if not isinstance(value, int):
            raise StoreError(f"{self.where}: {self.prefix}:generation holds {raw!r}")
        return value

    async def put_token(self, record: TokenRecord) -> None:
        await self._script("put_token", record.token, _body(record, _COUNTS).decode())

    async def delete_tokens(self, tokens: list[str]) -> None:
        await self._script("delete_tokens", *tokens)

    async def put_user(self, record: UserRecord) -> None:
        body = _body(record, (*_COUNTS, "last_seen")).decode()
        taken = await self._script("put_user", record.id, record.key, record.name, body)
        if taken != b"ok":
            what = "key" if taken == b"key" else "name"
            raise StoreError(f"{self.where}: another user has that {what} (users.{what} is unique)")

    async def reset_user(self, user_id: str) -> None:
        await self._script("reset_user", user_id)

    async def delete_user(self, user_id: str) -> None:
        await self._script("delete_user", user_id)

    async def put_webhook(self, record: WebhookRecord) -> None:
        await self._script("put_webhook", record.name, msgspec.json.encode(record).decode())

    async def delete_webhook(self, name: str) -> None:
        await self._script("delete_webhook", name)

    async def flush(self, counters: list[Counters], events: list[EventRecord],
                    hour: int | None = None) -> None:
        if not counters and not events:
            return
        rows = [c for c in counters if c.owner in ("token", "user")]
        args: list = [_arg(hour), self.events_kept, len(rows), len(events)]
        for c in rows:
            args += [c.owner, c.ident, c.bytes_up, c.bytes_down, c.total_connections,
                     _arg(c.last_seen if c.owner == "user" else None)]
        usage = usage_rows(counters, hour) if hour is not None else []
        args += usage[-1][3:] if usage else (0, 0, 0)  # the server's total: every byte carried
        for e in events:
            body = msgspec.structs.asdict(e)
            del body["id"]  # numbered by the store: nodes count on their own
            args.append(msgspec.json.encode(body).decode())
        await self._script("flush", *args)

    async def usage(self, owner: str, ident: str, first: int, last: int) -> list[tuple]:
        rows = await self._script("usage", owner, ident, first, last)
        return [tuple(_count(v) for v in row) for row in rows]

    async def prune_usage(self, before: int) -> None:
        await self._script("prune_usage", before)

    async def check(self) -> None:
        await self._call(lambda c: c.set(f"{self.prefix}:health", repr(time.time())))

    async def put_node(self, node: NodeRecord) -> None:
        ttl = max(1, round(self.node_ttl * 1000))
        await self._script("put_node", node.id, msgspec.json.encode(node).decode(), ttl)

    async def nodes(self) -> list[NodeRecord]:
        out = []
        for raw in await self._script("nodes"):
            try:
                out.append(msgspec.json.decode(raw, type=NodeRecord))
            except msgspec.DecodeError:
                log.warning("redis: a node's heartbeat cannot be read; ignored")
        return out

    async def delete_node(self, node_id: str) -> None:
        await self._script("delete_node", node_id)

    async def close(self) -> None:
        self._open = False
        if self._stop is not None:
            self._stop.set()
            with trio.move_on_after(self.timeout):
                await self._stopped.wait()


def _count(raw) -> int:
    value = _number(raw, 0)
    return value if isinstance(value, int) and value >= 0 else 0


__all__ = ["RedisStore", "RedisTarget", "SCHEMA_VERSION", "parse_store_url"]
