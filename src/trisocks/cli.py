"""Command line: ``trisocks server|client|version``, with LinkSocks's flags and defaults.

Every flag can also come from a ``TRISOCKS_*`` environment variable (named in
``--help``); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from . import IMPLEMENTATION, __version__
from .errors import AuthError, TunnelError

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

log = logging.getLogger("trisocks")


# -- environment-backed arguments -------------------------------------------------


def _env(name: str):
    return os.environ.get("TRISOCKS_" + name)


def _env_bool(name: str) -> bool:
    value = _env(name)
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _add(parser, *flags, env: str, help: str, default=None, type=str, **kw):
    """An option whose default comes from TRISOCKS_<env>, documented in its help."""
    raw = _env(env)
    if raw is not None and type is not None:
        try:
            default = type(raw)
        except ValueError:
            parser.error(f"TRISOCKS_{env}={raw!r} is not a valid value for {flags[-1]}")
    shown = "" if default in (None, "", False) else f" (default: {default})"
    parser.add_argument(*flags, default=default, type=type, help=f"{help}{shown} [env TRISOCKS_{env}]", **kw)


def _add_flag(parser, *flags, env: str, help: str):
    parser.add_argument(*flags, action="store_true", default=_env_bool(env),
                        help=f"{help} [env TRISOCKS_{env}=1]")


def _add_debug(parser):
    try:
        default = int(_env("DEBUG") or 0)
    except ValueError:
        default = 1
    parser.add_argument("-d", "--debug", action="count", default=default,
                        help="more logging: -d for debug, -dd for every message [env TRISOCKS_DEBUG=1|2]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trisocks",
        formatter_class=_Formatter,
        description="SOCKS5 over WebSocket, wire-compatible with LinkSocks and pywssocks.",
        epilog="Run 'trisocks COMMAND --help' for the flags of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("server", formatter_class=_Formatter, help="run the tunnel server",
                       description="Run the WebSocket server. Forward clients authenticate with a "
                       "token and the server opens their connections.")
    _add(s, "-H", "--ws-host", env="WS_HOST", default="0.0.0.0", help="address to listen on")
    _add(s, "-P", "--ws-port", env="WS_PORT", default=8765, type=int, help="port to listen on")
    s.add_argument("-t", "--token", action="append", metavar="TOKEN",
                   default=[t for t in (_env("TOKEN") or "").split(",") if t],
                   help="forward token clients must present; repeat for several. One is generated "
                   "and printed when none is given [env TRISOCKS_TOKEN, comma-separated]")
    _add(s, "--connect-timeout", env="CONNECT_TIMEOUT", default=10.0, type=float,
         help="seconds to reach a target before the client is told it failed")
    _add_debug(s)

    c = sub.add_parser("client", formatter_class=_Formatter, help="run a client with a local SOCKS5 port",
                       description="Connect to a trisocks (or LinkSocks) server and offer a local "
                       "SOCKS5 proxy whose connections leave from the server.")
    _add(c, "-t", "--token", env="TOKEN", default="anonymous", help="token to authenticate with")
    _add(c, "-u", "--url", env="URL", default="ws://localhost:8765",
         help="WebSocket server URL (ws:// or http://; the path defaults to /socket)")
    _add(c, "-s", "--socks-host", env="SOCKS_HOST", default="127.0.0.1", help="SOCKS5 listen address")
    _add(c, "-p", "--socks-port", env="SOCKS_PORT", default=9870, type=int, help="SOCKS5 listen port")
    _add(c, "-n", "--socks-username", env="SOCKS_USERNAME", default="",
         help="require this SOCKS5 username (with -w)")
    _add(c, "-w", "--socks-password", env="SOCKS_PASSWORD", default="",
         help="require this SOCKS5 password (with -n)")
    _add_flag(c, "-i", "--socks-no-wait", env="SOCKS_NO_WAIT",
              help="open the SOCKS5 port at once instead of after connecting to the server")
    _add_flag(c, "-R", "--no-reconnect", env="NO_RECONNECT",
              help="exit when the connection to the server is lost instead of reconnecting")
    _add(c, "-T", "--threads", env="THREADS", default=1, type=int,
         help="WebSocket connections to keep; new channels are spread over them")
    _add_debug(c)

    sub.add_parser("version", help="print the version and which hot path runs")
    return parser


def setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel({0: logging.INFO, 1: logging.DEBUG}.get(level, TRACE))


# -- commands -------------------------------------------------------------------------


def cmd_version(args) -> int:
    print(f"trisocks {__version__} ({IMPLEMENTATION} hot path)")
    return 0


def cmd_server(args) -> int:
    from .server import Server, ServerConfig
    from .tokens import TokenTable, generate, redact

    tokens = TokenTable()
    given = args.token or []
    if not given:
        token = generate()
        given = [token]
        print(f"No token given; generated forward token: {token}", flush=True)
    for token in given:
        try:
            tokens.add_forward(token)
        except ValueError as exc:
            raise SystemExit(f"error: token {redact(token)}: {exc}") from None
    config = ServerConfig(ws_host=args.ws_host, ws_port=args.ws_port,
                          connect_timeout=args.connect_timeout)
    server = Server(config, tokens)
    log.info("%d forward token(s) configured", len(tokens))
    trio.run(server.serve)
    return 0


def cmd_client(args) -> int:
    from .client import Client, ClientConfig

    if bool(args.socks_username) != bool(args.socks_password):
        raise SystemExit("error: -n/--socks-username and -w/--socks-password go together")
    if args.threads < 1:
        raise SystemExit("error: -T/--threads must be at least 1")
    config = ClientConfig(
        url=args.url, token=args.token, socks_host=args.socks_host, socks_port=args.socks_port,
        socks_username=args.socks_username, socks_password=args.socks_password,
        socks_wait_server=not args.socks_no_wait, reconnect=not args.no_reconnect,
        threads=args.threads,
    )
    try:
        client = Client(config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    log.info("trisocks %s client connecting to %s", __version__, client.endpoint.display)
    trio.run(client.run)
    return 0


COMMANDS = {"server": cmd_server, "client": cmd_client, "version": cmd_version}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(getattr(args, "debug", 0))
    try:
        return COMMANDS[args.command](args)
    except BaseException as raised:  # noqa: BLE001 - unwrapped and re-raised below
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


if __name__ == "__main__":
    sys.exit(main())
