"""Who may call the API: the API key, the loopback rule, and failed keys counted and logged
per caller address (app.py asks; the subscription service reports unknown user keys)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .events import EventLog
from .keys import ApiKey, FailureLimiter, LogBudget

log = logging.getLogger("trisocks.management")


class Access:
    def __init__(self, events: EventLog, *, api_key: ApiKey | None, allow_remote: bool,
                 limiter: FailureLimiter | None) -> None:
        self.events = events
        self.api_key = api_key
        self.allow_remote = allow_remote
        self.limiter = limiter or FailureLimiter()
        # (peer address, request headers) -> the caller's address; None: the peer itself.
        # Failed keys are counted and logged per its answer. On the tunnel port the front
        # door has resolved --trusted-proxy already (serving.py); the plane sets it for
        # --api-bind.
        self.resolve_client: Callable[[str, Mapping[str, str]], str] | None = None
        self._auth_log = LogBudget()
        # the dashboard's sessions (ui_session.Sessions), set by routes_ui.install_ui: their
        # cookie stands in for the key; None: only the key does
        self.ui_sessions = None

    def note_api_auth_failure(self, address: str) -> None:
        self.events.add("api_auth_failure", peer=address)
        self.note_failed_key(address, "a wrong or missing API key")

    def note_failed_key(self, address: str, what: str) -> None:
        """Count a failed key against ``address`` and log it: a warning per attempt (at most
        LogBudget's rate, so a flood from many addresses cannot flood the log), and once
        when the address's lock-out starts (it was not locked out, or it would have had 429)."""
        self.limiter.failed(address)
        dropped = self._auth_log.take()
        if dropped is not None:
            more = f" ({dropped} more not logged)" if dropped else ""
            log.warning("API: %s from %s%s", what, address, more)
        wait = self.limiter.retry_after(address)
        if wait:
            log.warning("API: %s is locked out for %d s after repeated failed keys", address, wait)

    def note_rate_limited(self, address: str) -> None:
        self.events.add("api_rate_limited", peer=address)
