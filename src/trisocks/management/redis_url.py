"""Store URLs for Redis (``--store``): what they may say, checked before anything starts,
and what a failure of the connection is called in a StoreError.

``redis://[user:password@]host[:port][/db]`` (port 6379, database 0 by default),
``rediss://...`` for TLS, and ``unix://[user:password@]/path/redis.sock?db=N``. A password
with ``@``, ``:`` or ``/`` in it is percent-encoded (``%40``). TLS checks the server's
certificate against the system's CAs and its host name, unless the URL says otherwise:
``?ssl_ca_certs=FILE`` (or a directory of CAs), ``?ssl_cert_reqs=none`` (no check at all:
only for a test), ``optional`` or ``required``; ``?ssl_certfile=...&ssl_keyfile=...`` present
a client certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import coredis
import trio
from coredis.exceptions import (
    AuthenticationFailureError,
    AuthenticationRequiredError,
    AuthorizationError,
    RedisError,
)
from coredis.retry import NoRetryPolicy

_QUERY = {"db", "ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class RedisTarget:
    """Where a store URL points; ``where`` is the URL without password or query."""

    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        user = f"{self.username}@" if self.username else ""
        if self.scheme == "unix":
            return f"unix://{user}{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}"

    def client(self, timeout: float) -> coredis.Redis:
        where = ({"unix_socket_path": self.path} if self.scheme == "unix"
                 else {"host": self.host, "port": self.port, "ssl_context": self.ssl_context})
        return coredis.Redis(**where, db=self.db, username=self.username, password=self.password,
                             connect_timeout=timeout, stream_timeout=timeout,
                             retry_policy=NoRetryPolicy(), client_name="trisocks")


def parse_store_url(url: str) -> RedisTarget:
    """Check a store URL; ValueError says what is wrong with it (a usage error)."""
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} is not a redis://, rediss:// or unix:// URL")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix") or not url.lower().startswith(f"{scheme}://"):
        raise ValueError(f"{_hide(url)}: expected redis://host:port/db, rediss://... or "
                         "unix:///path/redis.sock?db=N")
    if parts.fragment:
        raise ValueError(f"{_hide(url)}: a fragment (#...) means nothing here")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    for name, values in query.items():
        if name not in _QUERY or (name.startswith("ssl_") and scheme != "rediss"):
            known = "db" if scheme != "rediss" else ", ".join(sorted(_QUERY))
            raise ValueError(f"{_hide(url)}: unknown parameter {name!r} (known: {known})")
        if len(values) > 1:
            raise ValueError(f"{_hide(url)}: {name} is given twice")
    opts = {k: v[0] for k, v in query.items()}
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    db_text = opts.get("db")
    if scheme == "unix":
        if parts.hostname or parts.port:
            raise ValueError(f"{_hide(url)}: a unix socket URL has no host: unix:///path/redis.sock")
        if not parts.path.startswith("/") or parts.path == "/":
            raise ValueError(f"{_hide(url)}: expected the socket's absolute path, "
                             "unix:///path/redis.sock?db=N")
        target = dict(path=unquote(parts.path))
    else:
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{_hide(url)}: the port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError(f"{_hide(url)}: no host (redis://host:port/db)")
        path = parts.path.strip("/")
        if path and db_text is not None:
            raise ValueError(f"{_hide(url)}: the database is given twice (path and ?db=)")
        db_text = path or db_text
        target = dict(host=parts.hostname, port=port)
    try:
        db = int(db_text or 0)
        if db < 0 or not (db_text or "0").isdigit():
            raise ValueError
    except ValueError:
        raise ValueError(f"{_hide(url)}: the database is a number (/0, ?db=0), "
                         f"not {db_text!r}") from None
    context = _tls(opts, _hide(url)) if scheme == "rediss" else None
    return RedisTarget(scheme=scheme, db=db, username=user, password=password,
                       ssl_context=context, **target)


def _hide(url: str) -> str:
    """The URL as it can be shown: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _tls(opts: dict[str, str], url: str) -> ssl.SSLContext:
    """The system's CAs and a host name check, unless the URL says otherwise."""
    reqs = opts.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        raise ValueError(f"{url}: ssl_cert_reqs is none, optional or required, not {reqs!r}")
    ca = opts.get("ssl_ca_certs")
    try:
        context = ssl.create_default_context()
        if ca:
            context.load_verify_locations(**{"capath" if os.path.isdir(ca) else "cafile": ca})
        if opts.get("ssl_certfile"):
            context.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile") or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{url}: cannot load the TLS files: {exc.strerror or exc}") from None
    if reqs == "none":
        context.check_hostname = False  # asked for: no verification at all
    context.verify_mode = _CERT_REQS[reqs]
    return context




# -- errors -------------------------------------------------------------------------------

def reason_of(exc: BaseException) -> str | None:
    """What went wrong, in a few words; None for an exception that is not Redis's (a bug)."""
    if isinstance(exc, BaseExceptionGroup):
        reasons = [reason_of(e) for e in exc.exceptions]
        return None if None in reasons else reasons[0]
    if isinstance(exc, AuthenticationRequiredError):
        return "Redis wants a password (redis://user:password@host:port/db)"
    if isinstance(exc, AuthenticationFailureError):
        return f"authentication refused: {exc}"  # WRONGPASS...: no word of what was sent
    if isinstance(exc, AuthorizationError):
        return f"not allowed: {exc}"  # an ACL user without the commands or keys it needs
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"host name lookup failed: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)  # not strerror: anyio puts the address in it
        return text[0].lower() + text[1:]
    if isinstance(exc, (RedisError, OSError, TimeoutError, trio.BrokenResourceError)):
        cause = exc.__cause__ or exc.__context__
        deeper = reason_of(cause) if cause is not None else None
        return deeper or str(exc) or type(exc).__name__
    return None
