"""What every command shares: TRISOCKS_* environment-backed options, usage errors, logging
and process limits."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..net.trace import TRACE

logging.addLevelName(TRACE, "TRACE")

log = logging.getLogger("trisocks")


# -- environment-backed arguments -------------------------------------------------


def from_env(name: str):
    return os.environ.get("TRISOCKS_" + name)


def env_bool(name: str) -> bool:
    value = from_env(name)
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


ENV_ERRORS: dict[str, list[str]] = {}  # parser prog -> bad TRISOCKS_* values
ENV_WARNINGS: dict[str, list[str]] = {}  # parser prog -> old TRISOCKS_* spellings in use


def usage_error(message: str):
    """A configuration mistake: say what is wrong and exit with status 2, like argparse."""
    print(f"trisocks: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _note_on_argv(namespace, dest: str) -> None:
    namespace.on_argv = {*getattr(namespace, "on_argv", ()), dest}


class OnArgv(argparse._StoreAction):
    """Store the value, and note that it came from the command line: a secret given there
    is visible in ps, and a flag there wins over the environment."""

    def __call__(self, parser, namespace, value, option_string=None):
        super().__call__(parser, namespace, value, option_string)
        _note_on_argv(namespace, self.dest)


class OnArgvAppend(argparse._AppendAction):
    """Append the value (a repeatable option), noting that it came from the command line."""

    def __call__(self, parser, namespace, value, option_string=None):
        super().__call__(parser, namespace, value, option_string)
        _note_on_argv(namespace, self.dest)


def on_argv(args, dest: str) -> bool:
    """Whether option ``dest`` was given on the command line (options added with track=True)."""
    return dest in getattr(args, "on_argv", ())


def add_option(parser, *flags, env: str, help: str, default=None, type=str, track: bool = False,
               **kw):
    """An option whose default comes from TRISOCKS_<env>, documented in its help; ``track``
    records whether it was given on the command line (see on_argv)."""
    if track:
        kw["action"] = OnArgv
    raw = from_env(env)
    if raw is not None and type is not None:
        try:
            default = type(raw)
        except ValueError:
            # reported only if this command runs: a bad variable for one command must not
            # break the others
            ENV_ERRORS.setdefault(parser.prog, []).append(
                f"TRISOCKS_{env}={raw!r} is not a valid value for {flags[-1]}")
    shown = "" if default in (None, "", False) else f" (default: {default})"
    parser.add_argument(*flags, default=default, type=type, help=f"{help}{shown} [env TRISOCKS_{env}]", **kw)


def add_flag(parser, *flags, env: str, help: str, old_env: str = ""):
    """A switch whose default comes from TRISOCKS_<env>; ``old_env`` is a former spelling of
    the variable, still honoured, with a warning when the command runs."""
    default = env_bool(env)
    if old_env and from_env(old_env) is not None and from_env(env) is None:
        default = env_bool(old_env)
        ENV_WARNINGS.setdefault(parser.prog, []).append(
            f"TRISOCKS_{old_env} is the old name of TRISOCKS_{env}; it still works, but please "
            f"rename it")
    parser.add_argument(*flags, action="store_true", default=default,
                        help=f"{help} [env TRISOCKS_{env}=1]")


def add_debug(parser):
    try:
        default = int(from_env("DEBUG") or 0)
    except ValueError:
        default = 1
    parser.add_argument("-d", "--debug", action="count", default=default,
                        help="more logging: -d for debug, -dd for every message [env TRISOCKS_DEBUG=1|2]")
    add_logging(parser)


def add_logging(parser) -> None:
    """--log-format, --log-file and --log-limit (docs/logging.md), with -d on every command
    that runs."""
    from .logs import DEFAULT_LIMIT, FORMATS

    add_option(parser, "--log-format", env="LOG_FORMAT", default="text", choices=FORMATS,
               metavar="text|json",
               help="text: 'DATE TIME LEVEL LOGGER: message' lines; json: one JSON object a line "
               "with time (RFC 3339, UTC), level, logger, message and the event's fields")
    add_option(parser, "--log-file", env="LOG_FILE", default="", metavar="FILE",
               help="append the log to FILE instead of standard error; when FILE is moved or "
               "deleted (logrotate) the next line starts a new one, no signal needed")
    add_option(parser, "--log-limit", env="LOG_LIMIT", default=DEFAULT_LIMIT,
               metavar="COUNT/SECONDS",
               help="at most COUNT lines of one kind (same logger, level and message) per "
               "SECONDS; one line then says how many more were held back, so that a flood "
               "cannot fill the disk. 0: no limit (nor with -d)")


def add_access_log(parser) -> None:
    add_option(parser, "--access-log", env="ACCESS_LOG", default="", metavar="FILE",
               help="write one line per finished channel to FILE ('-': standard output): user "
               "or token id, client address, destination, bytes each way, duration, how it "
               "ended; in the --log-format, reopened like --log-file (docs/logging.md)")


def open_access_log(args, server) -> None:
    """Start the access log of ``server`` (a tunnel Server) when --access-log asks for one."""
    if not getattr(args, "access_log", ""):
        return
    from ..net.access import AccessLog
    from ..net.session import Session
    from .logs import access_logger

    try:
        access_logger(args.access_log, getattr(args, "log_format", "text"))
    except OSError as exc:
        usage_error(f"--access-log {args.access_log}: cannot open it ({exc.strerror or exc})")
    Session.access_log = AccessLog(who=server.sessions.get)


def add_list(parser, *flags, env: str, help: str, metavar: str, track: bool = False):
    default = [t for t in (from_env(env) or "").split(",") if t]
    if track:
        parser.add_argument(*flags, action=OnArgvAppend, metavar=metavar, default=default,
                            help=f"{help} [env TRISOCKS_{env}, comma-separated]")
        return
    parser.add_argument(*flags, action="append", metavar=metavar, default=default,
                        help=f"{help} [env TRISOCKS_{env}, comma-separated]")


class _RuleAction(argparse.Action):
    """--allow / --deny: one list, in the order given on the command line."""

    def __call__(self, parser, namespace, value, option_string=None):
        rules = list(getattr(namespace, self.dest) or [])
        rules.append(f"{self.const} {value}")
        setattr(namespace, self.dest, rules)


def add_rules(parser) -> None:
    """The server's destination rules (docs/policy.md), checked in the order given."""
    default = [r.strip() for r in (from_env("RULES") or "").replace("\n", ";").split(";")
               if r.strip()]
    parser.add_argument("--allow", dest="rules", action=_RuleAction, const="allow",
                        default=default, metavar="RULE",
                        help="let tunnel users reach RULE: an address, CIDR, range, name, "
                        "*.domain, or set (loopback, private, link-local, multicast, "
                        "unspecified, own), with :PORTS and a tcp/udp prefix, e.g. "
                        "127.0.0.1:18080 or 'udp 10.0.0.0/8:53'. Repeatable; --allow and "
                        "--deny are checked in the order given, before the built-in defaults "
                        "[env TRISOCKS_RULES]")
    parser.add_argument("--deny", dest="rules", action=_RuleAction, const="deny",
                        metavar="RULE", help="keep tunnel users from reaching RULE (as --allow) "
                        "[env TRISOCKS_RULES='deny private; allow 10.1.0.0/16', "
                        "when no --allow/--deny is given]")


# -- secrets: tokens and API keys ----------------------------------------------------

ARGV_SECRET_WARNING = ("a secret on the command line is visible to every local user in ps; "
                       "use {file_flag} or {env}")


def read_secret_file(flag: str, path: str) -> list[str]:
    """The secrets in ``path``, one a line (trailing whitespace and blank lines dropped).

    A file that cannot be read or holds nothing is a usage error naming it: starting with
    no secret, or an empty one, would be worse than not starting."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        usage_error(f"{flag} {path}: cannot read it ({exc.strerror or exc})")
    except UnicodeDecodeError:
        usage_error(f"{flag} {path}: not a text file (the secret goes in it as text, one a line)")
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        usage_error(f"{flag} {path}: the file is empty; write the secret in it")
    return lines


def warn_secret_on_argv(args, dest: str, file_flag: str, env: str) -> None:
    if on_argv(args, dest) and getattr(args, dest):
        log.warning("%s", ARGV_SECRET_WARNING.format(file_flag=file_flag, env=env))


def one_secret(args, dest: str, file_dest: str, flags: str, file_flag: str, env: str) -> str | None:
    """The secret a single-valued option ends up with, or None to keep the option's value.

    The command line wins over the environment; the value and its file together on the
    same level are a mistake, said as such."""
    path = getattr(args, file_dest)
    if not path:
        return None
    value_on_argv, file_on_argv = on_argv(args, dest), on_argv(args, file_dest)
    if value_on_argv and file_on_argv:
        usage_error(f"{flags} and {file_flag} both give the secret: keep one")
    if value_on_argv:
        return None  # -t on the command line beats TRISOCKS_*_FILE in the environment
    if not file_on_argv and from_env(env) is not None:
        usage_error(f"TRISOCKS_{env} and TRISOCKS_{env}_FILE are both set: keep one")
    lines = read_secret_file(file_flag, path)
    if len(lines) > 1:
        usage_error(f"{file_flag} {path}: holds {len(lines)} lines; this command takes one secret")
    return lines[0]


def credentials_pair(args) -> None:
    if bool(getattr(args, "socks_username", "")) != bool(getattr(args, "socks_password", "")):
        usage_error("-n/--socks-username and -w/--socks-password go together")


# -- the process ------------------------------------------------------------------


def raise_fd_limit() -> None:
    """Every channel holds a socket: lift the soft open-files limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def fix_malloc_threshold() -> None:
    """Keep big buffers out of the heap, so memory goes back to the system when freed.

    glibc serves allocations of 128 KiB and more with mmap, but raises that threshold
    each time such a block is freed: after a burst of large buffers (send buffers, data
    held for slow readers) later ones come from the heap, which rarely shrinks, and RSS
    only grows (measured: +45 MB after three rounds of 8 parallel 128 MiB transfers).
    Setting the threshold explicitly turns the adjustment off.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(128 << 10))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def setup_logging(level: int, log_format: str = "text", log_file: str = "",
                  log_limit: str = "0") -> None:
    """Logging for a command: -d ``level``, and its --log-format/--log-file/--log-limit
    (trisocks.cli.logs). A file that cannot be opened, or a bad limit, is a usage error."""
    from .logs import FORMATS, configure, parse_limit

    if log_format not in FORMATS:
        usage_error(f"--log-format {log_format!r}: choose text or json")
    try:
        limit = parse_limit(log_limit or "0")
    except ValueError as exc:
        usage_error(f"--log-limit {exc}")
    try:
        configure(level, TRACE, log_format, log_file, limit)
    except OSError as exc:
        usage_error(f"--log-file {log_file}: cannot open it ({exc.strerror or exc})")


def setup_logging_for(args) -> None:
    """setup_logging() with a parsed command line (commands without the flags: defaults)."""
    setup_logging(getattr(args, "debug", 0), getattr(args, "log_format", "text"),
                  getattr(args, "log_file", ""), getattr(args, "log_limit", "0"))
