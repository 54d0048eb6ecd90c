"""The management API key: how it may be configured, how a request's key is checked, and
the per-address limit on failed attempts.

A key is configured (``-k/--api-key`` or ``TRISOCKS_API_KEY``) in one of five forms::

    plaintext                        any string that does not start with a scheme below
    sha256:<64 hex digits>           SHA-256 of the key
    pbkdf2:sha256:<iterations>:<salt hex>:<hash hex>
    scrypt:<n>:<r>:<p>:<salt hex>:<hash hex>
    $2b$<cost>$<53 characters>       bcrypt (also $2a$ and $2y$, as htpasswd -B writes them)

Generate a hashed form with ``trisocks hash-key`` (it reads the key from standard input,
or makes one up). Every comparison is constant-time; the slow hashes run
in a worker thread, and once a key has been verified its SHA-256 is remembered so that
later requests cost one hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
import time

import bcrypt
import trio

from ..tunnel.throttle import FailureLimiter  # noqa: F401 - part of this module's API
from ..tunnel.tokens import generate as new_secret

SCHEMES = ("sha256:", "pbkdf2:", "scrypt:", "$2")
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
BCRYPT_COST = 12
PBKDF2_ITERATIONS = 600_000
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 256 << 20


def _sha256(data: str) -> bytes:
    return hashlib.sha256(data.encode()).digest()


class ApiKey:
    """One configured key. ``verify(candidate)`` is constant-time for the hash it holds."""

    def __init__(self, spec: str) -> None:
        if not spec:
            raise ValueError("the API key is empty")
        self.scheme = "plain"
        self._fast: bytes | None = None  # sha256 of the key, when known
        self._slow = None  # function of candidate -> bool, for the slow hashes
        if spec.startswith("sha256:"):
            hexpart = spec[7:]
            self.scheme = "sha256"
            self._fast = _unhex(hexpart, 32, "sha256:<64 hex digits>")
        elif spec.startswith("pbkdf2:"):
            self.scheme = "pbkdf2"
            parts = spec.split(":")
            if len(parts) != 5 or parts[1] != "sha256" or not parts[2].isdigit():
                raise ValueError("a pbkdf2 API key hash reads "
                                 "pbkdf2:sha256:<iterations>:<salt hex>:<hash hex>")
            iterations = int(parts[2])
            if not 1000 <= iterations <= 10_000_000:
                raise ValueError("pbkdf2 iterations must be between 1000 and 10000000")
            salt = _unhex(parts[3], None, "pbkdf2 salt (hex)")
            expected = _unhex(parts[4], None, "pbkdf2 hash (hex)")
            self._slow = lambda c: hmac.compare_digest(
                hashlib.pbkdf2_hmac("sha256", c.encode(), salt, iterations, len(expected)), expected)
        elif spec.startswith("scrypt:"):
            self.scheme = "scrypt"
            parts = spec.split(":")
            if len(parts) != 6 or not all(p.isdigit() for p in parts[1:4]):
                raise ValueError("a scrypt API key hash reads scrypt:<n>:<r>:<p>:<salt hex>:<hash hex>")
            n, r, p = (int(x) for x in parts[1:4])
            if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
                raise ValueError("scrypt parameters: n a power of two, 1 <= r <= 64, 1 <= p <= 16")
            salt = _unhex(parts[4], None, "scrypt salt (hex)")
            expected = _unhex(parts[5], None, "scrypt hash (hex)")
            self._slow = lambda c: hmac.compare_digest(
                hashlib.scrypt(c.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                               dklen=len(expected)), expected)
        elif spec.startswith("$2"):  # a bcrypt hash, or a mangled one: never a plaintext
            self.scheme = "bcrypt"
            if not _BCRYPT.fullmatch(spec):
                raise ValueError("a bcrypt API key hash reads $2b$<cost 04-31>$<53 characters of "
                                 "salt and hash>")
            hashed = spec.encode()
            self._slow = lambda c: _bcrypt_check(c, hashed)  # bcrypt compares itself
        else:
            self._fast = _sha256(spec)

    @property
    def plaintext_configured(self) -> bool:
        return self.scheme == "plain"

    def __repr__(self) -> str:  # never the key, never its hash
        return f"<ApiKey {self.scheme}>"

    def verify_fast(self, candidate: str) -> bool | None:
        """True/False when answerable with one SHA-256; None when the slow hash must run."""
        digest = _sha256(candidate)
        if self._fast is not None:
            return hmac.compare_digest(digest, self._fast)
        return None

    def verify_slow(self, candidate: str) -> bool:
        """The full check (slow for pbkdf2/scrypt/bcrypt: call from a worker thread)."""
        fast = self.verify_fast(candidate)
        if fast is not None:
            return fast
        ok = self._slow(candidate)
        if ok:
            self._fast = _sha256(candidate)  # from now on one hash per request
        return ok

    async def verify(self, candidate: str) -> bool:
        fast = self.verify_fast(candidate)
        if fast is not None:
            return fast
        return await trio.to_thread.run_sync(self.verify_slow, candidate)


def _bcrypt_check(candidate: str, hashed: bytes) -> bool:
    raw = candidate.encode()
    if len(raw) > 72:  # bcrypt reads 72 bytes at most; newer versions refuse longer input
        return False
    return bcrypt.checkpw(raw, hashed)


def _unhex(text: str, size: int | None, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"API key hash: expected {what}") from None
    if (size is not None and len(raw) != size) or not raw:
        raise ValueError(f"API key hash: expected {what}")
    return raw


def hash_key(key: str, scheme: str = "scrypt") -> str:
    """The configured form of ``key`` for ``scheme`` (sha256, pbkdf2, scrypt or bcrypt)."""
    salt = secrets.token_bytes(16)
    if scheme == "bcrypt":
        if len(key.encode()) > 72:
            raise ValueError("bcrypt takes keys of at most 72 bytes")
        return bcrypt.hashpw(key.encode(), bcrypt.gensalt(rounds=BCRYPT_COST)).decode()
    if scheme == "sha256":
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    if scheme == "pbkdf2":
        h = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, PBKDF2_ITERATIONS, 32)
        return f"pbkdf2:sha256:{PBKDF2_ITERATIONS}:{salt.hex()}:{h.hex()}"
    if scheme == "scrypt":
        h = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                           maxmem=_SCRYPT_MAXMEM, dklen=32)
        return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{salt.hex()}:{h.hex()}"
    raise ValueError(f"unknown scheme {scheme!r} (sha256, pbkdf2, scrypt or bcrypt)")


class LogBudget:
    """At most ``lines`` log lines per ``period`` seconds (failed keys: one line per attempt,
    but attempts from many addresses must not flood the log)."""

    def __init__(self, lines: int = 60, period: float = 60.0, clock=time.monotonic) -> None:
        self.lines = lines
        self.period = period
        self.clock = clock
        self._start = clock()
        self._used = 0
        self._dropped = 0

    def take(self) -> int | None:
        """None: do not log this one. Else log it, with how many were dropped before it."""
        now = self.clock()
        if now - self._start >= self.period:
            self._start, self._used = now, 0
        if self._used >= self.lines:
            self._dropped += 1
            return None
        self._used += 1
        dropped, self._dropped = self._dropped, 0
        return dropped


def presented_keys(headers) -> list[str]:
    """The keys a request presents: ``X-API-Key`` and ``Authorization: Bearer``."""
    found = []
    value = headers.get("x-api-key")
    if value:
        found.append(value.strip())
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    return found


def hash_key_command(scheme: str, generate: bool) -> int:
    """``trisocks hash-key``: print the configured form of a key read from standard input
    (or of a new random one)."""
    if generate:
        key = new_secret(32)
        print(f"key:  {key}")
    else:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline().rstrip("\r\n")
        if not key:
            print("trisocks: error: empty key", file=sys.stderr)
            return 2
    try:
        hashed = hash_key(key, scheme)
    except ValueError as e:
        print(f"trisocks: error: {e}", file=sys.stderr)
        return 2
    print(("hash: " if generate else "") + hashed)
    return 0
