"""Every request and response body of the management API, as msgspec Structs.

One definition gives validation (bodies are decoded straight into these types: a wrong
type or a missing field is a 422 naming the field, an unknown field is refused), the JSON
encoding, and the OpenAPI schema (``/api/openapi.json``, see openapi.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from ..policy.spec import Policy

# -- shared pieces ---------------------------------------------------------------------------

Port = Annotated[int, Meta(ge=0, le=65535, description="TCP port; 0 or absent: any free port")]
Bytes = Annotated[int, Meta(ge=0, le=1 << 62)]
UserKey = Annotated[str, Meta(
    pattern=r"^[A-Za-z0-9._~-]{8,128}$",
    description="8 to 128 characters of A-Z a-z 0-9 . _ ~ - (it goes in URLs and share links)")]
UserName = Annotated[str, Meta(
    pattern=r"^[A-Za-z0-9._@+-]{1,64}$",
    description="1 to 64 characters of A-Z a-z 0-9 . _ @ + - ; unique; the SOCKS5 username "
    "on reverse-mode ports")]
Timestamp = Annotated[datetime, Meta(tz=True, description=(
    "RFC 3339 date-time with a time zone, between 1970-01-01T00:00:00Z and "
    "2200-01-01T00:00:00Z (app.check_dates; msgspec has no bounds for dates)"))]
# a SOCKS5 username or password (RFC 1929: at most 255 bytes; the plane checks the bytes)
SocksText = Annotated[str, Meta(max_length=255)]
Status = Literal["active", "disabled", "on_hold"]  # what the API may set
ResetStrategy = Literal["none", "day", "week", "month", "year"]
HoldDuration = Annotated[int, Meta(ge=60, le=100 * 365 * 86400, description=(
    "seconds of validity that start at the first connection (status on_hold)"))]


class Request(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are refused."""


# -- errors --------------------------------------------------------------------------------------


class Error(Struct, kw_only=True):
    """Every error: ``success`` is false and ``error`` says why."""

    success: bool = False
    error: str


class ValidationError(Struct, kw_only=True):
    """A body or query parameter of the wrong type, missing, out of range or unknown (422)."""

    success: bool = False
    error: str
    field: str | None = None


# -- LinkSocks token API ---------------------------------------------------------------------------


class TokenRequest(Request):
    """POST /api/token. LinkSocks clients send every field (zero values for the unused ones),
    so every field is accepted for every type; zero values mean "not given"."""

    type: str
    token: str = ""
    port: Port | None = None
    username: SocksText = ""
    password: SocksText = ""
    reverse_token: str = ""
    allow_manage_connector: bool = False


class TokenDeleteRequest(Request):
    """DELETE /api/token. Same fields as TokenRequest (LinkSocks decodes the same struct)."""

    token: str = ""
    type: str = ""
    port: Port | None = None
    username: str = ""
    password: str = ""
    reverse_token: str = ""
    allow_manage_connector: bool = False


class TokenResult(Struct, kw_only=True):
    success: bool = True
    token: str
    port: int | UnsetType = UNSET  # reverse tokens only


class TokenStatus(Struct, kw_only=True):
    token: str
    type: Literal["forward", "reverse"]
    clients_count: int
    port: int | UnsetType = UNSET  # reverse tokens only
    connector_tokens: list[str] | UnsetType = UNSET  # reverse tokens that have some


class StatusResponse(Struct, kw_only=True):
    version: str
    tokens: list[TokenStatus]


# -- users -----------------------------------------------------------------------------------------


class UserCreate(Request):
    key: UserKey | UnsetType = UNSET
    name: UserName | UnsetType = UNSET
    limit_bytes: Bytes | None = None
    expires_at: Timestamp | None = None
    status: Status = "active"
    policy: Policy | UnsetType = UNSET  # destination rules and limits (docs/policy.md)
    reset_strategy: ResetStrategy = "none"  # periodic traffic resets (docs/operations.md)
    on_hold_duration: HoldDuration | None = None  # with status on_hold


class UserLimit(Request):
    limit_bytes: Bytes | None


class UserExpiry(Request):
    expires_at: Timestamp | None


class UserPatch(Request):
    """Change any of these; absent fields stay as they are."""

    status: Status | UnsetType = UNSET
    name: UserName | UnsetType = UNSET
    limit_bytes: Bytes | None | UnsetType = UNSET
    expires_at: Timestamp | None | UnsetType = UNSET
    policy: Policy | UnsetType = UNSET  # the fields given change; null removes one
    reset_strategy: ResetStrategy | UnsetType = UNSET
    on_hold_duration: HoldDuration | None | UnsetType = UNSET


class RuleLevel(Struct, kw_only=True):
    level: Literal["user", "token", "server", "default"]
    rules: list[str]


class Device(Struct, kw_only=True):
    address: str
    since: datetime
    sessions: int


class Live(Struct, kw_only=True):
    """What the account is doing now, against its limits."""

    rate_up: float  # bytes per second, over the last second
    rate_down: float
    channels: int
    devices: list[Device]
    refused: dict[str, int]  # policy refusals since start, by kind (channels, rate, devices, clients)


class User(Struct, kw_only=True):
    key: str
    name: str
    id: str
    bytes_up: int
    bytes_down: int
    connections: int  # open channels (SOCKS5 connections) now
    total_connections: int
    clients: int  # WebSocket sessions authenticated with the key now
    limit_bytes: int | None
    expires_at: datetime | None
    # active, disabled, on_hold, expired or limited (docs/operations.md); blocked says why
    status: Literal["active", "disabled", "on_hold", "expired", "limited"]
    reset_strategy: ResetStrategy
    next_reset: datetime | None
    last_reset: datetime | None
    on_hold_duration: int | None
    blocked: str | None  # why traffic is refused now ("traffic limit reached", "expired", "disabled")
    created_at: datetime
    last_seen: datetime | None
    policy: Policy
    rules_in_force: list[RuleLevel]  # checked in this order, first match wins
    live: Live


class TokenPatch(Request):
    policy: Policy  # the fields given change; null removes one


class TokenDetail(Struct, kw_only=True):
    token: str
    type: Literal["forward", "reverse", "connector"]
    clients: int
    policy: Policy
    rules_in_force: list[RuleLevel]
    live: Live


class UserList(Struct, kw_only=True):
    users: list[User]
    total: int  # users that match the filters (the page may hold fewer)


class UsersQuery(Struct, kw_only=True):
    """GET /api/users filters and paging."""

    status: Literal["active", "disabled", "on_hold", "expired", "limited"] | None = None
    expiring_before: Timestamp | None = None
    usage_over: Annotated[float, Meta(ge=0, le=1000)] | None = None  # percent of limit_bytes
    offset: Annotated[int, Meta(ge=0)] = 0
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 1000


class UsersRemove(Request):
    """POST /api/users/remove: every user whose status is one of these."""

    status: Annotated[list[Literal["expired", "limited", "disabled", "on_hold"]],
                      Meta(min_length=1)]


class Removed(Struct, kw_only=True):
    success: bool = True
    removed: list[str]  # their names


class Deleted(Struct, kw_only=True):
    success: bool = True
    key: str


class ServerStatus(Struct, kw_only=True):
    version: str
    uptime_seconds: float
    total_users: int
    status: Literal["running"]


# -- subscribe -------------------------------------------------------------------------------------


class Subscription(Struct, kw_only=True):
    """What a client needs: ``trisocks client -u SERVER -t TOKEN -p SOCKS_PORT``."""

    server: str  # WebSocket URL of the tunnel
    token: str
    mode: Literal["forward"]
    socks_port: int  # suggested local SOCKS5 port
    share_link: str
    name: str
    expires_at: datetime | None
    limit_bytes: int | None


# -- observability -----------------------------------------------------------------------------------


class Figures(Struct, kw_only=True):
    bytes_up: int
    bytes_down: int
    rate_up: float  # bytes per second, over the last second
    rate_down: float
    channels: int  # open now
    clients: int  # WebSocket sessions now


class TokenFigures(Figures, kw_only=True):
    token: str
    type: Literal["forward", "reverse", "connector"]
    total_connections: int
    providers: int | UnsetType = UNSET  # reverse tokens


class UserFigures(Figures, kw_only=True):
    key: str
    name: str
    total_connections: int


class Stats(Struct, kw_only=True):
    uptime_seconds: float
    totals: Figures
    tokens: list[TokenFigures]
    users: list[UserFigures]
    internal_errors: int  # unexpected errors since start (each ended one connection or request)


class EventsQuery(Struct, kw_only=True):
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100
    since: Timestamp | None = None
    until: Timestamp | None = None
    token: str | None = None
    user: str | None = None  # a user's name or key
    type: str | None = None


class Event(Struct, kw_only=True):
    id: int
    time: datetime
    type: str
    token: str | None = None
    user: str | None = None
    peer: str | None = None
    role: str | None = None
    detail: str | None = None


class Events(Struct, kw_only=True):
    events: list[Event]


class HealthChecks(Struct, kw_only=True):
    database: str
    listener: str


class Health(Struct, kw_only=True):
    # degraded: a node of a cluster that cannot reach the shared store; it carries traffic
    # for the users and tokens it knows and writes its counters when the store is back
    status: Literal["ok", "degraded", "error"]
    checks: HealthChecks


# -- cluster ---------------------------------------------------------------------------------------


class Node(Struct, kw_only=True):
    id: str  # host/pid/random
    this: bool  # the node that answers
    url: str  # where the other nodes reach it for bridged channels ("" none)
    host: str
    pid: int
    version: str
    started_at: datetime | None
    seen_at: datetime | None  # its last heartbeat
    sessions: int  # WebSocket sessions open on it (clients, providers, connectors)
    channels: int
    providers: dict[str, int]  # reverse token -> providers connected to it
    store_error: str | None  # the node cannot write the store


class Cluster(Struct, kw_only=True):
    """GET /api/cluster: the nodes alive (heard of in the last few seconds)."""

    store: str  # the shared store, without its password
    shared: bool  # false: a lone server (its only node is itself)
    nodes: list[Node]
    sessions: int  # over the nodes
    channels: int


# -- usage history ---------------------------------------------------------------------------------


class UsageQuery(Struct, kw_only=True):
    """GET /api/usage and /api/users/{key}/usage: a time range (default: the last 7 days by
    hour, the last 30 by day) cut into hours or UTC days."""

    from_: Timestamp | None = field(default=None, name="from")
    to: Timestamp | None = None
    step: Literal["hour", "day"] = "hour"


class UsageBucket(Struct, kw_only=True):
    start: datetime  # the hour or UTC day the figures are of
    bytes_up: int
    bytes_down: int
    connections: int  # channels opened


class Usage(Struct, kw_only=True):
    """Buckets with traffic only (an hour without any is absent); the totals are their sums."""

    step: Literal["hour", "day"]
    from_: datetime = field(name="from")
    to: datetime
    bytes_up: int
    bytes_down: int
    connections: int
    buckets: list[UsageBucket]


class ReloadResult(Struct, kw_only=True):
    """POST /api/reload (and SIGHUP): what the new configuration file changed."""

    success: bool
    applied: list[str]  # what changed live
    restart_needed: list[str]  # settings that changed in the file but need a restart
    error: str | None = None  # why the file was refused (then nothing changed)
