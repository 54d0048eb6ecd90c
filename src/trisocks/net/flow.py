"""Flow control between trisocks peers: how much may be in flight on a channel.

Each side grants the other a window per channel (``X-Trisocks-Flow: window=N`` in the
upgrade, then ``WindowUpdate`` messages as the receiving socket takes the bytes), so a
stalled reader stops only its own sender, and what a receiver holds for a channel never
passes the window it granted.

Windows start small and grow while the reader keeps up (like TCP's receive-window
auto-tuning): a bulk transfer reaches the full window after a few MiB, a request of a
few KiB never needs more than the first one. What the windows of one session have grown
beyond their start is capped (``SESSION_GROWTH``), so the bytes a session may have to
hold are bounded by ``SESSION_GROWTH + INITIAL_WINDOW x open channels``, whatever the
peer does; a channel whose reader stalls keeps only what it was granted, and every
other channel still has at least its initial window: nobody waits for the stalled one.
"""

from __future__ import annotations

MAX_WINDOW = 16 << 20  # per channel: covers what loopback-fast sockets hold in flight
INITIAL_WINDOW = 128 << 10  # what every channel starts with (and always keeps)
SESSION_GROWTH = 64 << 20  # growth beyond INITIAL_WINDOW, all channels of a session together
UNLIMITED = 1 << 62  # a credit (or quota) that never runs out


def initial_window(window: int) -> int:
    """The window advertised in the handshake for a configured maximum ``window``."""
    return min(window, INITIAL_WINDOW)


class WindowBudget:
    """The growth a session's channels share."""

    __slots__ = ("maximum", "budget", "grown")

    def __init__(self, maximum: int, budget: int = SESSION_GROWTH) -> None:
        self.maximum = maximum  # no channel's window grows past this
        self.budget = budget
        self.grown = 0

    def grow(self, window: int) -> int:
        """How much a channel whose reader keeps up may add to its ``window`` (0: none)."""
        extra = min(window, self.maximum - window, self.budget - self.grown)
        if extra <= 0:
            return 0
        self.grown += extra
        return extra

    def release(self, extra: int) -> None:
        """A channel that had grown by ``extra`` ended."""
        self.grown -= extra
