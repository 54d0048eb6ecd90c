"""How many channels may be open: per token (all its sessions together) and per process.

Every channel holds a socket, so the process limit is what the file-descriptor limit
allows once a reserve is kept for accepting and authenticating connections: a peer that
opens channels without end gets refusals, not a server that can no longer accept anyone.
"""

from __future__ import annotations


class ChannelGroup:
    """Open channels of all sessions of one token (or user), against a limit."""

    __slots__ = ("open", "limit")

    def __init__(self, limit: int) -> None:
        self.open = 0
        self.limit = limit


class _Process:
    """Open channels of this process, against what its file-descriptor limit allows once a
    reserve is kept for accepting and authenticating connections (each channel holds a socket)."""

    __slots__ = ("open", "_limit")

    def __init__(self) -> None:
        self.open = 0
        self._limit = 0

    def limit(self) -> int:
        if not self._limit:  # read late: the CLI raises the soft limit at start
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 20
            self._limit = max(16, soft - max(64, soft // 10))
        return self._limit


PROCESS = _Process()
