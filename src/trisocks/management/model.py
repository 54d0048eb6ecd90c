"""Accounts: what the data path meters traffic to, and what decides whether it may flow.

Every token and every user of a server with the management plane on has a meter. The
data path calls it (see trisocks.net.channel):

* ``charge(n) -> bool`` for every read or Data piece: an add and a compare, nothing else.
  False once the limit is crossed; the channel then closes itself.
* ``refuse_reason()`` at authentication, and ``admit()`` (that, then the connection limits of
  the account's policy) before every new channel.
* ``pace_up`` / ``pace_down``: the account's speed limits (trisocks.policy.pace), None when
  there are none; channels read them at every read, so a change applies at once.
* ``opened(ch)`` / ``closed(ch)`` when a channel starts / ends; at ``closed`` the
  channel's ``uploaded``/``downloaded`` are final, and they are what the counters add up,
  so the counters are exact to the byte for finished channels (``charge`` only enforces).

Who a byte is metered to: the user whose key authenticated the WebSocket (forward mode)
or the SOCKS5 connection (reverse mode, username + key); otherwise the token it came
through (forward token, connector token, or the reverse token of the SOCKS5 port).
Agent mode relays one channel through two sessions; only the connector's end counts.
"""

from __future__ import annotations

import hmac
import time

from ..net.flow import UNLIMITED
from ..policy.admission import Admission
from ..policy.spec import Policy
from ..tunnel.socks_server import Credentials
from ..tunnel.tokens import TokenInfo, TokenTable

ACTIVE = "active"
DISABLED = "disabled"
ON_HOLD = "on_hold"  # waiting for the first connection (lifecycle.py)

# refusal reasons, as the data path reports them to clients (and the API shows them)
REASON_DISABLED = "disabled"
REASON_EXPIRED = "expired"
REASON_LIMIT = "traffic limit reached"

CHECK_STEP = 1 << 20  # a cluster's node looks at the others' counters at least this often near a limit


class Meter:
    """Bytes metered to one owner. Counters: finished channels (``done_*``) plus open ones."""

    __slots__ = (
        "__weakref__",
        "_sample",
        "admission",
        "allow",
        "channels",
        "done_down",
        "done_up",
        "flushed",
        "last_seen",
        "pace_down",
        "pace_up",
        "policy",
        "rate_down",
        "rate_up",
        "rules",
        "total_connections",
        "used",
    )

    # Users get the safe destination defaults (docs/policy.md); tokens reach what the server
    # reaches, as with LinkSocks, except the server's own listeners.
    safe_defaults = False

    def __init__(self, *, bytes_up: int = 0, bytes_down: int = 0, total_connections: int = 0,
                 last_seen: float | None = None) -> None:
        self.done_up = bytes_up
        self.done_down = bytes_down
        self.used = bytes_up + bytes_down  # what charge() has counted: the limit applies to it
        self.allow = UNLIMITED
        self.channels: dict[object, tuple[int, int]] = {}  # open channel -> its counts at start/reset
        self.total_connections = total_connections
        self.last_seen = last_seen
        self.rate_up = 0.0
        self.rate_down = 0.0
        self._sample: tuple[float, int, int] | None = None
        self.policy = Policy()
        self.rules = None  # the policy's RuleSet, checked before the server's (None: none)
        self.pace_up = None  # Pacer or None, see trisocks.policy.spec.put_in_force
        self.pace_down = None
        # connection limits (none until a policy sets some) and the devices seen now
        self.admission = Admission()
        # what the store holds for this owner as far as we know (up, down, connections,
        # last_seen): what a meter starts with came from the store, or is zero in a new row.
        # The flusher writes the growth since then, as increments.
        self.flushed: tuple = (bytes_up, bytes_down, total_connections, last_seen)

    # -- the data path's interface (keep charge tiny: it runs for every read) ---------------
    def charge(self, n: int) -> bool:
        self.used += n
        return self.used <= self.allow

    def refuse_reason(self) -> str | None:
        return None

    def admit(self) -> str | None:
        """Why a new channel may not open now (refuse_reason, then the connection limits)."""
        reason = self.refuse_reason()
        if reason is None:
            reason = self.admission.admit_channel(len(self.channels))
        return reason

    def opened(self, ch) -> None:
        bridge = getattr(ch, "bridge", None)
        if bridge is not None and bridge.connector is not ch:
            return  # the provider's end of an agent-mode relay: the connector's end counts
        self.channels[ch] = (0, 0)
        self.total_connections += 1
        self.last_seen = time.time()

    def closed(self, ch) -> None:
        base = self.channels.pop(ch, None)
        if base is not None:
            self.done_up += ch.uploaded - base[0]
            self.done_down += ch.downloaded - base[1]

    # -- reading ------------------------------------------------------------------------------
    def totals(self) -> tuple[int, int]:
        """Bytes up and down so far, open channels included."""
        up, down = self.done_up, self.done_down
        for ch, (base_up, base_down) in list(self.channels.items()):
            up += ch.uploaded - base_up
            down += ch.downloaded - base_down
        return up, down

    def sample(self, now: float) -> tuple[int, int]:
        """Totals, and the rates since the previous sample (bytes per second)."""
        up, down = self.totals()
        prev = self._sample
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            self.rate_up = max(0.0, (up - prev[1]) / dt)
            self.rate_down = max(0.0, (down - prev[2]) / dt)
        self._sample = (now, up, down)
        return up, down

    # -- management -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the counters; open channels count from here on."""
        self.done_up = self.done_down = 0
        self.used = 0
        for ch in list(self.channels):
            self.channels[ch] = (ch.uploaded, ch.downloaded)
        self._sample = None
        self.rate_up = self.rate_down = 0.0

    def close_channels(self, reason: str) -> int:
        channels = list(self.channels)
        for ch in channels:
            ch.fail(reason)
        return len(channels)


class TokenMeter(Meter):
    """A token's meter: counts, never refuses (a token is removed, not limited)."""

    __slots__ = ("created_at", "info", "origin")

    def __init__(self, info: TokenInfo, *, origin: str = "runtime", created_at: float | None = None,
                 **counters) -> None:
        super().__init__(**counters)
        self.info = info
        self.origin = origin  # "cli", "api", or "runtime" (added by a provider: autonomy mode)
        self.created_at = created_at if created_at is not None else time.time()


class UserAccount(Meter):
    """A user: an access key with a name, a traffic limit, an expiry and a status."""

    safe_defaults = True

    __slots__ = (
        "checkpoint",
        "created_at",
        "expires_at",
        "expiry_noted",
        "id",
        "key",
        "limit_bytes",
        "last_reset",
        "name",
        "next_reset",
        "nodes",
        "on_checkpoint",
        "on_hold_duration",
        "on_quota",
        "quota_noted",
        "reset_strategy",
        "status",
    )

    def __init__(self, *, id: str, key: str, name: str, limit_bytes: int | None = None,
                 expires_at: float | None = None, status: str = ACTIVE,
                 created_at: float | None = None, reset_strategy: str = "none",
                 next_reset: float | None = None, last_reset: float | None = None,
                 on_hold_duration: int | None = None, **counters) -> None:
        super().__init__(**counters)
        # lifecycle.py: periodic resets, and validity that starts at the first connection
        self.reset_strategy = reset_strategy
        self.next_reset = next_reset
        self.last_reset = last_reset
        self.on_hold_duration = on_hold_duration
        self.id = id
        self.key = key
        self.name = name
        self.limit_bytes = limit_bytes
        self.expires_at = expires_at
        self.status = status
        self.created_at = created_at if created_at is not None else time.time()
        self.quota_noted = False  # on_quota was called for crossing the limit
        self.on_quota = None  # called once when the limit is found crossed
        self.expiry_noted = False
        # A cluster (management/cluster.py) shares the limit between its nodes: ``nodes`` is
        # how many there are (0: a lone server), and past ``checkpoint`` this node asks for
        # the others' counters (``on_checkpoint``) before it goes much further.
        self.nodes = 0
        self.on_checkpoint = None
        self.checkpoint = 0
        self.update_allow()

    def __repr__(self) -> str:
        return f"<user {self.name}>"

    def refuse_reason(self, now: float | None = None) -> str | None:
        if self.status != ACTIVE:
            # on hold: may connect; the first session starts its validity (observe.py)
            return None if self.status == ON_HOLD else REASON_DISABLED
        if self.expires_at is not None and (now if now is not None else time.time()) >= self.expires_at:
            return REASON_EXPIRED
        if self.limit_bytes is not None and self.used >= self.limit_bytes:
            if not self.quota_noted:
                self.quota_noted = True
                if self.on_quota is not None:
                    self.on_quota(self)
            return REASON_LIMIT
        return None

    def charge(self, n: int) -> bool:
        self.used += n
        return self.used <= self.checkpoint or self._past_checkpoint()

    def _past_checkpoint(self) -> bool:
        if self.used > self.allow:
            return False
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        self.place_checkpoint()
        return True

    def place_checkpoint(self) -> None:
        """Where charge() next stops to look: at the limit on a lone server. In a cluster,
        after a share of what is left, so that the nodes together pass the limit by little:
        each goes at most half of what is left divided among them (at least CHECK_STEP)
        before it has written its counters and read the others' (docs/scale-out.md)."""
        allow = self.allow
        if self.nodes < 2 or allow >= UNLIMITED or allow < 0:
            self.checkpoint = allow
            return
        step = max(CHECK_STEP, (allow - self.used) // (2 * self.nodes))
        self.checkpoint = min(allow, self.used + step)

    def update_allow(self, now: float | None = None) -> None:
        """Recompute what charge() lets through: nothing once disabled or expired."""
        reason = self.refuse_reason(now)
        if reason in (REASON_DISABLED, REASON_EXPIRED):
            self.allow = -1
        else:
            self.allow = self.limit_bytes if self.limit_bytes is not None else UNLIMITED
        self.place_checkpoint()

    def reset(self) -> None:
        super().reset()
        self.quota_noted = False
        self.update_allow()


class ManagedTokenTable(TokenTable):
    """The server's token table, with a meter attached to every token added, however it is
    added (command line, API, or a provider in autonomy mode)."""

    def __init__(self, on_added=None, on_removed=None) -> None:
        super().__init__()
        self._on_added = on_added
        self._on_removed = on_removed

    def add(self, info: TokenInfo) -> TokenInfo:
        if info.account is None:
            info.account = TokenMeter(info)
        added = super().add(info)
        if self._on_added is not None:
            self._on_added(added)
        return added

    def remove(self, token: str) -> TokenInfo | None:
        info = super().remove(token)
        if info is not None and self._on_removed is not None:
            self._on_removed(info)
        return info


class SocksUsers:
    """Credentials of a reverse token's SOCKS5 port: the token's own -n/-w pair (if any), or
    any user's name + key (the connection is then metered to that user).

    A port without a pair of its own stays open to clients that offer no authentication
    (``optional``); a client that does offer username/password is checked, so a user's
    traffic is metered to the user.
    """

    def __init__(self, users_by_name: dict[str, UserAccount], own: Credentials | None) -> None:
        self.users_by_name = users_by_name
        self.own = own
        self.optional = own is None

    def check(self, username: str, password: str):
        if self.own is not None and self.own.check(username, password):
            return True
        user = self.users_by_name.get(username)
        if user is not None and hmac.compare_digest(user.key.encode(), password.encode()):
            return user
        return False
