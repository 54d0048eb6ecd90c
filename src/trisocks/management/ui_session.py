"""Dashboard sessions: what a browser holds instead of the API key.

Logging in to ``/ui/`` with the API key (routes_ui.py) sets a cookie holding a signed,
expiring session token::

    1.<session id>.<expiry, unix seconds>.<HMAC-SHA256 of the part before it, base64url>

Nothing is stored per session, so every worker of a multi-process server accepts a session
another one issued: the signing key is derived from the cluster's shared secret
(``PlaneState.cluster_secret``) or, for a lone server, from random bytes made at start (a
restart then ends every session). The API key is never in the cookie nor derivable from it.

The cookie is an alternative credential for the API's ``key`` operations (app.py asks
:meth:`Sessions.authorize`): a request that changes something (any method but GET, HEAD
and OPTIONS) must also carry ``X-CSRF-Token``, a value derived from the session that the
page gets from ``GET /ui/session``. A cross-site page can make the browser send the cookie
(SameSite=Strict already prevents that in current browsers) but cannot read that value.

Log-out revokes a session: its id is kept until the session would have expired anyway, in
a bounded set per process (:data:`MAX_REVOKED`; past it the entries closest to expiry go
first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

COOKIE = "trisocks_session"
CSRF_HEADER = "x-csrf-token"
SESSION_HOURS = 12
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_REVOKED = 10_000
MAX_COOKIE = 256  # a real one is about 90 characters
_VERSION = "1"


class SessionRefused(Exception):
    """The cookie or the CSRF token does not do: answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Session:
    sid: str
    expires: int  # unix seconds
    csrf: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Sessions:
    def __init__(self, shared_secret: Callable[[], bytes | None], *,
                 lifetime: int = SESSION_HOURS * 3600, clock: Callable[[], float] = time.time,
                 max_revoked: int = MAX_REVOKED) -> None:
        self._shared_secret = shared_secret  # read at every use: a cluster may set it late
        self._own = secrets.token_bytes(32)
        self.lifetime = lifetime
        self.clock = clock
        self.max_revoked = max_revoked
        self._revoked: dict[str, int] = {}  # session id -> its expiry

    def _key(self, purpose: bytes) -> bytes:
        base = self._shared_secret() or self._own
        return hmac.new(base, b"trisocks dashboard " + purpose, hashlib.sha256).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key(b"session v1"), payload.encode(), hashlib.sha256).digest())

    def _csrf(self, sid: str) -> str:
        return _b64(hmac.new(self._key(b"csrf v1"), sid.encode(), hashlib.sha256).digest())

    def issue(self) -> tuple[str, Session]:
        """A new session: the cookie's value, and the session."""
        sid = secrets.token_urlsafe(18)
        expires = int(self.clock()) + self.lifetime
        payload = f"{_VERSION}.{sid}.{expires}"
        return f"{payload}.{self._mac(payload)}", Session(sid, expires, self._csrf(sid))

    def check(self, cookie: str) -> Session:
        """The session a cookie holds; SessionRefused(401) when it is forged, tampered
        with, expired or logged out."""
        parts = cookie.split(".") if len(cookie) <= MAX_COOKIE else []
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit() or not parts[1]:
            raise SessionRefused(401, "invalid session; log in again")
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(self._mac(payload).encode(), parts[3].encode("utf-8", "replace")):
            raise SessionRefused(401, "invalid session; log in again")
        sid, expires = parts[1], int(parts[2])
        if expires <= self.clock():
            raise SessionRefused(401, "session expired; log in again")
        if sid in self._revoked:
            raise SessionRefused(401, "logged out; log in again")
        return Session(sid, expires, self._csrf(sid))

    def authorize(self, cookie: str, method: str, headers: Mapping[str, str]) -> Session:
        """The session, if it may make this request: a valid cookie, and for a method that
        changes something the session's CSRF token in X-CSRF-Token (else 403)."""
        session = self.check(cookie)
        if method.upper() not in SAFE_METHODS:
            given = headers.get(CSRF_HEADER) or ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), session.csrf.encode()):
                raise SessionRefused(403, "missing or wrong CSRF token (X-CSRF-Token); "
                                          "reload the dashboard")
        return session

    def revoke(self, session: Session) -> None:
        now = self.clock()
        revoked = self._revoked
        for sid in [s for s, exp in revoked.items() if exp <= now]:
            del revoked[sid]
        while len(revoked) >= self.max_revoked:
            del revoked[min(revoked, key=revoked.__getitem__)]
        revoked[session.sid] = session.expires

    def cookie_header(self, value: str, *, secure: bool) -> str:
        """The Set-Cookie value for a new session."""
        expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                time.gmtime(int(self.clock()) + self.lifetime))
        return (f"{COOKIE}={value}; Path=/; Max-Age={self.lifetime}; Expires={expires}; HttpOnly; "
                f"SameSite=Strict" + ("; Secure" if secure else ""))

    @staticmethod
    def clear_header(*, secure: bool) -> str:
        """The Set-Cookie value that removes the cookie."""
        return (f"{COOKIE}=; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; "
                f"SameSite=Strict" + ("; Secure" if secure else ""))
