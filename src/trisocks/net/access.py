"""The access log: one record per finished channel (``--access-log``, docs/logging.md).

A session tells :class:`AccessLog` when a channel is registered (the start time is kept
here, not on the channel) and when it is forgotten; the record then says who (user name
or token id, never a secret), from where, to where, how many bytes each way, for how long
and how it ended. Nothing here runs per read: the byte counts are the channel's own.

Records go to the logger ``trisocks.access`` as ``INFO`` with the fields as extras; the
message is the same fields as ``key=value`` text. The command line gives that logger a
handler of its own (``trisocks.cli.logs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

ACCESS_LOGGER = "trisocks.access"
FIELDS = ("user", "token_id", "role", "client", "target", "up", "down", "duration", "end")


def token_id(token: str) -> str:
    """What logs and metrics show of a token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def text_value(value) -> str:
    """A ``key=value`` value: bare when it is one plain word, else quoted as JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"  # the duration: always 3 decimals
    if isinstance(value, str):
        if value.isprintable() and not any(c in value for c in ' "=\\'):
            return value
        return json.dumps(value)
    return str(value)


class AccessLog:
    """Times channels and logs each one as it ends.

    ``who(session)`` gives what authenticated the session (a TokenInfo-like object with
    ``token``, ``kind`` and ``account``), or None; the channel's own ``account`` (a
    management user or token meter) is asked first.
    """

    def __init__(self, who=None, logger: logging.Logger | None = None, clock=time.monotonic) -> None:
        self.who = who
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self.clock = clock
        self._started: dict = {}  # channel -> monotonic start; every registered one is forgotten

    def opened(self, ch) -> None:
        self._started[ch] = self.clock()

    def closed(self, session, ch) -> None:
        started = self._started.pop(ch, None)
        if _relayed_twice(ch):
            return  # a bridged channel is logged once, by its connector's end
        try:
            fields = self.fields(session, ch, started)
        except Exception:  # a log line must never end a channel's cleanup
            logging.getLogger("trisocks.session").exception("access log record failed")
            return
        line = " ".join(f"{key}={text_value(fields[key])}" for key in FIELDS)
        self.logger.info("%s", line, extra={"event": "channel", **fields})

    def fields(self, session, ch, started: float | None) -> dict:
        user, tid, role = _identity(ch, session, self.who)
        duration = self.clock() - started if started is not None else 0.0
        return {
            "user": user,
            "token_id": tid,
            "role": role,
            "client": getattr(session, "peer", "") or None,
            "target": getattr(ch, "target", "") or None,
            "up": int(getattr(ch, "uploaded", 0)),
            "down": int(getattr(ch, "downloaded", 0)),
            "duration": round(max(duration, 0.0), 3),
            "end": ending(session, ch),
        }


def ending(session, ch) -> str:
    """How the channel ended: its error, the session's end if that cut it, a connect that
    never succeeded, else ``eof``."""
    error = getattr(ch, "error", "")
    if error:
        return error
    response = getattr(ch, "_response", None)  # an opener's ConnectResponse, if a refusal
    if response is not None and not response.success:
        return f"refused: {response.error or 'connect failed'}"
    reason = getattr(session, "close_reason", "")
    if reason:
        return f"session closed: {reason}"
    if hasattr(ch, "sock") and ch.sock is None and not getattr(ch, "ingress", True):
        return "connect failed"  # a target channel whose dial did not succeed
    return "eof"


def _identity(ch, session, who) -> tuple[str | None, str | None, str | None]:
    """(user name, token id, role) of a channel: a management user's name, or the token."""
    info = who(session) if who is not None else None
    account = getattr(ch, "account", None)
    if account is None and info is not None:
        account = getattr(info, "account", None)
    user = getattr(account, "name", None)
    token = getattr(getattr(account, "info", None), "token", None)  # a token's meter
    if token is None and user is None and info is not None:
        token = info.token
    role = getattr(info, "kind", None)
    return user, token_id(token) if token else None, role


def _relayed_twice(ch) -> bool:
    """The provider's end of a bridged channel: the connector's end tells the same story."""
    bridge = getattr(ch, "bridge", None)
    return bridge is not None and getattr(bridge, "provider", None) is ch
