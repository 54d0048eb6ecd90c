"""Command line: ``trisocks server|client|provider|connector|hash-key|version``, with LinkSocks's flags
and defaults.

Every flag can also come from a ``TRISOCKS_*`` environment variable (named in
``--help``); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from . import IMPLEMENTATION, __version__
from .wire.errors import AuthError, TunnelError

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


_ENV_ERRORS: dict[str, list[str]] = {}  # parser prog -> bad TRISOCKS_* values


def usage_error(message: str):
    """A configuration mistake: say what is wrong and exit with status 2, like argparse."""
    print(f"trisocks: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _add(parser, *flags, env: str, help: str, default=None, type=str, **kw):
    """An option whose default comes from TRISOCKS_<env>, documented in its help."""
    raw = _env(env)
    if raw is not None and type is not None:
        try:
            default = type(raw)
        except ValueError:
            # reported only if this command runs: a bad variable for one command must not
            # break the others
            _ENV_ERRORS.setdefault(parser.prog, []).append(
                f"TRISOCKS_{env}={raw!r} is not a valid value for {flags[-1]}")
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


def _add_list(parser, *flags, env: str, help: str, metavar: str):
    parser.add_argument(*flags, action="append", metavar=metavar,
                        default=[t for t in (_env(env) or "").split(",") if t],
                        help=f"{help} [env TRISOCKS_{env}, comma-separated]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trisocks",
        formatter_class=_Formatter,
        description="SOCKS5 over WebSocket, wire-compatible with LinkSocks and pywssocks.",
        epilog="Run 'trisocks COMMAND --help' for the flags of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "server", formatter_class=_Formatter, help="run the tunnel server",
        description="Run the WebSocket server.\n\n"
        "forward mode (default): clients authenticate with a token (-t) and the server opens\n"
        "  their connections.\n"
        "reverse mode (-r): providers authenticate with the token and the server offers a\n"
        "  SOCKS5 port (-s/-p) whose connections leave through them; connector tokens (-c)\n"
        "  let connector clients use the same providers, and with -a providers create their\n"
        "  own connector tokens.")
    _add(s, "-H", "--ws-host", env="WS_HOST", default="0.0.0.0", help="address to listen on")
    _add(s, "-P", "--ws-port", env="WS_PORT", default=8765, type=int, help="port to listen on")
    _add_list(s, "-t", "--token", env="TOKEN", metavar="TOKEN",
              help="token clients must present (forward, or reverse with -r); repeat for several. "
              "One is generated and printed when none is given")
    _add_flag(s, "-r", "--reverse", env="REVERSE",
              help="reverse mode: -t tokens are for providers, and each gets a SOCKS5 port")
    _add(s, "-s", "--socks-host", env="SOCKS_HOST", default="127.0.0.1",
         help="reverse mode: SOCKS5 listen address")
    _add(s, "-p", "--socks-port", env="SOCKS_PORT", default=9870, type=int,
         help="reverse mode: SOCKS5 port of the first token (0: any free port); further tokens "
         "get free ports, reported at start")
    _add(s, "-n", "--socks-username", env="SOCKS_USERNAME", default="",
         help="reverse mode: SOCKS5 username clients must give (with -w)")
    _add(s, "-w", "--socks-password", env="SOCKS_PASSWORD", default="",
         help="reverse mode: SOCKS5 password clients must give (with -n)")
    _add_flag(s, "-i", "--socks-nowait", "--socks-no-wait", env="SOCKS_NOWAIT",
              help="reverse mode: open the SOCKS5 port at once, not when the first provider connects")
    _add_list(s, "-c", "--connector-token", env="CONNECTOR_TOKEN", metavar="TOKEN",
              help="reverse mode: a connector token for the (first) reverse token; connector "
              "clients using it reach its providers. Repeat for several")
    _add_flag(s, "-a", "--connector-autonomy", env="CONNECTOR_AUTONOMY",
              help="reverse mode: providers may add and remove their own connector tokens, which "
              "reach only them")
    _add_flag(s, "-f", "--fast-open", env="FAST_OPEN",
              help="reverse mode: answer SOCKS5 clients at once and send their data before the "
              "provider has connected (see docs/fast-open.md)")
    _add(s, "--connect-timeout", env="CONNECT_TIMEOUT", default=10.0, type=float,
         help="forward mode: seconds to reach a target before the client is told it failed")
    _add(s, "-x", "--upstream-proxy", env="UPSTREAM_PROXY", default="",
         help="open every target connection through this proxy: socks5://[user:pass@]host:port "
         "or http://[user:pass@]host:port (HTTP CONNECT)")
    _add(s, "--tls-cert", env="TLS_CERT", default="",
         help="PEM certificate (chain) file: serve wss:// and https:// on the WebSocket port")
    _add(s, "--tls-key", env="TLS_KEY", default="",
         help="PEM private key file for --tls-cert (if not inside the certificate file)")
    _add_list(s, "--trusted-proxy", env="TRUSTED_PROXY", metavar="CIDR",
              help="a reverse proxy in front of the server (address or CIDR, repeatable): for "
              "connections from it the client's address is the rightmost X-Forwarded-For entry "
              "that is not a trusted proxy, for auth throttling, connection limits and logs")
    _add(s, "--max-unauthenticated", env="MAX_UNAUTHENTICATED", default=1024, type=int,
         help="connections that have not authenticated yet, in all; more get HTTP 503")
    _add(s, "--max-unauthenticated-per-address", env="MAX_UNAUTHENTICATED_PER_ADDRESS",
         default=64, type=int,
         help="connections not authenticated yet per client address (IPv6: per /64); more get 503")
    _add(s, "--max-sessions-per-token", env="MAX_SESSIONS_PER_TOKEN", default=64, type=int,
         help="concurrent WebSocket sessions of one token or user key; more are refused at Auth")
    m = s.add_argument_group(
        "management API and state (docs/api.md)",
        "With -k the REST API (tokens, users with quotas, stats, events, /healthz, /metrics)\n"
        "answers on the WebSocket port. With -k or --db, tokens created through the API,\n"
        "users and traffic counters are kept in a SQLite database and restored at start.")
    # not _add(): its help would show the key taken from the environment as the default
    m.add_argument("-k", "--api-key", default=_env("API_KEY") or "", metavar="KEY",
                   help="turn the management API on with this key (plaintext, or a hash: "
                   "sha256:HEX, scrypt:..., pbkdf2:..., bcrypt $2b$... - see "
                   "'trisocks hash-key')."
                   " Prefer the environment variable: a command line is visible to every local "
                   "user [env TRISOCKS_API_KEY]")
    _add(m, "--api-bind", env="API_BIND", default="",
         help="serve the API on its own listener HOST:PORT instead of the WebSocket port")
    _add_flag(m, "--api-allow-remote", env="API_ALLOW_REMOTE",
              help="let non-loopback addresses use the API (with the key); off: they get 403")
    _add(m, "--db", env="DB", default="",
         help="SQLite database for tokens, users and counters (default with -k: "
         "$XDG_STATE_HOME/trisocks/trisocks.db, else ~/.local/state/trisocks/trisocks.db)")
    _add(m, "--public-url", env="PUBLIC_URL", default="",
         help="the WebSocket URL clients use to reach this server (ws[s]://host[:port]), for "
         "/api/subscribe; default: what the request came to")
    _add_debug(s)

    for name, help_line, description in (
        ("client", "run a client: a local SOCKS5 port, or a provider with -r",
         "Connect to a trisocks (or LinkSocks) server.\n\n"
         "forward client: a local SOCKS5 port (-s/-p) whose connections leave from the server.\n"
         "connector: the same, with a connector token: connections leave through the providers\n"
         "  of the reverse token behind it.\n"
         "provider (-r): no local port; the server's SOCKS5 clients connect out from here."),
        ("provider", "run a provider (same as 'client -r')",
         "Connect to a reverse-mode server with a reverse token and open the connections its\n"
         "SOCKS5 clients ask for from this machine. With -c, also register a connector token\n"
         "(the server must run with -a)."),
        ("connector", "run a connector client (same as 'client')",
         "Connect with a connector token and offer a local SOCKS5 port whose connections leave\n"
         "through the providers of the reverse token behind it."),
    ):
        c = sub.add_parser(name, formatter_class=_Formatter, help=help_line, description=description)
        _add(c, "-t", "--token", env="TOKEN", default="anonymous",
             help="token to authenticate with (forward, reverse or connector token)")
        _add(c, "-u", "--url", env="URL", default="ws://localhost:8765",
             help="WebSocket server URL (ws:// or http://; the path defaults to /socket). A "
             "token in it (?token=T) wins over -t and is sent hashed, as LinkSocks clients do")
        if name == "client":
            _add(c, "--subscribe", env="SUBSCRIBE", default="",
                 help="take the server URL and token from a subscription: the URL of a "
                 "server's /api/subscribe/KEY, or a trisocks://KEY@HOST:PORT share link")
        if name == "client":
            _add_flag(c, "-r", "--reverse", env="REVERSE",
                      help="be a provider: open connections for the server's SOCKS5 clients")
        if name != "connector":
            _add(c, "-c", "--connector-token", env="CONNECTOR_TOKEN", default="",
                 help="provider: register this connector token with the server (autonomy mode, "
                 "server -a); connector clients using it reach only this provider")
        if name != "provider":
            _add(c, "-s", "--socks-host", env="SOCKS_HOST", default="127.0.0.1",
                 help="SOCKS5 listen address")
            _add(c, "-p", "--socks-port", env="SOCKS_PORT", default=9870, type=int,
                 help="SOCKS5 listen port (0: any free port)")
            _add(c, "-n", "--socks-username", env="SOCKS_USERNAME", default="",
                 help="require this SOCKS5 username (with -w)")
            _add(c, "-w", "--socks-password", env="SOCKS_PASSWORD", default="",
                 help="require this SOCKS5 password (with -n)")
            _add_flag(c, "-i", "--socks-no-wait", "--socks-nowait", env="SOCKS_NO_WAIT",
                      help="open the SOCKS5 port at once instead of after connecting to the server")
            _add_flag(c, "-f", "--fast-open", env="FAST_OPEN",
                      help="answer SOCKS5 clients at once and send their first bytes with the "
                      "connect request; a failure then closes the connection (see docs/fast-open.md)")
        _add_flag(c, "-R", "--no-reconnect", env="NO_RECONNECT",
                  help="exit when the connection to the server is lost instead of reconnecting")
        _add(c, "-T", "--threads", env="THREADS", default=1, type=int,
             help="WebSocket connections to keep; new channels are spread over them")
        _add(c, "-x", "--upstream-proxy", env="UPSTREAM_PROXY", default="",
             help="reach the server through this proxy: socks5://[user:pass@]host:port or "
             "http://[user:pass@]host:port (HTTP CONNECT)")
        _add_flag(c, "-E", "--no-env-proxy", env="NO_ENV_PROXY",
                  help="ignore HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY for the server connection")
        _add(c, "--ca-file", env="CA_FILE", default="",
             help="wss://: trust the CA certificates in this PEM file instead of the system's")
        _add_flag(c, "--insecure", env="INSECURE",
                  help="wss://: do not check the server's certificate (a warning is logged)")
        _add_debug(c)

    h = sub.add_parser(
        "hash-key", formatter_class=_Formatter, help="print the hashed form of a management API key",
        description="Print the hashed form of a management API key, to configure with -k/--api-key "
        "or TRISOCKS_API_KEY so that the plaintext need not sit in a config file. The key is read "
        "from standard input (one line; prompted for on a terminal); with --generate a new random "
        "key is made and printed first.")
    h.add_argument("--scheme", choices=("scrypt", "pbkdf2", "sha256", "bcrypt"), default="scrypt",
                   help="the hash: scrypt and bcrypt are slow on purpose (a guessed key costs time), "
                   "sha256 is not and suits only long random keys")
    h.add_argument("--generate", action="store_true", help="make up a new random key and print it too")

    sub.add_parser("version", help="print the version and which hot path runs")
    return parser


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


def _credentials_pair(args) -> None:
    if bool(getattr(args, "socks_username", "")) != bool(getattr(args, "socks_password", "")):
        usage_error("-n/--socks-username and -w/--socks-password go together")


def _management(args):
    """The management plane when -k or --db asks for it (None otherwise)."""
    if not (args.api_key or args.db):
        if args.api_bind or args.api_allow_remote:
            usage_error("--api-bind and --api-allow-remote need -k/--api-key")
        return None
    from .management import ApiKey, Management, SQLiteStore, default_path
    from .management.serving import parse_bind

    try:
        key = ApiKey(args.api_key) if args.api_key else None
        bind = parse_bind(args.api_bind) if args.api_bind else None
    except ValueError as exc:
        usage_error(f"{exc}")
    if key is None and (bind or args.api_allow_remote):
        usage_error("--api-bind and --api-allow-remote need -k/--api-key")
    if args.public_url and not args.public_url.startswith(("ws://", "wss://")):
        usage_error("--public-url must start with ws:// or wss://")
    if key is not None and key.plaintext_configured and len(args.api_key) < 16:
        log.warning("the API key is short (%d characters); use 16 or more, or a random one",
                    len(args.api_key))
    return Management(SQLiteStore(args.db or default_path()), api_key=key,
                      allow_remote=args.api_allow_remote, api_bind=bind,
                      public_url=args.public_url, handle_signals=True)


def cmd_server(args) -> int:
    from .tunnel.server import Server, ServerConfig
    from .tunnel.tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable, generate, redact

    _credentials_pair(args)
    if not args.reverse and (args.connector_token or args.connector_autonomy):
        usage_error("-c/--connector-token and -a/--connector-autonomy need -r/--reverse")
    management = _management(args)
    if not args.reverse and management is None:
        stray = [flag for flag, value, default in (
            ("-s", args.socks_host, "127.0.0.1"), ("-p", args.socks_port, 9870),
            ("-n/-w", args.socks_username, ""), ("-i", args.socks_nowait, False),
            ("-f", args.fast_open, False)) if value != default]
        if stray:
            log.warning("%s only apply to reverse tokens (-r, or the API): ignored",
                        ", ".join(stray))
    tokens = management.tokens if management is not None else TokenTable()
    given = args.token or []
    kind = "reverse" if args.reverse else "forward"
    if not given and management is not None and management.api_key is not None:
        # tokens and users come from the API (and the database)
        if args.connector_token:
            usage_error("-c/--connector-token needs a -t reverse token")
    elif not given:
        token = generate()
        given = [token]
        print(f"No token given; generated {kind} token: {token}", flush=True)
    try:
        for i, token in enumerate(given):
            if args.reverse:
                tokens.add(TokenInfo(token, REVERSE, port=args.socks_port if i == 0 else 0,
                                     username=args.socks_username, password=args.socks_password,
                                     allow_manage_connector=args.connector_autonomy))
            else:
                tokens.add_forward(token)
        for token in args.connector_token:
            tokens.add(TokenInfo(token, CONNECTOR, reverse_token=given[0]))
    except ValueError as exc:
        usage_error(f"{exc}")
    if args.tls_key and not args.tls_cert:
        usage_error("--tls-key needs --tls-cert")
    from .net.upstream import parse_proxy
    from .tunnel.egress import direct_dialer, proxy_dialer

    dialer = direct_dialer
    if args.upstream_proxy:
        try:
            proxy = parse_proxy(args.upstream_proxy)
        except ValueError as exc:
            usage_error(f"{exc}")
        dialer = proxy_dialer(proxy)
        log.info("target connections go through %s", proxy.display)
    config = ServerConfig(ws_host=args.ws_host, ws_port=args.ws_port,
                          connect_timeout=args.connect_timeout, socks_host=args.socks_host,
                          socks_nowait=args.socks_nowait, fast_open=args.fast_open,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, dialer=dialer,
                          trusted_proxies=tuple(args.trusted_proxy),
                          max_unauthenticated=args.max_unauthenticated,
                          max_unauthenticated_per_source=args.max_unauthenticated_per_address,
                          max_sessions_per_token=args.max_sessions_per_token)
    try:
        server = (management.create_server(config) if management is not None
                  else Server(config, tokens))
    except ValueError as exc:
        usage_error(f"{exc}")
    log.info("%d %s token(s)%s configured", len(given), kind,
             f" and {len(args.connector_token)} connector token(s)" if args.connector_token else "")
    for token in given:
        log.debug("token %s", redact(token))
    if management is None:
        trio.run(server.serve)
        return 0
    from .management import StoreError

    try:
        trio.run(management.run)
    except StoreError as exc:
        log.error("database: %s", exc)
        return 1
    return 0


def cmd_client(args) -> int:
    from .tunnel.client import Client, ClientConfig

    _credentials_pair(args)
    if args.threads < 1:
        usage_error("-T/--threads must be at least 1")
    reverse = args.command == "provider" or getattr(args, "reverse", False)
    if getattr(args, "subscribe", ""):
        from .management.subscription import fetch

        if reverse:
            usage_error("--subscribe is for forward clients")
        try:
            sub = fetch(args.subscribe, ca_file=args.ca_file, insecure=args.insecure)
        except ValueError as exc:
            usage_error(f"--subscribe: {exc}")
        args.url, args.token = sub.server, sub.token
        if args.socks_port == 9870 and _env("SOCKS_PORT") is None and sub.socks_port:
            args.socks_port = sub.socks_port
    if getattr(args, "connector_token", "") and not reverse:
        usage_error("-c/--connector-token is for providers (client -r, or 'provider')")
    config = ClientConfig(
        url=args.url, token=args.token, reverse=reverse,
        connector_token=getattr(args, "connector_token", ""),
        socks_host=getattr(args, "socks_host", "127.0.0.1"),
        socks_port=getattr(args, "socks_port", 9870),
        socks_username=getattr(args, "socks_username", ""),
        socks_password=getattr(args, "socks_password", ""),
        socks_wait_server=not getattr(args, "socks_no_wait", False),
        fast_open=getattr(args, "fast_open", False),
        reconnect=not args.no_reconnect, threads=args.threads,
        ca_file=args.ca_file, insecure=args.insecure,
        upstream_proxy=args.upstream_proxy, env_proxy=not args.no_env_proxy,
    )
    try:
        client = Client(config)
    except ValueError as exc:
        usage_error(f"{exc}")
    log.info("trisocks %s %s connecting to %s", __version__, "provider" if reverse else "client",
             client.endpoint.display)
    stopped_by = trio.run(until_signal, client.run)
    return 130 if stopped_by == signal.SIGINT else 0


async def until_signal(run) -> int | None:
    """Run ``run()`` until it returns or SIGTERM/SIGINT comes; then cancel it, which closes
    every WebSocket with a close frame (1001) so the server drops us at once (a provider
    leaves its pool now, not after a ping timeout). Returns the signal, if one came."""
    stopped_by = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def main() -> None:
                await run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            async for signum in signals:
                stopped_by = signum
                log.info("stopping (%s): closing the connections to the server",
                         signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return stopped_by


def cmd_hash_key(args) -> int:
    from .management.keys import hash_key_command

    return hash_key_command(args.scheme, args.generate)


COMMANDS = {"server": cmd_server, "client": cmd_client, "provider": cmd_client,
            "connector": cmd_client, "version": cmd_version, "hash-key": cmd_hash_key}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    for error in _ENV_ERRORS.get(f"{parser.prog} {args.command}", []):
        usage_error(error)
    setup_logging(getattr(args, "debug", 0))
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


if __name__ == "__main__":
    sys.exit(main())
