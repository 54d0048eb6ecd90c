"""Per-address limits on failed authentication (tunnel tokens and API keys alike)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque


class FailureLimiter:
    """At most ``max_failures`` failed attempts per address in ``window`` seconds.

    Past that the address is refused (429, ``Retry-After``) until its oldest failure in the
    window is ``window`` seconds old. A success clears the address's record. At most
    ``max_addresses`` addresses are remembered (the least recently failing go first), so
    a flood from many addresses costs bounded memory.
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
        record = self._failures.get(address)
        if not record:
            return 0
        now = self.clock()
        while record and now - record[0] >= self.window:
            record.popleft()
        if not record:
            del self._failures[address]
            return 0
        if len(record) < self.max_failures:
            return 0
        return max(1, math.ceil(record[0] + self.window - now))

    def failed(self, address: str) -> None:
        record = self._failures.pop(address, None)
        if record is None:
            record = deque(maxlen=self.max_failures)
        record.append(self.clock())
        self._failures[address] = record  # most recent last
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
