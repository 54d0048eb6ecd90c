"""Unpredictable randomness for WebSocket masks and channel ids, cheap enough for the data path.

RFC 6455 asks for masks an observer cannot predict, and a channel id another peer could
guess would let it aim messages at someone else's channel on a shared provider. A seeded
PRNG (Mersenne Twister) is predictable from its outputs, so both come from the OS's CSPRNG,
read 4 KiB at a time so that a frame costs a slice, not a syscall.
"""

from __future__ import annotations

import os

_REFILL = 4096


class _Pool:
    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        if pos + n > len(self.buf):
            self.buf = os.urandom(_REFILL)
            pos = 0
        self.pos = pos + n
        return self.buf[pos : pos + n]


_pool = _Pool()
# A child process (workers, fork) must not reuse its parent's pool.
os.register_at_fork(after_in_child=lambda: setattr(_pool, "pos", 1 << 30))


def mask_key() -> int:
    """A 32-bit WebSocket masking key."""
    return int.from_bytes(_pool.take(4), "big")


def random16() -> bytes:
    return _pool.take(16)
