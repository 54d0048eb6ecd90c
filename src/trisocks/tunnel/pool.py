"""A set of sessions that can carry new channels, chosen round-robin.

Used wherever channels are opened: a client's own connections to the server
(``-T``), and on the server the providers of one reverse token. A session
that has not answered a ping within ``PING_GRACE`` seconds is skipped (a hung
provider); a session that closed is removed by its owner.
"""

from __future__ import annotations

import trio

PING_GRACE = 5.0


class SessionPool:
    def __init__(self, name: str = "pool") -> None:
        self.name = name
        self.sessions: list = []
        self._next = 0
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self):
        return iter(list(self.sessions))

    def add(self, session) -> None:
        self.sessions.append(session)
        self._wake()

    def remove(self, session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def pick(self):
        """The next responsive session, or None."""
        n = len(self.sessions)
        now = trio.current_time()
        for _ in range(n):
            self._next = (self._next + 1) % n
            session = self.sessions[self._next]
            if session.responsive(now, PING_GRACE):
                return session
        return None

    async def wait_pick(self, timeout: float):
        """A responsive session, waiting up to ``timeout`` seconds for one to appear."""
        with trio.move_on_after(timeout):
            while True:
                session = self.pick()
                if session is not None:
                    return session
                with trio.move_on_after(1.0):  # re-check liveness even if nothing joins
                    await self._changed.wait()
        return None

    async def wait_nonempty(self) -> None:
        while not self.sessions:
            await self._changed.wait()
