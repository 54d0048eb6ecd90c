"""What happened: authentications, token and user changes, quota hits, providers coming
and going. Kept in memory (the most recent ``keep``) for ``GET /api/events``, and handed
to the store by the flusher so that they survive a restart.

``listener`` (webhooks.py) hears every event as it is added: a plain call, no await, so
that whoever adds an event (the data path included) never waits for a listener.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..net import guard
from .store import EventRecord

# every event type, for the docs and the API's filter
TYPES = (
    "auth_success", "auth_failure", "session_closed", "provider_joined", "provider_left",
    "token_added", "token_removed", "token_updated",
    "user_created", "user_updated", "user_deleted", "user_reset", "user_rotated",
    "quota_exceeded", "user_expired", "user_activated", "policy_refused",
    "api_auth_failure", "api_rate_limited",
    "store_error", "config_reloaded", "config_rejected",
    # status changes (a user_updated that disables or enables a user), 80% of a quota used,
    # and the server's own start and stop; webhooks.py posts these
    "user_disabled", "user_enabled", "quota_warning", "server_started", "server_stopping",
)


class EventLog:
    def __init__(self, keep: int = 10_000, unsaved_max: int = 10_000) -> None:
        self._ring: deque[EventRecord] = deque(maxlen=keep)
        self._unsaved: deque[EventRecord] = deque(maxlen=unsaved_max)
        self._next_id = 1
        self.counts: dict[str, int] = {}
        self.listener: Callable[[EventRecord], None] | None = None

    def restore(self, records: list[EventRecord]) -> None:
        for rec in records:
            self._ring.append(rec)
            self._next_id = max(self._next_id, rec.id + 1)

    def add(self, type: str, *, token: str | None = None, user: str | None = None,
            peer: str | None = None, role: str | None = None, detail: str | None = None) -> EventRecord:
        rec = EventRecord(id=self._next_id, time=time.time(), type=type, token=token, user=user,
                          peer=peer, role=role, detail=detail)
        self._next_id += 1
        self._ring.append(rec)
        self._unsaved.append(rec)
        self.counts[type] = self.counts.get(type, 0) + 1
        if self.listener is not None:
            try:
                self.listener(rec)
            except Exception as exc:  # a listener's bug must not fail whoever added the event
                guard.report("event listener", exc)
        return rec

    def reserve_id(self) -> int:
        """An id no event has or will have (a webhook's test delivery uses one)."""
        self._next_id += 1
        return self._next_id - 1

    def take_unsaved(self) -> list[EventRecord]:
        items = list(self._unsaved)
        self._unsaved.clear()
        return items

    def put_back(self, items: list[EventRecord]) -> None:
        """A flush failed: keep them for the next one (oldest dropped past the bound).

        They are older than anything added since, so they go in front; extendleft on a full
        deque would push the newest out of the other end, hence the rebuild."""
        merged = [*items, *self._unsaved]
        self._unsaved.clear()
        self._unsaved.extend(merged[-(self._unsaved.maxlen or len(merged)):])

    def query(self, *, limit: int = 100, since: float | None = None, until: float | None = None,
              token: str | None = None, user: str | None = None, type: str | None = None,
              user_aliases: frozenset[str] = frozenset()) -> list[EventRecord]:
        """The most recent ``limit`` events that match, oldest first."""
        names = {user} | set(user_aliases) if user is not None else None
        out: list[EventRecord] = []
        for rec in reversed(self._ring):
            if until is not None and rec.time > until:
                continue
            if since is not None and rec.time < since:
                break
            if token is not None and rec.token != token:
                continue
            if names is not None and rec.user not in names:
                continue
            if type is not None and rec.type != type:
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        out.reverse()
        return out
