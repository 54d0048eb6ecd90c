"""``trisocks client``, ``provider`` and ``connector``: their flags, and the client they run
until it ends or a signal stops it."""

from __future__ import annotations

import signal

import trio

from .. import __version__
from .common import (
    Formatter,
    add_debug,
    add_flag,
    add_option,
    credentials_pair,
    from_env,
    log,
    one_secret,
    usage_error,
    warn_secret_on_argv,
)

# After a refusal the server may lift (quota, expiry, disabled, device or client limit):
# wait 30 s, doubling up to 5 min, each wait ±20 % so that many clients do not come back
# at the same moment. Long enough not to fill a log or load the server, short enough that
# a renewal brings the customer back within minutes.
REFUSED_BACKOFF = (30.0, 300.0)

REFUSALS_NOTE = (
    "\n\nrefused: a refusal the operator can lift (traffic limit reached, expired, disabled,\n"
    "  a device or client limit) is logged with the server's reason and retried after 30 s,\n"
    "  doubling up to 5 min (each wait ±20 %); a token the server does not know ends the\n"
    "  command (status 1).")


def add_parsers(sub) -> None:
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
        c = sub.add_parser(name, formatter_class=Formatter, help=help_line,
                           description=description + REFUSALS_NOTE)
        add_option(c, "-t", "--token", env="TOKEN", default="anonymous", track=True,
             help="token to authenticate with (forward, reverse or connector token). Prefer "
             "--token-file or the environment: a command line is visible to every local user")
        add_option(c, "--token-file", env="TOKEN_FILE", default="", track=True, metavar="FILE",
             help="read the token from FILE (one line; trailing whitespace is ignored)")
        add_option(c, "-u", "--url", env="URL", default="ws://localhost:8765",
             help="WebSocket server URL (ws:// or http://; the path defaults to /socket). A "
             "token in it (?token=T) wins over -t and is sent hashed, as LinkSocks clients do")
        if name == "client":
            add_option(c, "--subscribe", env="SUBSCRIBE", default="",
                 help="take the server URL and token from a subscription: the URL of a "
                 "server's /api/subscribe/KEY, or a trisocks://KEY@HOST:PORT share link")
        if name == "client":
            add_flag(c, "-r", "--reverse", env="REVERSE",
                      help="be a provider: open connections for the server's SOCKS5 clients")
        if name != "connector":
            add_option(c, "-c", "--connector-token", env="CONNECTOR_TOKEN", default="",
                 help="provider: register this connector token with the server (autonomy mode, "
                 "server -a); connector clients using it reach only this provider")
        if name != "provider":
            add_option(c, "-s", "--socks-host", env="SOCKS_HOST", default="127.0.0.1",
                 help="SOCKS5 listen address")
            add_option(c, "-p", "--socks-port", env="SOCKS_PORT", default=9870, type=int,
                 help="SOCKS5 listen port (0: any free port)")
            add_option(c, "-n", "--socks-username", env="SOCKS_USERNAME", default="",
                 help="require this SOCKS5 username (with -w)")
            add_option(c, "-w", "--socks-password", env="SOCKS_PASSWORD", default="", track=True,
                 help="require this SOCKS5 password (with -n)")
            add_option(c, "--socks-password-file", env="SOCKS_PASSWORD_FILE", default="",
                 track=True, metavar="FILE", help="read the SOCKS5 password (-w) from FILE")
            add_flag(c, "-i", "--socks-no-wait", "--socks-nowait", env="SOCKS_NO_WAIT",
                      help="open the SOCKS5 port at once instead of after connecting to the server")
            add_flag(c, "-f", "--fast-open", env="FAST_OPEN",
                      help="answer SOCKS5 clients at once and send their first bytes with the "
                      "connect request; a failure then closes the connection (see docs/fast-open.md)")
        add_flag(c, "-R", "--no-reconnect", env="NO_RECONNECT",
                  help="exit when the connection to the server is lost instead of reconnecting")
        add_option(c, "-T", "--threads", env="THREADS", default=1, type=int,
             help="WebSocket connections to keep; new channels are spread over them")
        add_option(c, "-x", "--upstream-proxy", env="UPSTREAM_PROXY", default="",
             help="reach the server through this proxy: socks5://[user:pass@]host:port or "
             "http://[user:pass@]host:port (HTTP CONNECT)")
        add_flag(c, "-E", "--no-env-proxy", env="NO_ENV_PROXY",
                  help="ignore HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY for the server connection")
        add_option(c, "--ca-file", env="CA_FILE", default="",
             help="wss://: trust the CA certificates in this PEM file instead of the system's")
        add_flag(c, "--insecure", env="INSECURE",
                  help="wss://: do not check the server's certificate (a warning is logged)")
        add_debug(c)



def _socks_password(args) -> None:
    """-w from --socks-password-file (or its variable), and a warning when it is on argv."""
    if not hasattr(args, "socks_password_file"):
        return  # a provider has no SOCKS5 port
    password = one_secret(args, "socks_password", "socks_password_file", "-w/--socks-password",
                          "--socks-password-file", "SOCKS_PASSWORD")
    if password is not None:
        args.socks_password = password
    else:
        warn_secret_on_argv(args, "socks_password", "--socks-password-file",
                            "TRISOCKS_SOCKS_PASSWORD")


def _token(args) -> str:
    """The token, from -t, --token-file or their environment variables."""
    from_file = one_secret(args, "token", "token_file", "-t/--token", "--token-file", "TOKEN")
    if from_file is not None:
        return from_file
    warn_secret_on_argv(args, "token", "--token-file", "TRISOCKS_TOKEN")
    return args.token


def _refused_backoff() -> tuple[float, float]:
    """REFUSED_BACKOFF, unless TRISOCKS_TEST_REFUSED_BACKOFF (seconds) shortens it.

    That variable is for tests only and undocumented on purpose: a test of a refused client
    coming back (tests/test_operators.py) cannot wait 30 s for each retry."""
    raw = from_env("TEST_REFUSED_BACKOFF")
    if raw is None:
        return REFUSED_BACKOFF
    try:
        first = float(raw)
    except ValueError:
        usage_error(f"TRISOCKS_TEST_REFUSED_BACKOFF={raw!r} is not a number of seconds")
    return first, first * 2


def cmd_client(args) -> int:
    from ..tunnel.client import Client, ClientConfig

    args.token = _token(args)
    _socks_password(args)
    credentials_pair(args)
    if args.threads < 1:
        usage_error("-T/--threads must be at least 1")
    reverse = args.command == "provider" or getattr(args, "reverse", False)
    if getattr(args, "subscribe", ""):
        from ..tunnel.subscription import fetch

        if reverse:
            usage_error("--subscribe is for forward clients")
        try:
            sub = fetch(args.subscribe, ca_file=args.ca_file, insecure=args.insecure)
        except ValueError as exc:
            usage_error(f"--subscribe: {exc}")
        args.url, args.token = sub.server, sub.token
        if args.socks_port == 9870 and from_env("SOCKS_PORT") is None and sub.socks_port:
            args.socks_port = sub.socks_port
    if getattr(args, "connector_token", "") and not reverse:
        usage_error("-c/--connector-token is for providers (client -r, or 'provider')")
    refused_backoff = _refused_backoff()
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
        retry_refused=True, refused_backoff_initial=refused_backoff[0],
        refused_backoff_max=refused_backoff[1],
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
