"""Speed limits: one pacer per account and direction, shared by all its channels.

A :class:`Pacer` is a token bucket kept as a single number, the time at which the bytes
reserved so far will have been paid for at ``rate`` (the "theoretical arrival time" of
GCRA). ``take(n)`` reserves ``n`` bytes and answers how long the caller must wait before
it moves more; up to ``burst`` bytes may be ahead of the clock. One float add per read.

Enforcement pauses reads, never drops: a channel that read ``n`` bytes sends them, then
sleeps what ``take`` said before it reads again (socket -> tunnel), or holds what the peer
sent and writes it in ``quantum``-sized steps, each paid for before it is written (tunnel
-> socket); the peer is held back by flow control (trisocks peers) or by the session's
read loop (LinkSocks peers), as for any slow reader.

Fairness: reservations are served in the order they are made, and a paced channel asks for
at most ``quantum`` bytes at a time (1/64 s of the rate), so one bulk stream holds at most
one quantum of the queue and another channel of the same account waits about that long,
not behind megabytes.
"""

from __future__ import annotations

from trio import current_time

MIN_QUANTUM = 16 << 10
MAX_QUANTUM = 1023 << 10  # the largest read a channel makes anyway (channel.CHUNK)
MIN_BURST = 64 << 10


def default_burst(rate: int) -> int:
    """An eighth of a second of traffic: smooth enough for a 10 s average to stay within 2%
    of the rate, enough to let a page load start without a pause."""
    return max(MIN_BURST, rate >> 3)


class Pacer:
    __slots__ = ("burst", "quantum", "rate", "tat", "_ahead")

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.tat = 0.0
        self.set(rate, burst)

    def set(self, rate: int, burst: int | None = None) -> None:
        """Change the rate (bytes/s) live: reservations already made stay as they are, and a
        channel sleeping on a lower rate wakes within one quantum of the old one."""
        if rate <= 0:
            raise ValueError("a speed limit must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else default_burst(rate)
        self._ahead = self.burst / rate  # how far ahead of the clock reservations may run
        self.quantum = min(MAX_QUANTUM, max(MIN_QUANTUM, rate >> 6))

    def take(self, n: int) -> float:
        """Reserve ``n`` bytes; the seconds to wait before moving more (0.0: go on)."""
        now = current_time()
        tat = self.tat
        if tat < now:
            tat = now
        tat += n / self.rate
        self.tat = tat
        wait = tat - now - self._ahead
        return wait if wait > 0.0 else 0.0

    def try_take(self, n: int) -> bool:
        """Reserve ``n`` bytes only if that needs no wait: True when the caller may move them
        now (the common case under a limit far above the traffic), False to queue them."""
        now = current_time()
        tat = self.tat
        if tat < now:
            tat = now
        tat += n / self.rate
        if tat - now > self._ahead:
            return False
        self.tat = tat
        return True

    def __repr__(self) -> str:
        return f"<Pacer {self.rate} B/s burst {self.burst}>"
