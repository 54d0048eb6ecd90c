"""Several server processes on one shared store: workers of one host on the SQLite file, or
hosts on one Redis (docs/scale-out.md).

Every node keeps the whole plane in memory, as a lone server does, and the store is where
they meet. Three things keep a node in step with the others:

* **Changes.** An API change is committed to the store before it takes effect anywhere
  (state.py), and it moves the store's ``generation``. Each node reads the generation every
  ``POLL`` seconds; when it moved, the node re-reads tokens and users (``snapshot``) and
  applies the difference: a user disabled, limited, rotated or deleted on node 2 has its
  channels on node 1 cut within about ``POLL`` seconds. Polling a number, rather than a
  pub/sub message, cannot miss a change while a node is away: it just finds it later.
* **Counters.** Each node adds its own growth to the store (the flusher, as increments) and
  reads everyone's back at least every ``RESYNC`` seconds. What the others added since the
  node last looked is folded into its meters (:func:`fold_counters`), so a limit is checked
  against the cluster's total. How far the total can pass a limit: each node may carry, for
  a user it has not yet seen cross the limit, what it moves in one flush interval plus one
  resync interval (about 2 s of that user's traffic per node; docs/scale-out.md).
* **Heartbeats.** Each node writes a NodeRecord every ``HEARTBEAT`` seconds: its URL for
  node-to-node bridges, its providers per reverse token, its sessions per token and user.
  The others read them to find providers elsewhere (:meth:`Cluster.providers_elsewhere`,
  which the tunnel server asks) and to answer the API with cluster-wide figures.

When the store cannot be reached, the node goes on from what it has: known users and tokens
keep working, the flusher keeps the increments it could not write (loops.py) and writes
them when the store is back, and /healthz says "degraded".
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import Counter

import trio

from .._version import __version__
from ..policy import spec
from ..tunnel.tokens import CONNECTOR, FORWARD, REVERSE, TokenInfo, redact
from .model import DISABLED, REASON_DISABLED, REASON_EXPIRED, Meter, TokenMeter, UserAccount
from .records import restore_policy
from .rows import NodeRecord, Snapshot, TokenRecord, UserRecord
from .state import PlaneState
from .store import StoreError

log = logging.getLogger("trisocks.management.cluster")

POLL = 0.1  # seconds between reads of the store's generation
RESYNC = 1.0  # the other nodes' counters are read at least this often
HEARTBEAT = 1.0  # seconds between heartbeats
ALIVE = 5.0  # a node not heard of for this long is taken for gone
URGENT_GAP = 0.01  # at least this long between two syncs asked for by checkpoints


def fold_counters(meter: Meter, up: int, down: int, connections: int) -> None:
    """Make ``meter`` count what the store holds (``up``, ``down``, ``connections``): what the
    other nodes added since it last looked. ``meter.flushed`` is what the store held of it at
    that time plus this node's flushed growth; the difference is the others' growth, and it
    goes into both the counters and the baseline, so the next flush writes only ours."""
    base_up, base_down, base_conns = meter.flushed[:3]
    d_up, d_down, d_conns = up - base_up, down - base_down, connections - base_conns
    if not (d_up or d_down or d_conns):
        return
    meter.done_up += d_up
    meter.done_down += d_down
    meter.used += d_up + d_down
    meter.total_connections += d_conns
    if meter._sample is not None:  # rates stay this node's own
        when, s_up, s_down = meter._sample
        meter._sample = (when, s_up + d_up, s_down + d_down)
    meter.flushed = (up, down, connections, *meter.flushed[3:])


def restart_counters(meter: Meter, up: int, down: int, connections: int) -> None:
    """Another node reset the counters: count from what the store holds now."""
    meter.reset()
    meter.done_up, meter.done_down = up, down
    meter.used = up + down
    meter.total_connections = connections
    meter.flushed = (up, down, connections, *meter.flushed[3:])


class Cluster:
    """This node's part in a cluster: follows the store, beats, and knows the other nodes."""

    def __init__(self, state: PlaneState, *, loops, webhooks, node_url=lambda: "") -> None:
        self.state = state
        self.loops = loops
        self.webhooks = webhooks
        self.node_url = node_url  # () -> str: the tunnel server knows it once it listens
        self.node_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.started_at = time.time()
        self.others: list[NodeRecord] = []  # the other nodes alive at the last heartbeat
        self.syncs = 0
        self._generation: int | None = None
        self._hooks_seen: list | None = None
        # a user passed a checkpoint (model.UserAccount.charge): flush and re-read now
        self._urgent = trio.Event()
        self._last_urgent = -1.0

    # -- what the tunnel server and the API ask -------------------------------------------------
    def providers_elsewhere(self, token: str) -> list[str]:
        """URLs of the other live nodes with providers of reverse token ``token``, the least
        busy first."""
        nodes = [n for n in self.others if n.url and n.providers.get(token)]
        nodes.sort(key=lambda n: n.channels / max(1, n.providers[token]))
        return [n.url for n in nodes]

    def remote_clients(self) -> Counter:
        """Sessions on the other live nodes, by token (users: ``user:<id>``)."""
        out: Counter = Counter()
        for node in self.others:
            out.update(node.clients)
        return out

    def this_node(self) -> NodeRecord:
        st = self.state
        server = st.server
        clients: Counter = Counter()
        for info in server.session_tokens():
            account = info.account
            clients["user:" + account.id if isinstance(account, UserAccount) else info.token] += 1
        providers = server.provider_counts() if hasattr(server, "provider_counts") else {}
        channels = sum(len(u.channels) for u in st.users.values()) + sum(
            len(i.account.channels) for i in st.tokens if isinstance(i.account, TokenMeter))
        return NodeRecord(id=self.node_id, url=self.node_url(), host=socket.gethostname(),
                          pid=os.getpid(), version=__version__, started_at=self.started_at,
                          seen_at=time.time(), sessions=sum(clients.values()), channels=channels,
                          providers={t: n for t, n in providers.items() if n},
                          clients=dict(clients), store_error=st.store_error)

    # -- running ----------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow)
                nursery.start_soon(self._beat)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.state.store.delete_node(self.node_id)
                except StoreError:
                    pass  # its heartbeat ages out

    def checkpoint_passed(self) -> None:
        self._urgent.set()

    async def _follow(self) -> None:
        last = -RESYNC
        while True:
            with trio.move_on_after(POLL):
                await self._urgent.wait()
            if self._urgent.is_set():
                # near a limit: our growth to the store, then everyone's back (at most every
                # URGENT_GAP seconds, so a flood of users at their limits costs little)
                self._urgent = trio.Event()
                await trio.sleep(max(0.0, self._last_urgent + URGENT_GAP - trio.current_time()))
                self._last_urgent = trio.current_time()
                await self.loops.flush()
                if await self.sync():
                    last = trio.current_time()
                continue
            try:
                generation = await self.state.store.generation()
            except StoreError:
                continue  # the flusher and /healthz report it
            if generation != self._generation or trio.current_time() - last >= RESYNC:
                last = trio.current_time()
                if await self.sync():
                    self._generation = generation

    async def _beat(self) -> None:
        store = self.state.store
        while True:
            try:
                await store.put_node(self.this_node())
                now = time.time()
                self.others = [n for n in await store.nodes()
                               if n.id != self.node_id and now - n.seen_at < ALIVE]
            except StoreError:
                pass
            await trio.sleep(HEARTBEAT)

    async def sync(self) -> bool:
        """Re-read tokens and users and apply what changed; False if the store failed."""
        st = self.state
        async with st.lock:  # no flush of ours between reading the counters and folding them
            try:
                snap = await st.store.snapshot()
            except StoreError as exc:
                log.debug("cannot re-read the store: %s", exc)
                return False
            await self.apply(snap)
        self.syncs += 1
        return True

    async def apply(self, snap: Snapshot) -> None:
        await self._apply_tokens(snap.tokens)
        self._apply_users(snap.users)
        if self.webhooks is not None and snap.webhooks != self._hooks_seen:
            self._hooks_seen = snap.webhooks
            self.webhooks.restore(snap.webhooks, follow=True)
        self.state.wake_enforcer()

    # -- tokens -------------------------------------------------------------------------------------
    async def _apply_tokens(self, records: list[TokenRecord]) -> None:
        st = self.state
        stored = {r.token: r for r in records}
        for info in list(st.tokens):
            meter = info.account
            if not isinstance(meter, TokenMeter) or meter.origin == "runtime":
                continue
            rec = stored.get(info.token)
            if rec is None:
                if meter.origin == "api":  # removed through another node's API
                    st.server.remove_token(info.token)
                    st.events.add("token_removed", token=info.token, detail="on another node")
                continue
            fold_counters(meter, rec.bytes_up, rec.bytes_down, rec.total_connections)
            if rec.policy != spec.encode(meter.policy):
                restore_policy(meter, rec.policy, f"token {redact(rec.token)}")
        # reverse tokens first: connector tokens need theirs
        for rec in sorted(records, key=lambda r: r.kind != REVERSE):
            if rec.origin == "api" and st.tokens.get(rec.token) is None:
                await self._add_token(rec)

    async def _add_token(self, rec: TokenRecord) -> None:
        st = self.state
        try:
            if rec.kind == REVERSE:
                info = await st.server.add_reverse_token(
                    rec.token, port=rec.port or None, username=rec.username, password=rec.password,
                    allow_manage_connector=rec.allow_manage_connector)
            elif rec.kind == CONNECTOR:
                rev = st.tokens.get(rec.reverse_token)
                if rev is None or rev.kind != REVERSE:
                    return  # its reverse token is not here (yet)
                info = st.tokens.add(TokenInfo(rec.token, CONNECTOR, reverse_token=rec.reverse_token))
            elif rec.kind == FORWARD:
                info = st.tokens.add(TokenInfo(rec.token, FORWARD))
            else:
                return
        except (OSError, ValueError) as exc:
            log.error("%s token %s added on another node cannot be served here: %s", rec.kind,
                      redact(rec.token), getattr(exc, "strerror", None) or exc)
            st.server.remove_token(rec.token)
            return
        meter = info.account if isinstance(info.account, TokenMeter) else None
        if meter is None:
            meter = info.account = TokenMeter(info)
        meter.origin = "api"
        meter.created_at = rec.created_at
        meter.flushed = (0, 0, 0, None)
        fold_counters(meter, rec.bytes_up, rec.bytes_down, rec.total_connections)
        restore_policy(meter, rec.policy, f"token {redact(rec.token)}")
        st.events.add("token_added", token=rec.token, role=rec.kind, detail="on another node")

    # -- users ------------------------------------------------------------------------------------
    def _apply_users(self, records: list[UserRecord]) -> None:
        st = self.state
        stored = {r.id: r for r in records}
        nodes = 1 + len(self.others)
        for user in list(st.users.values()):
            rec = stored.pop(user.id, None)
            if rec is None:
                self._drop_user(user)
            else:
                self._update_user(user, rec)
        for rec in stored.values():  # created on another node
            self.loops.add_user(rec)
        for user in st.users.values():
            user.nodes = nodes
            user.on_checkpoint = self.checkpoint_passed
            user.place_checkpoint()

    def _drop_user(self, user: UserAccount) -> None:
        st = self.state
        st.users.pop(user.key, None)
        st.users_by_name.pop(user.name, None)
        if st.tokens.get(user.key) is not None and st.tokens.get(user.key).account is user:
            st.tokens.remove(user.key)
        user.status = DISABLED
        user.update_allow()
        st.cut(user, "user deleted", sessions=True)
        log.info("user %s deleted on another node", user.name)

    def _update_user(self, user: UserAccount, rec: UserRecord) -> None:
        st = self.state
        before = (user.key, user.status, user.expires_at, user.limit_bytes)
        if rec.key != user.key:  # rotated on another node
            st.tokens.remove(user.key)
            st.users.pop(user.key, None)
            st.cut(user, "key rotated", sessions=True)
            user.key = rec.key
            st.users[user.key] = user
            st.tokens.add(TokenInfo(user.key, FORWARD, account=user))
        if rec.name != user.name:
            st.users_by_name.pop(user.name, None)
            st.users_by_name[rec.name] = user
            user.name = rec.name
        base_up, base_down = user.flushed[:2]
        if (rec.last_reset != user.last_reset or rec.bytes_up < base_up
                or rec.bytes_down < base_down):
            restart_counters(user, rec.bytes_up, rec.bytes_down, rec.total_connections)
            user.quota_noted = False
        else:
            fold_counters(user, rec.bytes_up, rec.bytes_down, rec.total_connections)
        if rec.limit_bytes != user.limit_bytes:
            user.quota_noted = False  # a new limit: crossing it is news again
        for name in ("limit_bytes", "expires_at", "status", "reset_strategy", "next_reset",
                     "last_reset", "on_hold_duration"):
            setattr(user, name, getattr(rec, name))
        if rec.last_seen is not None and (user.last_seen is None or rec.last_seen > user.last_seen):
            user.last_seen = rec.last_seen
        if rec.policy != spec.encode(user.policy):
            restore_policy(user, rec.policy, f"user {rec.name!r}")
        user.update_allow()
        after = user.refuse_reason()
        if after is None:
            return
        if before != (user.key, user.status, user.expires_at, user.limit_bytes):
            # disabled or expired: the key no longer opens a session either
            st.cut(user, after, sessions=after in (REASON_DISABLED, REASON_EXPIRED))
        elif user.channels:  # e.g. the limit, crossed by what the other nodes carried
            user.close_channels(after)
