"""Observation: what the server tells the plane (events), and what the plane tells
operators (stats, events, health, Prometheus metrics)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ..net import guard
from ..policy.admission import refusal_kind
from ..tunnel.tokens import REVERSE, TokenInfo
from . import metrics
from . import schemas as s
from .dates import rfc3339
from .model import ACTIVE, ON_HOLD, Meter, TokenMeter, UserAccount
from .state import PlaneState
from .store import StoreError

log = logging.getLogger("trisocks.management")


class Observer:
    def __init__(self, state: PlaneState, flush: Callable[[], Awaitable[None]]) -> None:
        self.state = state
        self._flush = flush  # health retries a failed flush rather than guess

    # -- what the server and the token table report ---------------------------------------
    def on_server_event(self, kind: str, **f) -> None:
        events = self.state.events
        account = f.get("account")
        user = account.name if isinstance(account, UserAccount) else None
        token = None if user is not None else f.get("token")
        peer, role = f.get("peer"), f.get("role")
        if kind == "auth_success":
            if isinstance(account, Meter):
                account.last_seen = time.time()
            if isinstance(account, UserAccount) and account.status == ON_HOLD:
                self._activate(account)
            events.add("auth_success", token=token, user=user, peer=peer, role=role)
            if role == REVERSE:
                events.add("provider_joined", token=token, peer=peer, role=role)
        elif kind == "auth_failure":
            reason = f.get("reason") or "invalid token"
            events.add("auth_failure", user=user, peer=peer, detail=f"{f.get('how', '')}: {reason}")
        elif kind == "policy_refused":
            if token is None and isinstance(account, TokenMeter):
                token = account.info.token
            reason = f.get("reason") or ""
            self.state.count_refusal(refusal_kind(reason))
            events.add("policy_refused", token=token, user=user, peer=peer,
                       detail=f"{f.get('target')}: {reason}")
        elif kind == "session_closed":
            events.add("session_closed", token=token, user=user, peer=peer, role=role,
                       detail=f.get("reason"))
            if role == REVERSE:
                events.add("provider_left", token=token, peer=peer, role=role,
                           detail=f.get("reason"))

    def _activate(self, user: UserAccount) -> None:
        """The first connection of a user on hold: its validity starts now."""
        st = self.state
        user.status = ACTIVE
        user.expires_at = st.clock() + user.on_hold_duration
        user.expiry_noted = False
        user.update_allow()
        st.dirty.add(user)  # written by the next flush
        st.events.add("user_activated", user=user.name,
                      detail=f"first connection; expires {rfc3339(user.expires_at).isoformat()}")
        log.info("user %s: first connection, valid for %d s", user.name, user.on_hold_duration)

    def token_added(self, info: TokenInfo) -> None:
        if info.owner:  # a provider's own connector token (autonomy mode)
            self.state.events.add("token_added", token=info.token, role=info.kind,
                                  detail="added by a provider")

    def token_removed(self, info: TokenInfo) -> None:
        meter = info.account
        if isinstance(meter, TokenMeter) and meter.origin == "runtime":
            self.state.events.add("token_removed", token=info.token, role=info.kind,
                                  detail="removed with its provider's token" if not info.owner
                                  else "removed by a provider")

    # -- what operators ask -------------------------------------------------------------------
    def stats(self) -> s.Stats:
        st = self.state
        sessions = st.server.session_tokens()
        clients = st.token_clients()
        user_clients = st.user_clients()
        tokens, users = [], []
        tot = {"bytes_up": 0, "bytes_down": 0, "rate_up": 0.0, "rate_down": 0.0, "channels": 0}
        for info in st.tokens:
            meter = info.account
            if not isinstance(meter, TokenMeter):
                continue
            up, down = meter.totals()
            fig = s.TokenFigures(token=info.token, type=info.kind, bytes_up=up, bytes_down=down,
                                 rate_up=round(meter.rate_up, 1), rate_down=round(meter.rate_down, 1),
                                 channels=len(meter.channels), clients=clients[id(info)],
                                 total_connections=meter.total_connections)
            if info.kind == REVERSE:
                fig.providers = st.server.provider_count(info.token)
            tokens.append(fig)
        for user in st.users.values():
            up, down = user.totals()
            users.append(s.UserFigures(key=user.key, name=user.name, bytes_up=up, bytes_down=down,
                                       rate_up=round(user.rate_up, 1), rate_down=round(user.rate_down, 1),
                                       channels=len(user.channels), clients=user_clients[user.id],
                                       total_connections=user.total_connections))
        for fig in (*tokens, *users):
            tot["bytes_up"] += fig.bytes_up
            tot["bytes_down"] += fig.bytes_down
            tot["rate_up"] += fig.rate_up
            tot["rate_down"] += fig.rate_down
            tot["channels"] += fig.channels
        totals = s.Figures(clients=len(sessions), **tot)
        return s.Stats(uptime_seconds=round(time.time() - st.started_at, 3), totals=totals,
                       tokens=tokens, users=users, internal_errors=guard.Stats.internal_errors)

    def events(self, q: s.EventsQuery) -> s.Events:
        users = self.state.users
        aliases: frozenset[str] = frozenset()
        if q.user is not None and q.user in users:
            aliases = frozenset({users[q.user].name})
        found = self.state.events.query(
            limit=q.limit, since=q.since.timestamp() if q.since else None,
            until=q.until.timestamp() if q.until else None, token=q.token, user=q.user,
            type=q.type, user_aliases=aliases)
        return s.Events(events=[
            s.Event(id=e.id, time=rfc3339(e.time), type=e.type, token=e.token, user=e.user,
                    peer=e.peer, role=e.role, detail=e.detail) for e in found])

    async def health(self) -> s.Health:
        st = self.state
        database = "ok"
        try:
            with trio.fail_after(3):
                await st.store.check()
        except (StoreError, trio.TooSlowError) as exc:
            database = "error"
            log.warning("health check: database: %s", exc or "no answer in 3 s")
        if database == "ok" and st.store_error is not None:
            await self._flush()  # the last flush failed: retry it now rather than guess
            if st.store_error is not None:
                database = "error"
        listener = "ok" if st.listening and st.server.ready.is_set() else "error"
        status = "ok" if database == listener == "ok" else "error"
        if status == "error" and listener == "ok" and st.store.shared:
            status = "degraded"  # a cluster's node goes on from what it knows (cluster.py)
        return s.Health(status=status, checks=s.HealthChecks(database=database, listener=listener))

    def cluster(self) -> s.Cluster:
        st = self.state
        if st.cluster is None:
            return s.Cluster(store=st.store.description, shared=False, sessions=len(
                st.server.session_tokens()), channels=0, nodes=[])
        nodes = [(True, st.cluster.this_node()), *((False, n) for n in st.cluster.others)]
        views = [s.Node(id=n.id, this=this, url=n.url, host=n.host, pid=n.pid, version=n.version,
                        started_at=rfc3339(n.started_at), seen_at=rfc3339(n.seen_at),
                        sessions=n.sessions, channels=n.channels, providers=n.providers,
                        store_error=n.store_error) for this, n in nodes]
        return s.Cluster(store=st.store.description, shared=True, nodes=views,
                         sessions=sum(v.sessions for v in views),
                         channels=sum(v.channels for v in views))

    def metrics_text(self) -> str:
        return metrics.render(self.state)
