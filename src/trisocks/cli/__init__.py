"""Command line: ``trisocks server|client|provider|connector|hash-key|version|health|backup|
check-config``, with LinkSocks's flags and defaults.

Every flag can also come from a ``TRISOCKS_*`` environment variable (named in
``--help``); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from ..wire.errors import AuthError, TunnelError
from . import client, server, tools
from .client import until_signal
from .common import (
    ENV_ERRORS,
    ENV_WARNINGS,
    TRACE,
    Formatter,
    fix_malloc_threshold,
    log,
    raise_fd_limit,
    setup_logging,
    setup_logging_for,
    usage_error,
)

__all__ = ["TRACE", "build_parser", "main", "setup_logging", "until_signal", "usage_error"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trisocks",
        formatter_class=Formatter,
        description="SOCKS5 over WebSocket, wire-compatible with LinkSocks and pywssocks.",
        epilog="Run 'trisocks COMMAND --help' for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=tools.version_line(),
                        help="print the version and which hot path runs, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    server.add_parser(sub)
    client.add_parsers(sub)
    tools.add_parsers(sub)
    return parser


COMMANDS = {"server": server.cmd_server, "client": client.cmd_client, "provider": client.cmd_client,
            "connector": client.cmd_client, "version": tools.cmd_version, "hash-key": tools.cmd_hash_key,
            "health": tools.cmd_health, "check-config": server.cmd_check_config, "backup": tools.cmd_backup}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(argv if argv is not None else sys.argv[1:])  # --config: what wins over it
    if args.command is None:
        parser.print_help()
        return 2
    for error in ENV_ERRORS.get(f"{parser.prog} {args.command}", []):
        usage_error(error)
    setup_logging_for(args)
    for warning in ENV_WARNINGS.get(f"{parser.prog} {args.command}", []):
        logging.getLogger("trisocks").warning("%s", warning)
    raise_fd_limit()
    fix_malloc_threshold()
    try:
        return COMMANDS[args.command](args)
    except BaseException as raised:
        exc = _leaf(raised)
        if isinstance(exc, KeyboardInterrupt):
            log.info("stopped")
            return 130
        if isinstance(exc, (AuthError, TunnelError)):
            log.error("%s", exc)
            return 1
        if isinstance(exc, OSError):
            log.error("%s", exc.strerror or exc)
            return 1
        raise


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside nested exception groups (Trio nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            leaf = _leaf(inner)
            if not isinstance(leaf, trio.Cancelled):
                return leaf
    return exc
