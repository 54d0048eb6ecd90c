"""Where the server is: the URL a user gives (ws/wss/http/https, a token in the query), the
WebSocket request target for either auth form, and the client's TLS context."""

from __future__ import annotations

import hashlib
import ssl
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..wire.names import bracket


def tls_client_context(ca_file: str = "", insecure: bool = False) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (FileNotFoundError, ssl.SSLError) as exc:
        raise ValueError(f"--ca-file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True)
class Endpoint:
    """Where the WebSocket server is, parsed from the URL the user gave."""

    scheme: str
    host: str
    port: int
    resource: str  # path and query sent in the GET line

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "wss" else 80
        host = bracket(self.host)
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.resource.split('?')[0]}"


def split_url_token(url: str) -> tuple[str, str | None]:
    """The URL without its ``token=`` query parameter, and that token (None if absent or empty).

    Both peers' clients take a token in the URL over the one given apart; it must never be
    sent as it stands (servers read a plain ``token=`` as a digest and refuse it)."""
    parts = urlsplit(url if "://" in url else "ws://" + url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    tokens = [value for key, value in pairs if key == "token" and value]
    if not any(key == "token" for key, _ in pairs):
        return url, None
    rest = urlencode([(key, value) for key, value in pairs if key != "token"])
    return urlunsplit(parts._replace(query=rest)), (tokens[0] if tokens else None)


def url_auth_resource(resource: str, token: str, reverse: bool, instance: bytes) -> str:
    """The GET target for URL-query auth: the token's SHA-256 hex, the role and the instance."""
    path, _, query = resource.partition("?")
    own = ("token", "reverse", "instance")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in own]
    pairs += [("token", hashlib.sha256(token.encode()).hexdigest()),
              ("reverse", "true" if reverse else "false"),
              ("instance", str(uuid.UUID(bytes=instance)))]
    return f"{path}?{urlencode(pairs)}"


def parse_url(url: str) -> Endpoint:
    """Accept ws/wss/http/https URLs (LinkSocks style); an empty path means /socket.

    Without a scheme, plain WebSocket is assumed only when a port says where: ``host`` alone
    (80? 443?) and ``host:443`` (a TLS port) are refused with the forms to choose from."""
    if "://" not in url:
        bare = urlsplit("//" + url)
        try:
            port = bare.port
        except ValueError:
            port = None
        if port is None or port == 443:
            host = url.split("/")[0]
            raise ValueError(f"the server URL {url!r} has no scheme: write ws://{host} for plain "
                             f"WebSocket or wss://{host} for WebSocket over TLS")
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (use ws:// or wss://)")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise ValueError(f"bad port in URL {url!r}") from None
    path = parts.path if parts.path not in ("", "/") else "/socket"
    resource = urlunsplit(("", "", path, parts.query, ""))
    return Endpoint(scheme, parts.hostname, port, resource)
