"""``/metrics``: the plane's figures in the Prometheus text format (0.0.4).

Tokens are labelled by ``token_id``, the first 12 hex digits of the token's SHA-256 (the
token itself is a secret, and metrics travel to places secrets should not); users by
their name.

Cardinality is bounded: series per token and per user are off unless the operator turns
them on (``--metrics-per-owner N``), and then cover at most N tokens and N users (the
busiest by bytes); ``trisocks_metrics_owners_omitted`` says how many were left out.
Everything else has a fixed set of series.
"""

from __future__ import annotations

import time

from .. import IMPLEMENTATION
from .._version import __version__
from ..net import guard
from ..tunnel.tokens import digest
from .model import TokenMeter
from .state import PlaneState


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples) -> None:
        if kind == "counter":
            name += "_total"
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _num(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))


def render(plane: PlaneState) -> str:
    server = plane.server
    sessions = server.session_tokens()
    w = _Writer()
    w.family("trisocks_info", "gauge", "Version and hot path of this server.",
             [({"version": __version__, "implementation": IMPLEMENTATION}, 1)])
    w.family("trisocks_start_time_seconds", "gauge", "Unix time the server started.",
             [({}, float(plane.started_at))])
    w.family("trisocks_uptime_seconds", "gauge", "Seconds since the server started.",
             [({}, round(time.time() - plane.started_at, 3))])

    token_bytes, token_channels, token_conns, token_clients, providers = [], [], [], [], []
    clients = plane.token_clients()
    kinds: dict[str, int] = {"forward": 0, "reverse": 0, "connector": 0}
    total_up = total_down = total_channels = 0
    cap = plane.metrics_per_owner
    metered = [info for info in plane.tokens if isinstance(info.account, TokenMeter)]
    users = list(plane.users.values())
    shown_tokens = _busiest(metered, lambda info: info.account, cap)
    shown_users = _busiest(users, lambda user: user, cap)
    omitted = {"token": len(metered) - len(shown_tokens), "user": len(users) - len(shown_users)}
    for info in metered:
        meter = info.account
        kinds[info.kind] = kinds.get(info.kind, 0) + 1
        up, down = meter.totals()
        total_up += up
        total_down += down
        total_channels += len(meter.channels)
        if id(info) not in shown_tokens:
            continue
        tid = digest(info.token)[:12]
        token_bytes.append(({"token_id": tid, "kind": info.kind, "direction": "up"}, up))
        token_bytes.append(({"token_id": tid, "kind": info.kind, "direction": "down"}, down))
        token_channels.append(({"token_id": tid, "kind": info.kind}, len(meter.channels)))
        token_conns.append(({"token_id": tid, "kind": info.kind}, meter.total_connections))
        token_clients.append(({"token_id": tid, "kind": info.kind}, clients[id(info)]))
        if info.kind == "reverse":
            providers.append(({"token_id": tid}, server.provider_count(info.token)))

    user_bytes, user_channels, user_conns, user_limit, user_blocked = [], [], [], [], []
    for user in users:
        up, down = user.totals()
        total_up += up
        total_down += down
        total_channels += len(user.channels)
        if id(user) not in shown_users:
            continue
        user_bytes.append(({"user": user.name, "direction": "up"}, up))
        user_bytes.append(({"user": user.name, "direction": "down"}, down))
        user_channels.append(({"user": user.name}, len(user.channels)))
        user_conns.append(({"user": user.name}, user.total_connections))
        if user.limit_bytes is not None:
            user_limit.append(({"user": user.name}, user.limit_bytes))
        user_blocked.append(({"user": user.name}, 0 if user.refuse_reason() is None else 1))

    w.family("trisocks_bytes", "counter", "Bytes carried, by direction (up: from users).",
             [({"direction": "up"}, total_up), ({"direction": "down"}, total_down)])
    w.family("trisocks_channels", "gauge", "Open channels (proxied connections).",
             [({}, total_channels)])
    roles: dict[str, int] = {}
    for info in sessions:
        role = "user" if not isinstance(info.account, TokenMeter) and info.account is not None \
            else info.kind
        roles[role] = roles.get(role, 0) + 1
    w.family("trisocks_clients", "gauge", "WebSocket sessions, by the kind of token.",
             [({"kind": k}, v) for k, v in sorted(roles.items())] or [({"kind": "forward"}, 0)])
    w.family("trisocks_tokens", "gauge", "Tokens, by kind.",
             [({"kind": k}, v) for k, v in sorted(kinds.items())])
    w.family("trisocks_users", "gauge", "Users.", [({}, len(plane.users))])
    w.family("trisocks_token_bytes", "counter", "Bytes carried per token, by direction.", token_bytes)
    w.family("trisocks_token_channels", "gauge", "Open channels per token.", token_channels)
    w.family("trisocks_token_connections", "counter", "Channels opened per token.", token_conns)
    w.family("trisocks_token_clients", "gauge", "WebSocket sessions per token.", token_clients)
    w.family("trisocks_reverse_providers", "gauge", "Providers connected per reverse token.",
             providers)
    w.family("trisocks_user_bytes", "counter", "Bytes carried per user, by direction.", user_bytes)
    w.family("trisocks_user_channels", "gauge", "Open channels per user.", user_channels)
    w.family("trisocks_user_connections", "counter", "Channels opened per user.", user_conns)
    w.family("trisocks_user_limit_bytes", "gauge", "Traffic limit per user (users with one).",
             user_limit)
    w.family("trisocks_user_blocked", "gauge", "1 when the user's traffic is refused now.",
             user_blocked)
    w.family("trisocks_metrics_owners_omitted", "gauge",
             "Tokens and users without series of their own (--metrics-per-owner).",
             [({"owner": k}, v) for k, v in sorted(omitted.items())])
    refusals = {"rule": 0, "channels": 0, "rate": 0, "devices": 0, "clients": 0}
    refusals.update(plane.refusals)
    refusals["rule"] = server.refused_destinations  # every connection and datagram, not events
    w.family("trisocks_policy_refusals", "counter",
             "Connections and sessions refused by the traffic policy, by kind (docs/policy.md).",
             [({"kind": k}, v) for k, v in sorted(refusals.items())])
    counts = plane.events.counts
    w.family("trisocks_events", "counter", "Events recorded since start, by type.",
             [({"type": t}, n) for t, n in sorted(counts.items())])
    w.family("trisocks_store_flushes", "counter", "Successful counter flushes to the store.",
             [({}, plane.flushes)])
    w.family("trisocks_store_flush_failures", "counter", "Failed counter flushes.",
             [({}, plane.flush_failures)])
    w.family("trisocks_internal_errors", "counter",
             "Unexpected errors; each ended one connection, channel or API request, not the process.",
             [({}, guard.Stats.internal_errors)])
    return w.text()


def _busiest(owners: list, meter_of, cap: int) -> set[int]:
    """ids of the ``cap`` owners with the most bytes (all of them when they are fewer)."""
    if cap <= 0:
        return set()
    if len(owners) > cap:
        owners = sorted(owners, key=lambda o: -meter_of(o).used)[:cap]
    return {id(o) for o in owners}
