"""A store that keeps nothing, for a plane whose persistence is off (tests)."""

from __future__ import annotations

from .rows import NodeRecord, usage_rows
from .store import Snapshot, StoreError, TokenRecord, UserRecord, WebhookRecord


class MemoryStore:
    """A store that keeps nothing: the plane runs on it when persistence is off (tests)."""

    description = "memory (nothing is kept)"
    shared = False

    def __init__(self) -> None:
        self.broken: str | None = None  # set to make every call fail (tests of failure paths)
        # usage history is kept, in memory, so that the API answers the same as with SQLite
        self._usage: dict[tuple[str, str, int], list[int]] = {}

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

    async def put_webhook(self, record: WebhookRecord) -> None:
        self._check()

    async def delete_webhook(self, name: str) -> None:
        self._check()

    async def flush(self, counters, events, hour: int | None = None) -> None:
        self._check()
        if hour is not None:
            for owner, ident, h, up, down, conns in usage_rows(counters, hour):
                row = self._usage.setdefault((owner, ident, h), [0, 0, 0])
                row[0] += up
                row[1] += down
                row[2] += conns

    async def usage(self, owner: str, ident: str, first: int, last: int) -> list[tuple]:
        self._check()
        return sorted((h, *row) for (o, i, h), row in self._usage.items()
                      if o == owner and i == ident and first <= h <= last)

    async def prune_usage(self, before: int) -> None:
        self._check()
        for k in [k for k in self._usage if k[2] < before]:
            del self._usage[k]

    async def check(self) -> None:
        self._check()

    async def snapshot(self) -> Snapshot:
        self._check()
        return Snapshot([], [], [])

    async def generation(self) -> int:
        self._check()
        return 0

    async def put_node(self, node: NodeRecord) -> None:
        self._check()

    async def nodes(self) -> list[NodeRecord]:
        self._check()
        return []

    async def delete_node(self, node_id: str) -> None:
        self._check()

    async def close(self) -> None:
        pass
