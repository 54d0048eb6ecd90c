"""The small commands: ``trisocks hash-key``, ``trisocks version``, ``trisocks health`` and
``trisocks backup``."""

from __future__ import annotations

import os
import socket
import sys
import time

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


    b = sub.add_parser(
        "backup", formatter_class=Formatter,
        help="copy the server's database, safely while the server runs",
        description="Write a consistent copy of the server's SQLite database (tokens, users, "
        "counters, events, usage, webhooks) to OUT, with SQLite's online backup: the server "
        "may go on running and writing. The copy is a database file of its own, mode 0600 "
        "(it holds every token and user key). One line says what was copied.\n\n"
        "OUT: a file name, or a directory (the copy is then DIR/trisocks-YYYYmmdd-HHMMSS.db,\n"
        "  in UTC). An existing file is left alone unless --force is given.\n"
        "Exit status: 0 copied, 1 the copy failed (nothing is left at OUT), 2 a usage error\n"
        "  (no database at --db, OUT exists). Restore: docs/deploy.md.")
    b.add_argument("out", metavar="OUT", help="where the copy goes: a file, or a directory")
    add_option(b, "--db", env="DB", default="",
               help="the server's database; without it, the server's default: "
               "$XDG_STATE_HOME/trisocks/trisocks.db, else ~/.local/state/trisocks/trisocks.db")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")


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


def cmd_backup(args) -> int:
    from ..management.store import default_path

    source = os.path.abspath(args.db or default_path())
    if not os.path.isfile(source):
        usage_error(f"no database at {source}; give the server's with --db FILE (or TRISOCKS_DB)")
    out = args.out
    if os.path.isdir(out):
        out = os.path.join(out, time.strftime("trisocks-%Y%m%d-%H%M%S.db", time.gmtime()))
    out = os.path.abspath(out)
    if not os.path.isdir(os.path.dirname(out)):
        usage_error(f"{out}: the directory {os.path.dirname(out)} does not exist")
    if os.path.lexists(out):
        if os.path.exists(out) and os.path.samefile(out, source):
            usage_error(f"{out} is the database itself; give another name")
        if not args.force:
            usage_error(f"{out} exists; give another name, or --force to replace it")
    try:
        summary = _backup(source, out, args.force)
    except (OSError, BackupError) as exc:
        reason = exc if isinstance(exc, BackupError) else (exc.strerror or exc)
        print(f"trisocks: error: backup of {source} failed: {reason}", file=sys.stderr)
        return 1
    print(f"backed up {source} to {out}: {summary}", flush=True)
    return 0


class BackupError(Exception):
    pass


def _backup(source: str, out: str, force: bool) -> str:
    """Copy ``source`` into a new file next to ``out`` with SQLite's backup API, check the
    copy, then give it its name; on any failure nothing is left behind."""
    import sqlite3

    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    # 0600 from the start: SQLite's own side files (journal) take the same mode
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    try:
        try:
            # read-write (never created): as the last connection to close, it folds the WAL
            # back and removes the -wal and -shm files it made, which a read-only one leaves
            # behind, owned by whoever ran the backup
            src = sqlite3.connect(f"file:{_uri_path(source)}?mode=rw", uri=True, timeout=30.0)
            try:
                dst = sqlite3.connect(tmp, isolation_level=None)
                try:
                    src.backup(dst)  # all pages in one step: one consistent snapshot
                    dst.execute("PRAGMA journal_mode=DELETE")  # one file, readable anywhere
                    summary = _describe(dst)
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise BackupError(str(exc)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if OUT appeared meanwhile: never replaced silently
            except FileExistsError:
                raise BackupError(f"{out} appeared while copying; nothing replaced") from None
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(out))
    finally:
        for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return summary


def _describe(conn) -> str:
    """What the copy holds, after SQLite's own check of it."""
    check = conn.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise BackupError(f"the copy failed its check: {check}")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"tokens", "users", "events"} <= tables:
        raise BackupError("not a trisocks database (no tokens, users and events tables)")
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("users", "tokens", "events")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute(
        "PRAGMA page_size").fetchone()[0]
    return (f"schema {version}, {counts['users']} user(s), {counts['tokens']} token(s), "
            f"{counts['events']} event(s), {pages // 1024} KiB")


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
