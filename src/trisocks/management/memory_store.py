"""A store that keeps nothing, for a plane whose persistence is off (tests)."""

from __future__ import annotations

from .store import Snapshot, StoreError, TokenRecord, UserRecord


class MemoryStore:
    """A store that keeps nothing: the plane runs on it when persistence is off (tests)."""

    description = "memory (nothing is kept)"

    def __init__(self) -> None:
        self.broken: str | None = None  # set to make every call fail (tests of failure paths)

    def _check(self) -> None:
        if self.broken:
            raise StoreError(self.broken)

    async def open(self) -> Snapshot:
        self._check()
        return Snapshot([], [], [])

    async def put_token(self, record: TokenRecord) -> None:
        self._check()

    async def delete_tokens(self, tokens: list[str]) -> None:
        self._check()

    async def put_user(self, record: UserRecord) -> None:
        self._check()

    async def reset_user(self, user_id: str) -> None:
        self._check()

    async def delete_user(self, user_id: str) -> None:
        self._check()

    async def flush(self, counters, events) -> None:
        self._check()

    async def check(self) -> None:
        self._check()

    async def close(self) -> None:
        pass
