"""The one state every service of the plane works on, and the few things they all need.

Every change made through the API is serialised by ``lock`` and committed to the store
before it takes effect and before the API answers; the flusher takes the same lock, so a
counter flush never overwrites a reset or a rotation it raced with.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC
from typing import TYPE_CHECKING

import trio

from .errors import Unavailable
from .events import EventLog
from .model import ManagedTokenTable, UserAccount
from .store import Store, StoreError

if TYPE_CHECKING:
    from .tunnel import Tunnel

log = logging.getLogger("trisocks.management")


class PlaneState:
    def __init__(self, store: Store, tokens: ManagedTokenTable) -> None:
        self.store = store
        self.tokens = tokens
        self.users: dict[str, UserAccount] = {}  # by key
        self.users_by_name: dict[str, UserAccount] = {}  # the same users; reverse SOCKS5 ports read it
        self.events = EventLog()
        self.lock = trio.Lock()
        self.server: Tunnel | None = None
        self.started_at = time.time()
        self.store_error: str | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.listening = False
        self.wake = trio.Event()  # set: the enforcer looks at the users now
        # the wall clock of calendar things (usage hours, resets, expiry); tests replace it
        self.clock = time.time
        self.tz = UTC  # where calendar resets fall (--reset-timezone)
        self.dirty: set = set()  # users changed by the plane itself, written by the next flush
        self.usage_days = 90  # hourly usage history kept this many days
        self.metrics_per_owner = 0  # series per token and per user in /metrics: at most this many
        self.refusals: Counter = Counter()  # policy refusals by kind (rule, channels, rate...)
        # bytes every node of a cluster (workers, or hosts sharing a store) knows; None alone.
        # Signs what one node issues and another must accept (docs/scale-out.md).
        self.cluster_secret: bytes | None = None
        self.cluster = None  # a cluster.Cluster when the store is shared

    def count_refusal(self, kind: str) -> None:
        self.refusals[kind] += 1

    def wake_enforcer(self) -> None:
        self.wake.set()

    async def persist(self, awaitable):
        """Await a store call and return its result; a failure becomes Unavailable (for a
        write: nothing changed)."""
        try:
            return await awaitable
        except StoreError as exc:
            log.error("database write failed: %s", exc)
            raise Unavailable("database unavailable") from None

    def cut(self, user: UserAccount, reason: str, *, sessions: bool) -> None:
        """Close the user's open channels, and with ``sessions`` their WebSocket sessions."""
        user.close_channels(reason)
        if sessions and self.server is not None:
            self.server.close_sessions_of(user, reason)

    def token_clients(self) -> Counter:
        """Open sessions per token (keyed by id of its TokenInfo), on every node."""
        out = Counter(id(info) for info in self.server.session_tokens())
        if self.cluster is not None:
            for token, n in self.cluster.remote_clients().items():
                info = self.tokens.get(token)
                if info is not None:
                    out[id(info)] += n
        return out

    def user_clients(self) -> Counter:
        """Open sessions per user id, on every node."""
        out = Counter(info.account.id for info in self.server.session_tokens()
                      if isinstance(info.account, UserAccount))
        if self.cluster is not None:
            for owner, n in self.cluster.remote_clients().items():
                if owner.startswith("user:"):
                    out[owner[5:]] += n
        return out

    def quota_reached(self, user: UserAccount) -> None:
        self.events.add("quota_exceeded", user=user.name, detail=f"limit {user.limit_bytes} bytes")
        log.info("user %s reached the traffic limit", user.name)
