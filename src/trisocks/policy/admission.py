"""Connection limits of one account (a user or a token): who may open what, right now.

* channels: concurrent channels (SOCKS5 connections, UDP associations) of all the
  account's sessions in this process;
* connection rate: new channels per second, a token bucket with a burst, against scanning;
* devices: distinct client addresses with a session open (several sessions from one
  address are one device); past the limit the new device is refused, or the oldest one's
  sessions are closed to make room (``replace_oldest``);
* clients: concurrent WebSocket sessions (LinkSocks-style tokens).

Each check is a compare or two, done when something opens; everything is given back when
it closes. The refusal texts say "not allowed", which SOCKS5 clients get as reply 0x02
(see :func:`trisocks.wire.socks5.reply_for_error_text`) and peers as the ConnectResponse
text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

REFUSE = "refuse"
REPLACE_OLDEST = "replace_oldest"

# the refusal kinds (events and the refusals counter use them)
CHANNELS = "channels"
RATE = "rate"
DEVICES = "devices"
CLIENTS = "clients"


def refusal_kind(text: str) -> str:
    """The kind of a refusal text of this module or of the destination rules ("rule")."""
    for kind, marker in ((CHANNELS, "connection limit"), (RATE, "per second"),
                         (DEVICES, "device"), (CLIENTS, "client limit")):
        if marker in text:
            return kind
    return "rule"


@dataclass
class Device:
    address: str
    since: float  # wall-clock time of its first session
    sessions: set = field(default_factory=set)


class RateBucket:
    """New connections per second with a burst (a token bucket on the monotonic clock)."""

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.level = float(self.burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


class Admission:
    """The connection limits of one account, with what is open against them."""

    __slots__ = ("max_channels", "bucket", "max_devices", "device_policy", "max_clients",
                 "devices", "clients", "refused")

    def __init__(self) -> None:
        self.max_channels: int | None = None
        self.bucket: RateBucket | None = None
        self.max_devices: int | None = None
        self.device_policy = REFUSE
        self.max_clients: int | None = None
        self.devices: dict[str, Device] = {}
        self.clients = 0
        self.refused: dict[str, int] = {}  # kind -> refusals so far

    def configure(self, *, max_channels=None, rate=None, burst=None, max_devices=None,
                  device_policy=REFUSE, max_clients=None) -> None:
        """Set the limits (None: no limit); what is open stays open."""
        self.max_channels = max_channels
        if rate is None:
            self.bucket = None
        else:
            burst = burst if burst is not None else max(1, int(rate))
            if self.bucket is None:
                self.bucket = RateBucket(rate, burst)
            else:
                self.bucket.rate, self.bucket.burst = rate, max(1, burst)
        self.max_devices = max_devices
        self.device_policy = device_policy
        self.max_clients = max_clients

    @property
    def limited(self) -> bool:
        return (self.max_channels is not None or self.bucket is not None
                or self.max_devices is not None or self.max_clients is not None)

    def _refuse(self, kind: str, text: str) -> str:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        return text

    # -- channels ------------------------------------------------------------------------
    def admit_channel(self, open_now: int) -> str | None:
        """May one more channel open, with ``open_now`` open? (Takes a rate token if so.)"""
        if self.max_channels is not None and open_now >= self.max_channels:
            return self._refuse(CHANNELS, f"not allowed: connection limit ({self.max_channels} open)")
        if self.bucket is not None and not self.bucket.take():
            return self._refuse(RATE, "not allowed: too many new connections per second")
        return None

    # -- sessions and devices ------------------------------------------------------------------
    def join(self, address: str, session) -> tuple[str | None, list]:
        """A session of this account from ``address`` wants to run: (refusal, sessions to
        close to make room). Nothing is recorded when it is refused."""
        if self.max_clients is not None and self.clients >= self.max_clients:
            return self._refuse(CLIENTS, f"not allowed: client limit ({self.max_clients} connected)"), []
        evicted: list = []
        device = self.devices.get(address)
        if device is None and self.max_devices is not None and len(self.devices) >= self.max_devices:
            if self.device_policy != REPLACE_OLDEST or not self.devices:
                return self._refuse(DEVICES, f"not allowed: device limit ({self.max_devices} in use)"), []
            oldest = min(self.devices.values(), key=lambda d: d.since)
            del self.devices[oldest.address]
            evicted = list(oldest.sessions)
            self.refused[DEVICES] = self.refused.get(DEVICES, 0) + 1
        if device is None:
            device = self.devices[address] = Device(address, time.time())
        device.sessions.add(session)
        self.clients += 1
        return None, evicted

    def leave(self, address: str, session) -> None:
        self.clients -= 1
        device = self.devices.get(address)
        if device is not None:
            device.sessions.discard(session)
            if not device.sessions:
                del self.devices[address]
