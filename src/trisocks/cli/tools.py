"""The small commands: ``trisocks hash-key``, ``trisocks version`` and ``trisocks health``."""

from __future__ import annotations

import socket

from .. import IMPLEMENTATION, __version__
from .common import Formatter, add_flag, add_option, usage_error

# what a listen address means to a check on the same machine
_ANY = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def add_parsers(sub) -> None:
    h = sub.add_parser(
        "hash-key", formatter_class=Formatter, help="print the hashed form of a management API key",
        description="Print the hashed form of a management API key, to configure with -k/--api-key "
        "or TRISOCKS_API_KEY so that the plaintext need not sit in a config file. The key is read "
        "from standard input (one line; prompted for on a terminal); with --generate a new random "
        "key is made and printed first.")
    h.add_argument("--scheme", choices=("scrypt", "pbkdf2", "sha256", "bcrypt"), default="scrypt",
                   help="the hash: scrypt and bcrypt are slow on purpose (a guessed key costs time), "
                   "sha256 is not and suits only long random keys")
    h.add_argument("--generate", action="store_true", help="make up a new random key and print it too")

    sub.add_parser("version", help="print the version and which hot path runs")

    c = sub.add_parser(
        "health", formatter_class=Formatter,
        help="check that a server on this machine answers (a container HEALTHCHECK)",
        description="Check that a trisocks server answers; print one line and exit 0 if it does, "
        "1 if it does not.\n\n"
        "--url URL: an HTTP(S) GET of URL must answer 200. With the management API on, use its\n"
        "  /healthz, which also checks the database: http://127.0.0.1:8765/healthz\n"
        "without --url: the WebSocket port must accept a TCP connection (the API may be off).\n"
        "  The host and port come from -H/-P or the server's own TRISOCKS_WS_HOST and\n"
        "  TRISOCKS_WS_PORT; a wildcard listen address (0.0.0.0, ::) is checked on loopback.")
    add_option(c, "--url", env="HEALTH_URL", default="", help="GET this URL; 200 is healthy")
    add_option(c, "-H", "--ws-host", env="WS_HOST", default="127.0.0.1",
               help="without --url: the server's listen address")
    add_option(c, "-P", "--ws-port", env="WS_PORT", default=8765, type=int,
               help="without --url: the server's WebSocket port")
    add_option(c, "--timeout", env="HEALTH_TIMEOUT", default=5.0, type=float,
               help="seconds to wait for the answer")
    add_flag(c, "--insecure", env="HEALTH_INSECURE",
             help="https:// URL: do not check the certificate (a local check of a server whose "
             "certificate names its public host)")


def version_line() -> str:
    return f"trisocks {__version__} ({IMPLEMENTATION} hot path)"


def cmd_version(args) -> int:
    print(version_line())
    return 0


def cmd_hash_key(args) -> int:
    from ..management.keys import hash_key_command

    return hash_key_command(args.scheme, args.generate)


def cmd_health(args) -> int:
    if args.timeout <= 0:
        usage_error("--timeout must be more than 0 seconds")
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            usage_error(f"--url {args.url!r}: expected http://HOST:PORT/PATH or https://...")
        healthy, line = _check_url(args.url, args.timeout, args.insecure)
    else:
        healthy, line = _check_port(_ANY.get(args.ws_host, args.ws_host), args.ws_port, args.timeout)
    print(f"{'healthy' if healthy else 'unhealthy'}: {line}", flush=True)
    return 0 if healthy else 1


def _check_port(host: str, port: int, timeout: float) -> tuple[bool, str]:
    from ..wire.names import hostport

    where = hostport(host.strip("[]"), port)
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return True, f"{where} accepts connections"
    except OSError as exc:
        return False, f"{where}: {_reason(exc)}"


def _check_url(url: str, timeout: float, insecure: bool) -> tuple[bool, str]:
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    # a local check: never through a proxy from the environment
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers={"User-Agent": f"trisocks-health/{__version__}"})
    try:
        with opener.open(request, timeout=timeout) as reply:
            status, body = reply.status, reply.read(4096)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096)
    except (OSError, ValueError) as exc:
        return False, f"{url}: {_reason(exc)}"
    text = " ".join(body.decode("utf-8", "replace").split())[:200]
    return status == 200, f"{url} answered {status}" + (f": {text}" if text else "")


def _reason(exc: BaseException) -> str:
    """An OSError (or urllib's wrapper of one) in a few words."""
    inner = getattr(exc, "reason", None)
    if isinstance(inner, BaseException):
        exc = inner
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(getattr(exc, "strerror", None) or exc).lower()
