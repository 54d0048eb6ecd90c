"""Host names as a peer sends them: checked once, before anything resolves or dials them.

A SOCKS5 request, a SOCKS5 UDP header and a LinkSocks Connect or UDP Data message all carry
a host chosen by somebody else. Handed to ``inet_pton`` or ``getaddrinfo`` as it is, a NUL, an
empty label (``a..b``), a label over 63 bytes, a name over 253 bytes or a name the IDNA codec
refuses raises ValueError/UnicodeError rather than a resolver error. :func:`check_host`
refuses such a host up front with :class:`BadHostName`, and both sides of the tunnel call it.
Sans-IO: no Trio, no sockets beyond ``inet_pton``.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import idna  # IDNA 2008, as trio resolves names (a dependency of trio)

__all__ = ["BAD_HOST_TEXT", "BadHostName", "ascii_host", "bracket", "check_host", "host_error", "hostport"]

MAX_NAME = 253  # RFC 1035: 255 octets on the wire, 253 characters written out
MAX_LABEL = 63
# Letters, digits, hyphen, and underscore (SRV-style and many internal names use it)
_LABEL = re.compile(r"[A-Za-z0-9_-]+\Z")

# The start of the error text a refusal carries (ConnectResponse, logs); socks5 maps it to
# "host unreachable", like a name that does not resolve.
BAD_HOST_TEXT = "invalid host name"


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in a host or socket-address text (brackets and an IPv6 scope dropped),
    or None when it is not an IP literal."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def bracket(host: str) -> str:
    """``host`` as it is written before a port or in a URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host else host  # only IPv6 literals contain a colon


def hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:1080``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BadHostName(ValueError):
    """A host that is neither an IP literal nor a name a resolver can be asked about."""


def _is_literal(host: str) -> bool:
    try:
        if ":" in host:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        else:
            socket.inet_pton(socket.AF_INET, host)
        return True
    except OSError:
        return False


def ascii_host(host: str) -> str:
    """The name as a resolver is asked about it (IDNA 2008 for non-ASCII names, as trio
    does); BadHostName when it has no such form."""
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except (UnicodeError, ValueError):  # IDNAError is a UnicodeError; surrogates land here too
        raise BadHostName("not a valid internationalised name") from None


def check_host(host: str) -> None:
    """Raise :class:`BadHostName` unless ``host`` (no brackets) can be resolved or dialed."""
    if not host:
        raise BadHostName("empty")
    if "\x00" in host:  # before inet_pton, which raises ValueError on it
        raise BadHostName("NUL byte")
    name = ascii_host(host)  # IP literals are ASCII, and so is what inet_pton can take
    if ":" in name:  # only IPv6 literals contain a colon
        if not _is_literal(name):
            raise BadHostName("not an IPv6 address")
        return
    if _is_literal(name):
        return
    name = name[:-1] if name.endswith(".") else name  # the root's dot is allowed once
    if len(name) > MAX_NAME:
        raise BadHostName(f"longer than {MAX_NAME} characters")
    for label in name.split("."):
        if not label:
            raise BadHostName("empty label")
        if len(label) > MAX_LABEL:
            raise BadHostName(f"label longer than {MAX_LABEL} characters")
        if not _LABEL.match(label):
            raise BadHostName("character not allowed in a host name")


def host_error(host: str) -> str | None:
    """The error text to refuse ``host`` with, or None when it is fine."""
    try:
        check_host(host)
    except BadHostName as exc:
        return f"{BAD_HOST_TEXT}: {exc}"
    return None
