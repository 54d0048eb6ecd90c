"""The plane's work that no request starts: restoring what the store kept, flushing
counters and events to it, and enforcing expiry and limits on live traffic.

Enforcement: the data path refuses new channels (``refuse_reason``) and cuts a channel
whose charge crosses the limit. The enforcer wakes at every expiry and at least twice a
second to close what a passing expiry or an idle channel of an over-quota user left open.
It also notes, once per quota period, a user who has used 80% of their limit
(``quota_warning``; a reset or a higher limit makes it news again).
"""

from __future__ import annotations

import logging
import time

import trio

from ..policy.spec import Policy
from ..tunnel.tokens import CONNECTOR, FORWARD, REVERSE, TokenInfo, redact
from .lifecycle import next_boundary
from .model import REASON_EXPIRED, Meter, TokenMeter
from .records import restore_policy, token_record, user_from_record, user_record
from .state import PlaneState
from .store import Counters, Snapshot, StoreError, TokenRecord

log = logging.getLogger("trisocks.management")

ENFORCE_INTERVAL = 0.5
WARN_PERCENT = 80  # quota_warning when a user has used this share of their limit


class Loops:
    def __init__(self, state: PlaneState, *, flush_interval: float, webhooks=None) -> None:
        self.state = state
        self.flush_interval = flush_interval
        self.webhooks = webhooks  # a WebhookService: restores the stored webhooks
        self._warned: set[str] = set()  # ids of users past WARN_PERCENT of their limit
        # restored reverse tokens and the port they had; see ports_moved()
        self._moved: list[tuple[TokenInfo, int | None]] = []
        self._pruned_at: int | None = None  # the hour the usage history was last pruned

    # -- restoring ----------------------------------------------------------------------------
    async def restore(self, snap: Snapshot) -> None:
        st = self.state
        st.events.restore(snap.events)
        by_kind = {REVERSE: 0, FORWARD: 1, CONNECTOR: 2}
        known = {rec.token for rec in snap.tokens}
        stale: list[str] = []
        for rec in sorted(snap.tokens, key=lambda r: by_kind.get(r.kind, 3)):
            counters = {"bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down,
                        "total_connections": rec.total_connections}
            existing = st.tokens.get(rec.token)
            if existing is not None:  # also given on the command line: that one wins
                if existing.kind == rec.kind and isinstance(existing.account, TokenMeter):
                    m = existing.account
                    m.done_up, m.done_down = rec.bytes_up, rec.bytes_down
                    m.used = rec.bytes_up + rec.bytes_down
                    m.total_connections = rec.total_connections
                    m.created_at = rec.created_at
                    m.flushed = (rec.bytes_up, rec.bytes_down, rec.total_connections, None)
                    if m.policy == Policy():  # a policy from the configuration file wins
                        restore_policy(m, rec.policy, f"token {redact(rec.token)}")
                continue
            if rec.origin != "api":
                continue  # a command-line token no longer given: its row waits for its return
            info = TokenInfo(rec.token, rec.kind)
            if rec.kind == REVERSE:
                info.port = self._free_or_any(rec)
                self._moved.append((info, rec.port))
                info.username, info.password = rec.username, rec.password
                info.allow_manage_connector = rec.allow_manage_connector
            elif rec.kind == CONNECTOR:
                rev = st.tokens.get(rec.reverse_token)
                if rev is None or rev.kind != REVERSE:
                    log.warning("connector token %s: its reverse token is gone; dropped",
                                redact(rec.token))
                    stale.append(rec.token)
                    continue
                info.reverse_token = rec.reverse_token
            elif rec.kind != FORWARD:
                continue
            info.account = TokenMeter(info, origin="api", created_at=rec.created_at, **counters)
            restore_policy(info.account, rec.policy, f"token {redact(rec.token)}")
            try:
                st.tokens.add(info)
            except ValueError as exc:
                log.warning("stored token %s not restored: %s", redact(rec.token), exc)
        if stale:
            await st.store.delete_tokens(stale)
        # command-line tokens get a row, so that their counters are kept too
        for info in st.tokens:
            meter = info.account
            if isinstance(meter, TokenMeter) and meter.origin == "runtime" and not info.owner:
                meter.origin = "cli"
                if info.token not in known:
                    await st.store.put_token(token_record(info))
        for rec in snap.users:
            self.add_user(rec)
        # users already past the warning share were warned before the restart
        self._warned = {u.id for u in st.users.values() if self._past_warning(u)}
        if self.webhooks is not None:
            self.webhooks.restore(snap.webhooks)
        if snap.tokens or snap.users:
            log.info("restored %d token(s) and %d user(s) from %s", len(snap.tokens), len(snap.users),
                     st.store.description)

    def add_user(self, rec) -> None:
        """A stored user into the plane (at start, or created by another node)."""
        st = self.state
        user = user_from_record(rec)
        user.on_quota = st.quota_reached
        st.users[user.key] = user
        st.users_by_name[user.name] = user
        if st.tokens.get(user.key) is not None:
            log.error("user %s: its key is also given as a -t token; the user cannot "
                      "authenticate until one of them changes", user.name)
            return
        st.tokens.add(TokenInfo(user.key, FORWARD, account=user))

    def _free_or_any(self, rec: TokenRecord) -> int:
        """The SOCKS5 port a stored reverse token had, or any free one if that is taken now."""
        if not rec.port:
            return 0
        if any(info.port == rec.port for info in self.state.tokens.of_kind(REVERSE)):
            log.warning("reverse token %s: its SOCKS5 port %d is given to a -t token now; it "
                        "gets another one", redact(rec.token), rec.port)
            return 0
        try:
            self.state.server.check_socks_port(rec.port)
        except OSError as exc:
            log.warning("reverse token %s: its SOCKS5 port %d is taken (%s); it gets another one",
                        redact(rec.token), rec.port, exc.strerror or exc)
            return 0
        return rec.port

    async def save_moved_ports(self) -> None:
        """Once the server runs: a restored reverse token bound to another port than it had
        gets its row rewritten."""
        st = self.state
        for info, stored in self._moved:
            if info.port != stored and st.tokens.get(info.token) is info:
                await st.store.put_token(token_record(info))
        self._moved.clear()

    # -- flushing -------------------------------------------------------------------------------
    async def flush_loop(self) -> None:
        while True:
            await trio.sleep(self.flush_interval)
            await self.flush()

    @staticmethod
    def _growth(meter: Meter, owner: str, ident: str, state: tuple, out: list) -> None:
        """Note what ``meter`` grew by since the store last heard of it."""
        base = meter.flushed
        if state == base:
            return
        out.append((meter, state, Counters(
            owner=owner, ident=ident, bytes_up=state[0] - base[0], bytes_down=state[1] - base[1],
            total_connections=state[2] - base[2], last_seen=state[3])))

    def _collect(self, now: float) -> list[tuple[Meter, tuple, Counters]]:
        out: list = []
        for info in self.state.tokens:
            meter = info.account
            if isinstance(meter, TokenMeter):
                up, down = meter.sample(now)
                if meter.origin != "runtime":
                    self._growth(meter, "token", info.token,
                                 (up, down, meter.total_connections, None), out)
        for user in list(self.state.users.values()):
            before = user._sample
            up, down = user.sample(now)
            if before is not None and (up, down) != before[1:]:
                user.last_seen = now
            self._growth(user, "user", user.id, (up, down, user.total_connections, user.last_seen),
                         out)
        return out

    async def flush(self) -> None:
        st = self.state
        async with st.lock:
            grown = self._collect(time.time())
            events = st.events.take_unsaved()
            hour = int(st.clock() // 3600)
            dirty, st.dirty = st.dirty, set()
            try:
                for user in dirty:  # changed by the plane itself (a first connection...)
                    if st.users.get(user.key) is user:
                        await st.store.put_user(user_record(user))
                await st.store.flush([c for _, _, c in grown], events, hour)
            except StoreError as exc:
                # the baselines stay: the next flush writes this growth and whatever comes
                st.flush_failures += 1
                st.events.put_back(events)
                st.dirty |= dirty
                if st.store_error != str(exc):
                    log.error("cannot save counters and events: %s", exc)
                    st.events.add("store_error", detail=str(exc))
                st.store_error = str(exc)
                return
            for meter, state, _ in grown:
                meter.flushed = state
            if st.store_error is not None:
                log.info("the store works again")
            st.store_error = None
            st.flushes += 1
            if hour != self._pruned_at:  # once an hour: forget what is past the history
                self._pruned_at = hour
                try:
                    await st.store.prune_usage(hour - st.usage_days * 24)
                except StoreError as exc:
                    log.warning("cannot prune the usage history: %s", exc)

    # -- enforcing ------------------------------------------------------------------------------
    @staticmethod
    def _past_warning(user) -> bool:
        limit = user.limit_bytes
        return limit is not None and user.used * 100 >= limit * WARN_PERCENT

    def _warn(self, user) -> None:
        """quota_warning once per quota period: when the user first passes WARN_PERCENT
        (not if the limit itself is reached at once: quota_exceeded says that)."""
        if not self._past_warning(user):
            self._warned.discard(user.id)  # reset, or a higher limit: news again
        elif user.id not in self._warned:
            self._warned.add(user.id)
            if user.used < user.limit_bytes:
                self.state.events.add("quota_warning", user=user.name, detail=(
                    f"{WARN_PERCENT}% of the limit used ({user.used} of {user.limit_bytes} bytes)"))

    async def _periodic_reset(self, user, now: float) -> None:
        """A calendar boundary of the user's reset strategy passed: zero the counters (in
        the store first), and a user cut off by the limit may connect again."""
        st = self.state
        async with st.lock:
            if st.users.get(user.key) is not user or user.next_reset is None or now < user.next_reset:
                return
            nxt = next_boundary(user.reset_strategy, now, st.tz)
            try:
                await st.store.reset_user(user.id)
                await st.store.put_user(user_record(user, last_reset=now, next_reset=nxt))
            except StoreError as exc:
                log.warning("user %s: periodic reset not done, the store failed: %s", user.name, exc)
                user.next_reset = now + ENFORCE_INTERVAL  # try again soon
                return
            user.reset()
            user.flushed = (0, 0, *user.flushed[2:])
            user.last_reset, user.next_reset = now, nxt
        st.events.add("user_reset", user=user.name, detail=f"periodic ({user.reset_strategy})")
        log.info("user %s: traffic reset (%s)", user.name, user.reset_strategy)

    async def enforce_loop(self) -> None:
        st = self.state
        while True:
            wait = ENFORCE_INTERVAL
            now = st.clock()
            for user in list(st.users.values()):
                if user.next_reset is not None:
                    if now >= user.next_reset:
                        await self._periodic_reset(user, now)
                    if user.next_reset is not None:
                        wait = min(wait, user.next_reset - now)
                if user.expires_at is not None:
                    if now >= user.expires_at:
                        if not user.expiry_noted:
                            user.expiry_noted = True
                            user.update_allow(now)
                            st.events.add("user_expired", user=user.name)
                            log.info("user %s expired", user.name)
                            st.cut(user, REASON_EXPIRED, sessions=True)
                    else:
                        user.expiry_noted = False
                        wait = min(wait, user.expires_at - now)
                self._warn(user)
                reason = user.refuse_reason(now)
                if reason is not None and user.channels:
                    user.close_channels(reason)
            with trio.move_on_after(max(wait, 0.001)):
                await st.wake.wait()
            st.wake = trio.Event()
