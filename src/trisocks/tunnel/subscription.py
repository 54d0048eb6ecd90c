"""The client side of subscriptions: ``trisocks client --subscribe URL``.

``URL`` is either a server's ``http(s)://HOST:PORT/api/subscribe/KEY`` (fetched once,
before the client starts) or a share link ``trisocks://KEY@HOST:PORT`` (``?tls=1`` for a
server that speaks wss://).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from .._version import __version__
from ..wire.names import hostport


@dataclass
class Subscribed:
    server: str  # WebSocket URL
    token: str
    socks_port: int | None = None


def parse_share_link(link: str) -> Subscribed:
    parts = urlsplit(link.strip())
    if parts.scheme != "trisocks" or not parts.username or not parts.hostname:
        raise ValueError("a share link reads trisocks://KEY@HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("a share link reads trisocks://KEY@HOST:PORT") from None
    tls = parse_qs(parts.query).get("tls", ["0"])[0] in ("1", "true")
    port = port or (443 if tls else 80)
    return Subscribed(server=f"{'wss' if tls else 'ws'}://{hostport(parts.hostname, port)}",
                      token=unquote(parts.username))


def fetch(url: str, *, ca_file: str = "", insecure: bool = False, timeout: float = 15.0) -> Subscribed:
    """Read a subscription; ValueError says what went wrong."""
    if url.startswith("trisocks://"):
        return parse_share_link(url)
    if not url.startswith(("http://", "https://")):
        raise ValueError("expected an http(s):// subscription URL or a trisocks:// share link")
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=ca_file or None)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": f"trisocks/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            body = answer.read(1 << 20)
            ctype = answer.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read(65536)).get("error", "")
        except (ValueError, AttributeError):
            pass
        raise ValueError(f"the server answered {exc.code}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"cannot fetch it: {reason}") from None
    text = body.decode("utf-8", "replace").strip()
    if "json" not in ctype and text.startswith("trisocks://"):
        return parse_share_link(text)
    try:
        data = json.loads(text)
        server, token = data["server"], data["token"]
        port = data.get("socks_port")
    except (ValueError, KeyError, TypeError):
        raise ValueError("the answer is not a trisocks subscription") from None
    if not isinstance(server, str) or not isinstance(token, str) or not token:
        raise ValueError("the answer is not a trisocks subscription")
    return Subscribed(server=server, token=token, socks_port=port if isinstance(port, int) else None)
