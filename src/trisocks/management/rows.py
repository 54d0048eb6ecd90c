"""The rows the store keeps (tokens, users, counter increments, events), and the checks
applied to what is read back: a value no version of trisocks would write (a date outside
the API's range, a text where a number belongs) is logged and replaced by a safe one."""

from __future__ import annotations

import logging
import math

import msgspec

from .dates import MIN_TIME, stored_time

log = logging.getLogger("trisocks.management.store")


class StoreError(Exception):
    """The store cannot do what was asked (disk full, file corrupt, locked...)."""


class StoreInUse(StoreError):
    """Another process (a second server) has the database open."""


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
    policy: str = ""  # JSON of a trisocks.policy.spec.Policy ("" or "{}": none)


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
    policy: str = ""
    reset_strategy: str = "none"
    next_reset: float | None = None
    last_reset: float | None = None
    on_hold_duration: int | None = None


class Counters(msgspec.Struct, kw_only=True):
    """What one owner's counters grew by since the last flush: the store adds it."""

    owner: str  # "token" or "user"
    ident: str  # the token, or the user's id
    bytes_up: int
    bytes_down: int
    total_connections: int
    last_seen: float | None = None  # a time, not an increment: the later one is kept


class EventRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: int
    time: float
    type: str
    token: str | None = None
    user: str | None = None
    peer: str | None = None
    role: str | None = None
    detail: str | None = None


class WebhookRecord(msgspec.Struct, kw_only=True):
    """A webhook added through the API (webhooks.py); those of the config file are not kept."""

    name: str
    url: str
    secret: str  # needed to sign: kept as given (the database file is 0600)
    events: list[str] | None = None  # None: every webhook event
    created_at: float = 0.0


class Snapshot(msgspec.Struct):
    tokens: list[TokenRecord]
    users: list[UserRecord]
    events: list[EventRecord]
    webhooks: list[WebhookRecord] = msgspec.field(default_factory=list)


class NodeRecord(msgspec.Struct, kw_only=True):
    """One server process of a cluster, as it last told the shared store (a heartbeat).

    ``url`` is where the other nodes reach this one's tunnel port for bridged channels
    (docs/scale-out.md; "" when it takes none). The maps are this node's own figures: the
    API adds them up over the nodes alive for cluster-wide answers."""

    id: str
    url: str = ""
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    seen_at: float = 0.0
    sessions: int = 0
    channels: int = 0
    bytes_up: int = 0  # carried by this node since it started
    bytes_down: int = 0
    providers: dict[str, int] = {}  # reverse token -> providers connected to this node
    clients: dict[str, int] = {}  # token (or user id for users) -> sessions on this node
    store_error: str | None = None


def _count(value, what: str) -> int:
    """A stored counter: a non-negative integer, or 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return int(value)
    log.warning("%s: stored value %r is not a count; taken as 0", what, value)
    return 0


def clean_user(rec: UserRecord) -> UserRecord:
    what = f"user {rec.name!r}"
    for name in ("id", "key", "name"):
        if not isinstance(getattr(rec, name), str):
            setattr(rec, name, str(getattr(rec, name)))
    rec.expires_at = stored_time(rec.expires_at, f"{what} expires_at", invalid=MIN_TIME)
    rec.created_at = stored_time(rec.created_at, f"{what} created_at", invalid=MIN_TIME) or MIN_TIME
    rec.last_seen = stored_time(rec.last_seen, f"{what} last_seen", invalid=None)
    if rec.limit_bytes is not None:
        limit = _count(rec.limit_bytes, f"{what} limit_bytes")  # garbage: 0, fail closed
        rec.limit_bytes = min(limit, 1 << 62)
    if rec.reset_strategy not in ("none", "day", "week", "month", "year"):
        log.warning("%s: stored reset_strategy %r is unknown; taken as none", what,
                    rec.reset_strategy)
        rec.reset_strategy = "none"
    rec.next_reset = stored_time(rec.next_reset, f"{what} next_reset", invalid=None)
    rec.last_reset = stored_time(rec.last_reset, f"{what} last_reset", invalid=None)
    if rec.on_hold_duration is not None:
        rec.on_hold_duration = _count(rec.on_hold_duration, f"{what} on_hold_duration") or None
    if rec.status == "on_hold" and rec.on_hold_duration is None:
        log.warning("%s: on hold without a duration; taken as active", what)
        rec.status = "active"
    if rec.status not in ("active", "disabled", "on_hold"):
        log.warning("%s: stored status %r is unknown; taken as disabled", what, rec.status)
        rec.status = "disabled"
    for name in ("bytes_up", "bytes_down", "total_connections"):
        setattr(rec, name, _count(getattr(rec, name), f"{what} {name}"))
    rec.policy = rec.policy if isinstance(rec.policy, str) else ""
    return rec


def clean_token(rec: TokenRecord) -> TokenRecord:
    what = f"token row {rec.kind}"
    rec.token = str(rec.token)
    rec.created_at = stored_time(rec.created_at, f"{what} created_at", invalid=MIN_TIME) or MIN_TIME
    for name in ("bytes_up", "bytes_down", "total_connections"):
        setattr(rec, name, _count(getattr(rec, name), f"{what} {name}"))
    rec.policy = rec.policy if isinstance(rec.policy, str) else ""
    return rec


def clean_event(rec: EventRecord) -> EventRecord:
    rec.time = stored_time(rec.time, f"event {rec.id}", invalid=MIN_TIME) or MIN_TIME
    return rec


def webhook_from_row(name, url, secret, events, created_at) -> WebhookRecord | None:
    """A stored webhook, or None (logged) for a row no version of trisocks would write."""
    if not all(isinstance(v, str) for v in (name, url, secret)):
        log.warning("webhook row %r: not text; skipped", name)
        return None
    chosen = None
    if events is not None:
        try:
            chosen = msgspec.json.decode(events, type=list[str])
        except (msgspec.DecodeError, TypeError):
            log.warning("webhook %r: stored events %r unreadable; taken as every event", name, events)
    when = stored_time(created_at, f"webhook {name!r} created_at", invalid=MIN_TIME) or MIN_TIME
    return WebhookRecord(name=name, url=url, secret=secret, events=chosen, created_at=when)


def usage_rows(counters: list[Counters], hour: int) -> list[tuple]:
    """Usage-history rows for one flush: (owner, ident, hour, up, down, connections) for each
    owner that grew, and the server's total under ("server", "")."""
    rows = [(c.owner, c.ident, hour, c.bytes_up, c.bytes_down, c.total_connections)
            for c in counters if c.bytes_up or c.bytes_down or c.total_connections]
    if rows:
        rows.append(("server", "", hour, sum(r[3] for r in rows), sum(r[4] for r in rows),
                     sum(r[5] for r in rows)))
    return rows
