"""Test doubles shared by the unit tests: a transport the test drives by hand."""

from __future__ import annotations

import trio


class FakeTransport:
    """A transport whose writes the test controls.

    ``try_send`` takes up to ``take_now`` bytes (0: the socket is busy). ``write_some``
    records the views it was given and waits for the test to ``grant(n)``, then writes
    up to ``n`` bytes of them. ``fail_with`` makes the next call raise.
    """

    def __init__(self, take_now: int = 0) -> None:
        self.take_now = take_now
        self.written = bytearray()
        self.batches: list[int] = []  # how many views each write_some call had
        self.fail_with: BaseException | None = None
        self.closed = False
        self._send, self._receive = trio.open_memory_channel(100)

    def try_send(self, frame) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        n = min(self.take_now, len(frame))
        self.take_now -= n
        self.written += bytes(frame[:n])
        return n

    async def write_some(self, views) -> int:
        self.batches.append(len(views))
        budget = await self._receive.receive()
        if self.fail_with is not None:
            raise self.fail_with
        n = 0
        for view in views:
            take = min(budget - n, len(view))
            self.written += bytes(view[:take])
            n += take
            if take < len(view):
                break
        return n

    def grant(self, n: int = 1 << 40) -> None:
        """Let the pending (or next) write_some write up to ``n`` bytes."""
        self._send.send_nowait(n)

    def fail(self, exc: BaseException) -> None:
        """Make the pending write_some (and every later call) raise ``exc``."""
        self.fail_with = exc
        self._send.send_nowait(0)

    async def aclose(self) -> None:
        self.closed = True
