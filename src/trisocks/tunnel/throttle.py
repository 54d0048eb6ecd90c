"""Per-address limits on failed authentication (tunnel tokens, API keys, SOCKS5 passwords).

Addresses are grouped as an attacker would have to spread them: an IPv4 address is one
source, an IPv6 address counts for its whole /64 (a single host usually holds a /64 and
can pick any address in it).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque


def address_key(address: str) -> str:
    """The source an address belongs to: the IPv4 address itself, or an IPv6 /64
    (IPv4-mapped IPv6 as its IPv4 address); anything else (not an IP) unchanged."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").partition("%")[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """At most ``max_failures`` failed attempts per source in ``window`` seconds.

    Past that the source is refused (429, ``Retry-After``) until its oldest failure in the
    window is ``window`` seconds old. Failures only decay with time: a success does not
    clear them (or one valid token every nine guesses would allow unlimited guessing), and
    a user who mistyped a few times is never locked out by its own success either. At most
    ``max_addresses`` sources are remembered (the least recently failing go first), so a
    flood from many addresses costs bounded memory.
    """

    def __init__(self, max_failures: int = 10, window: float = 60.0,
                 max_addresses: int = 10_000, clock=time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.refused = 0

    def retry_after(self, address: str) -> int:
        """Seconds this address must wait (0: it may try now)."""
        key = address_key(address)
        record = self._failures.get(key)
        if not record:
            return 0
        now = self.clock()
        while record and now - record[0] >= self.window:
            record.popleft()
        if not record:
            del self._failures[key]
            return 0
        if len(record) < self.max_failures:
            return 0
        return max(1, math.ceil(record[0] + self.window - now))

    def failed(self, address: str) -> None:
        key = address_key(address)
        record = self._failures.pop(key, None)
        if record is None:
            record = deque(maxlen=self.max_failures)
        now = self.clock()
        record.append(now)
        failures = self._failures
        failures[key] = record  # most recent last
        # forget sources whose last failure has aged out (they are first in line), so memory
        # follows the failures of the last window rather than every source ever seen
        while failures:
            oldest = next(iter(failures.values()))
            if now - oldest[-1] < self.window and len(failures) <= self.max_addresses:
                break
            failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """Kept for callers; deliberately forgets nothing (failures decay with time only)."""


class TokenBucket:
    """``burst`` actions at once, then ``rate`` per second: ``take()`` says whether one may go."""

    def __init__(self, burst: int, rate: float, clock=time.monotonic) -> None:
        self.burst = burst
        self.rate = rate
        self.clock = clock
        self._level = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < 1:
            return False
        self._level -= 1
        return True
