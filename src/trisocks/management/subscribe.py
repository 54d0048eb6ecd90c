"""Subscriptions: what a user's key fetches from /api/subscribe (the tunnel URL, the key,
a share link). The client side is trisocks.tunnel.subscription."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ..wire.names import hostport
from . import schemas as s
from .access import Access
from .dates import rfc3339
from .errors import NotFound, Refused
from .model import REASON_DISABLED, REASON_EXPIRED
from .state import PlaneState

DEFAULT_SOCKS_PORT = 9870
# Profile-Update-Interval, in hours: how often panel-aware clients fetch the subscription again
UPDATE_INTERVAL_HOURS = 12
# a Host header fit for a URL: a name or IPv4 address, or a bracketed IPv6 one, and a port
_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def _usable_host(host: str) -> str:
    """The Host header if it can go into a URL; else "" (the bound address is used)."""
    if not _HOST_HEADER.fullmatch(host):
        return ""
    try:
        port = urlsplit(f"//{host}").port  # a port over 65535 or a bad IPv6 address raise
    except ValueError:
        return ""
    return host if port != 0 else ""


class Subscriptions:
    def __init__(self, state: PlaneState, access: Access, *, public_url: str,
                 api_bound: bool) -> None:
        self.state = state
        self.access = access
        self.public_url = public_url.rstrip("/")
        self.api_bound = api_bound  # --api-bind: requests come to another port than the tunnel's

    def tunnel_url(self, host: str) -> str:
        """The WebSocket URL clients should use: --public-url, or what this request came to."""
        if self.public_url:
            return self.public_url
        server = self.state.server
        ws = server.scheme
        host = _usable_host(host)
        if not self.api_bound and host:
            return f"{ws}://{host}"
        hostname = urlsplit(f"//{host}").hostname if host else None
        if not hostname:
            bound = server.host
            hostname = "127.0.0.1" if bound in ("0.0.0.0", "::", "") else bound
        return f"{ws}://{hostport(hostname, server.port)}"

    def get(self, key: str, client: str, host: str) -> s.Subscription:
        user = self.state.users.get(key)
        if user is None:
            self.access.note_failed_key(client, "an unknown user key in /api/subscribe")
            raise NotFound("unknown key")
        reason = user.refuse_reason()
        if reason in (REASON_DISABLED, REASON_EXPIRED):
            raise Refused(reason)
        url = self.tunnel_url(host)
        parts = urlsplit(url)
        tls = parts.scheme in ("wss", "https")
        port = parts.port or (443 if tls else 80)
        hostname = parts.hostname or "localhost"
        link = f"trisocks://{user.key}@{hostport(hostname, port)}" + ("?tls=1" if tls else "")
        return s.Subscription(server=url, token=user.key, mode="forward",
                              socks_port=DEFAULT_SOCKS_PORT, share_link=link, name=user.name,
                              expires_at=rfc3339(user.expires_at), limit_bytes=user.limit_bytes)

    def headers(self, key: str) -> dict[str, str]:
        """The headers panel-aware clients (Clash, v2rayN and others) read from a subscription:
        traffic used and allowed, and the expiry (unix seconds; 0: none), and how often to
        fetch it again. ``total`` is 0 when the user has no limit."""
        user = self.state.users[key]
        up, down = user.totals()
        expire = int(user.expires_at) if user.expires_at is not None else 0
        info = (f"upload={up}; download={down}; total={user.limit_bytes or 0}; "
                f"expire={expire}")
        return {"Subscription-Userinfo": info,
                "Profile-Update-Interval": str(UPDATE_INTERVAL_HOURS)}
