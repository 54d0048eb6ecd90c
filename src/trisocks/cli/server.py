"""``trisocks server``: its flags, and what they start (a tunnel server, with the management
plane when -k or --db asks for it)."""

from __future__ import annotations

import os
import sys
from functools import partial

import trio

from .common import (
    Formatter,
    OnArgv,
    add_access_log,
    add_debug,
    add_flag,
    add_list,
    add_option,
    add_rules,
    credentials_pair,
    from_env,
    log,
    one_secret,
    open_access_log,
    read_secret_file,
    setup_logging_for,
    usage_error,
    warn_secret_on_argv,
)
from .workers import SECRET_ENV, worker_id


def add_parser(sub) -> None:
    s = sub.add_parser(
        "server", formatter_class=Formatter, help="run the tunnel server",
        description="Run the WebSocket server.\n\n"
        "forward mode (default): clients authenticate with a token (-t) and the server opens\n"
        "  their connections.\n"
        "reverse mode (-r): providers authenticate with the token and the server offers a\n"
        "  SOCKS5 port (-s/-p) whose connections leave through them; connector tokens (-c)\n"
        "  let connector clients use the same providers, and with -a providers create their\n"
        "  own connector tokens.")
    add_option(s, "-H", "--ws-host", env="WS_HOST", default="0.0.0.0", help="address to listen on")
    add_option(s, "-P", "--ws-port", env="WS_PORT", default=8765, type=int, help="port to listen on")
    add_list(s, "-t", "--token", env="TOKEN", metavar="TOKEN", track=True,
              help="token clients must present (forward, or reverse with -r); repeat for several. "
              "One is generated and printed when none is given. Prefer --token-file or the "
              "environment: a command line is visible to every local user")
    add_option(s, "--token-file", env="TOKEN_FILE", default="", track=True, metavar="FILE",
         help="read tokens from FILE, one a line (trailing whitespace ignored), in addition "
         "to any -t")
    add_flag(s, "-r", "--reverse", env="REVERSE",
              help="reverse mode: -t tokens are for providers, and each gets a SOCKS5 port")
    add_option(s, "-s", "--socks-host", env="SOCKS_HOST", default="127.0.0.1",
         help="reverse mode: SOCKS5 listen address")
    add_option(s, "-p", "--socks-port", env="SOCKS_PORT", default=9870, type=int,
         help="reverse mode: SOCKS5 port of the first token (0: any free port); further tokens "
         "get free ports, reported at start")
    add_option(s, "-n", "--socks-username", env="SOCKS_USERNAME", default="",
         help="reverse mode: SOCKS5 username clients must give (with -w)")
    add_option(s, "-w", "--socks-password", env="SOCKS_PASSWORD", default="", track=True,
         help="reverse mode: SOCKS5 password clients must give (with -n)")
    add_option(s, "--socks-password-file", env="SOCKS_PASSWORD_FILE", default="", track=True,
         metavar="FILE", help="reverse mode: read the SOCKS5 password (-w) from FILE")
    add_flag(s, "-i", "--socks-nowait", "--socks-no-wait", env="SOCKS_NO_WAIT", old_env="SOCKS_NOWAIT",
              help="reverse mode: open the SOCKS5 port at once, not when the first provider connects")
    add_option(s, "--connector-token-file", env="CONNECTOR_TOKEN_FILE", default="", metavar="FILE",
         help="reverse mode: read connector tokens (-c) from FILE, one a line")
    add_list(s, "-c", "--connector-token", env="CONNECTOR_TOKEN", metavar="TOKEN", track=True,
              help="reverse mode: a connector token for the (first) reverse token; connector "
              "clients using it reach its providers. Repeat for several")
    add_flag(s, "-a", "--connector-autonomy", env="CONNECTOR_AUTONOMY",
              help="reverse mode: providers may add and remove their own connector tokens, which "
              "reach only them")
    add_flag(s, "-f", "--fast-open", env="FAST_OPEN",
              help="reverse mode: answer SOCKS5 clients at once and send their data before the "
              "provider has connected (see docs/fast-open.md)")
    add_option(s, "--connect-timeout", env="CONNECT_TIMEOUT", default=10.0, type=float,
         help="forward mode: seconds to reach a target before the client is told it failed")
    add_option(s, "-x", "--upstream-proxy", env="UPSTREAM_PROXY", default="",
         help="open every target connection through this proxy: socks5://[user:pass@]host:port "
         "or http://[user:pass@]host:port (HTTP CONNECT)")
    add_option(s, "--tls-cert", env="TLS_CERT", default="",
         help="PEM certificate (chain) file: serve wss:// and https:// on the WebSocket port")
    add_option(s, "--tls-key", env="TLS_KEY", default="",
         help="PEM private key file for --tls-cert (if not inside the certificate file)")
    add_list(s, "--trusted-proxy", env="TRUSTED_PROXY", metavar="CIDR",
              help="a reverse proxy in front of the server (address or CIDR, repeatable): for "
              "connections from it the client's address is the rightmost X-Forwarded-For entry "
              "that is not a trusted proxy, for auth throttling, connection limits and logs")
    add_option(s, "--max-unauthenticated", env="MAX_UNAUTHENTICATED", default=1024, type=int,
         help="connections that have not authenticated yet, in all; more get HTTP 503")
    add_option(s, "--max-unauthenticated-per-address", env="MAX_UNAUTHENTICATED_PER_ADDRESS",
         default=64, type=int,
         help="connections not authenticated yet per client address (IPv6: per /64); more get 503")
    add_option(s, "--max-sessions-per-token", env="MAX_SESSIONS_PER_TOKEN", default=64, type=int,
         help="concurrent WebSocket sessions of one token or user key; more are refused at Auth")
    add_option(s, "--grace", env="GRACE", default=5.0, type=float, metavar="SECONDS",
         help="SIGTERM/SIGINT: every listener closes, then open channels get this long to finish "
         "before the rest is closed and the server exits 0; 0: at once. A second signal stops at "
         "once (docs/deploy.md)")
    p = s.add_argument_group(
        "destination rules (docs/policy.md)",
        "Where tunnel users may go. Checked after name resolution, first match wins: a\n"
        "user's or token's own rules (API), then these, then the defaults: users may not reach\n"
        "loopback, private, link-local (cloud metadata), multicast or unspecified addresses;\n"
        "tokens reach everything; nobody reaches this server's own listeners.")
    add_rules(p)
    m = s.add_argument_group(
        "management API and state (docs/api.md)",
        "With -k the REST API (tokens, users with quotas, stats, events, /healthz, /metrics)\n"
        "answers on the WebSocket port. With -k or --db, tokens created through the API,\n"
        "users and traffic counters are kept in a SQLite database and restored at start.")
    # not add_option(): its help would show the key taken from the environment as the default
    m.add_argument("-k", "--api-key", default=from_env("API_KEY") or "", metavar="KEY",
                   action=OnArgv,
                   help="turn the management API on with this key (plaintext, or a hash: "
                   "sha256:HEX, scrypt:..., pbkdf2:..., bcrypt $2b$... - see "
                   "'trisocks hash-key')."
                   " Prefer --api-key-file or the environment variable: a command line is "
                   "visible to every local user [env TRISOCKS_API_KEY]")
    add_option(m, "--api-key-file", env="API_KEY_FILE", default="", track=True, metavar="FILE",
         help="read the API key (-k) from FILE (one line; trailing whitespace ignored)")
    add_option(m, "--api-bind", env="API_BIND", default="",
         help="serve the API on its own listener HOST:PORT instead of the WebSocket port")
    add_flag(m, "--api-allow-remote", env="API_ALLOW_REMOTE",
              help="let non-loopback addresses use the API (with the key); off: they get 403")
    add_option(m, "--db", env="DB", default="",
         help="SQLite database for tokens, users and counters (default with -k: "
         "$XDG_STATE_HOME/trisocks/trisocks.db, else ~/.local/state/trisocks/trisocks.db)")
    add_option(m, "--metrics-per-owner", env="METRICS_PER_OWNER", default=0, type=int,
         help="/metrics: series of their own for up to N tokens and N users (the busiest); "
         "0: none, only totals (bounded cardinality, docs/api.md)")
    add_option(m, "--public-url", env="PUBLIC_URL", default="",
         help="the WebSocket URL clients use to reach this server (ws[s]://host[:port]), for "
         "/api/subscribe; default: what the request came to")
    add_option(m, "--usage-days", env="USAGE_DAYS", default=90, type=int, metavar="DAYS",
         help="keep the hourly usage history (GET /api/usage) this many days")
    add_option(m, "--reset-timezone", env="RESET_TIMEZONE", default="UTC", metavar="ZONE",
         help="the time zone of users' periodic traffic resets (an IANA name such as "
         "Europe/Berlin; docs/operations.md)")
    w = s.add_argument_group(
        "scale-out (docs/scale-out.md)",
        "Several processes on one host (--workers), or several hosts sharing their state in\n"
        "Redis (--store redis://...). Providers of a reverse token may be on any node: a\n"
        "SOCKS5 client or connector on another node reaches them over a node-to-node bridge.")
    add_option(w, "--workers", env="WORKERS", default="1", metavar="N",
         help="run N worker processes sharing the listening ports (SO_REUSEPORT), supervised: "
         "one that dies is restarted; 'auto': one per core. They share the store (the SQLite "
         "file, or --store)")
    add_option(w, "--store", env="STORE", default="", metavar="URL",
         help="where the management plane keeps its state: redis://[user:password@]host:port/db, "
         "rediss://... or unix:///path/redis.sock?db=N (shared by every node; needs the 'redis' "
         "extra); default: the SQLite file of --db")
    add_option(w, "--store-prefix", env="STORE_PREFIX", default="trisocks", metavar="PREFIX",
         help="prefix of every Redis key, so that several deployments can share one Redis")
    add_option(w, "--node-url", env="NODE_URL", default="", metavar="URL",
         help="where the other nodes reach this one's WebSocket port for bridged channels "
         "(ws[s]://host:port); with --store redis://, needed for reverse tokens whose providers "
         "may be on another node")
    add_option(w, "--cluster-secret-file", env="CLUSTER_SECRET_FILE", default="", metavar="FILE",
         help="a secret every node of the cluster shares (one line, 16 characters or more): "
         "authenticates node-to-node bridges and dashboard sessions; workers of one host make "
         "their own")
    add_option(s, "--config", env="CONFIG", default="", metavar="FILE",
         help="read settings, tokens and webhooks from this TOML file (docs/operations.md); the "
         "command line and the environment win over it; SIGHUP or POST /api/reload re-reads it")
    add_access_log(s)
    add_debug(s)
    s.set_defaults(_parser=s)
    c = sub.add_parser(
        "check-config", formatter_class=Formatter, help="check a configuration file",
        description="Read a `trisocks server --config` file and report the first mistake with "
        "its line (exit 2), or what it configures (exit 0).")
    c.add_argument("file", metavar="FILE", help="the TOML file")
    c.set_defaults(_parser=s)



def _plane_settings(args, management) -> None:
    if args.usage_days < 1:
        usage_error("--usage-days must be 1 or more")
    management.state.usage_days = args.usage_days
    if args.reset_timezone.upper() != "UTC":
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            management.state.tz = ZoneInfo(args.reset_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            usage_error(f"--reset-timezone: unknown time zone {args.reset_timezone!r} (an IANA "
                        "name such as Europe/Berlin; the system's tzdata must have it)")


def _secrets(args) -> None:
    """Tokens and the API key from their files, and a warning for those on the command line."""
    # every file is read (and a bad one refused) before any warning is logged
    key = one_secret(args, "api_key", "api_key_file", "-k/--api-key", "--api-key-file", "API_KEY")
    from_file = read_secret_file("--token-file", args.token_file) if args.token_file else []
    warn_secret_on_argv(args, "token", "--token-file", "TRISOCKS_TOKEN")
    if from_file:
        args.token = list(dict.fromkeys([*(args.token or []), *from_file]))  # once each
    if key is not None:
        args.api_key = key
    else:
        warn_secret_on_argv(args, "api_key", "--api-key-file", "TRISOCKS_API_KEY")
    password = one_secret(args, "socks_password", "socks_password_file", "-w/--socks-password",
                          "--socks-password-file", "SOCKS_PASSWORD")
    if password is not None:
        args.socks_password = password
    else:
        warn_secret_on_argv(args, "socks_password", "--socks-password-file",
                            "TRISOCKS_SOCKS_PASSWORD")
    if args.connector_token_file:
        more = read_secret_file("--connector-token-file", args.connector_token_file)
        args.connector_token = list(dict.fromkeys([*(args.connector_token or []), *more]))
    warn_secret_on_argv(args, "connector_token", "--connector-token-file",
                        "TRISOCKS_CONNECTOR_TOKEN")


def worker_count(args) -> int:
    """--workers as a number ('auto': the cores this process may use)."""
    raw = str(args.workers).strip().lower()
    if raw == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not raw.isdigit() or int(raw) < 1:
        usage_error(f"--workers: expected a number of 1 or more, or 'auto', not {args.workers!r}")
    return int(raw)


def _store(args):
    """The store of the plane: --store redis://..., or the SQLite file (shared by workers)."""
    from ..management import SQLiteStore, default_path

    url = args.store
    if not url or url.startswith("sqlite:"):
        path = url.split(":", 1)[1].removeprefix("//") if url else (args.db or default_path())
        if url and args.db:
            usage_error("give the SQLite file with --db or --store sqlite:PATH, not both")
        return SQLiteStore(path, shared=worker_id() is not None)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        usage_error(f"--store {url}: expected redis://, rediss://, unix:// or sqlite:PATH")
    if args.db:
        usage_error("--db is the SQLite file; with --store redis://... there is none")
    try:
        from ..management.redis_store import RedisStore
    except ImportError as exc:
        usage_error(f"--store {url.split('://')[0]}://: {exc.name} is not installed; install "
                    "trisocks with the redis extra (pip install 'trisocks[redis]')")
    try:
        return RedisStore(url, prefix=args.store_prefix)
    except ValueError as exc:
        usage_error(f"--store: {exc}")


def _cluster_secret(args) -> bytes | None:
    """What the nodes of one cluster share: the supervisor's (workers), or --cluster-secret-file."""
    if args.cluster_secret_file:
        secret = read_secret_file("--cluster-secret-file", args.cluster_secret_file)[0]
        if len(secret) < 16:
            usage_error("--cluster-secret-file: the secret is too short; use 16 characters or more")
        return secret.encode()
    raw = os.environ.get(SECRET_ENV) if worker_id() is not None else None
    return raw.encode() if raw else None


def _management(args):
    """The management plane when -k, --db or --store asks for it (None otherwise)."""
    if args.node_url and not args.node_url.startswith(("ws://", "wss://")):
        usage_error("--node-url must start with ws:// or wss://")
    if not (args.api_key or args.db or args.store):
        if args.api_bind or args.api_allow_remote:
            usage_error("--api-bind and --api-allow-remote need -k/--api-key")
        return None
    from ..management import ApiKey, Management
    from ..management.serving import parse_bind

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
    store = _store(args)
    if store.shared and args.node_url == "" and worker_id() is None and args.reverse:
        log.warning("--store is shared but --node-url is not given: SOCKS5 clients and "
                    "connectors on other nodes cannot reach this node's providers")
    management = Management(store, api_key=key, allow_remote=args.api_allow_remote, api_bind=bind,
                            public_url=args.public_url, handle_signals=True,
                            metrics_per_owner=max(0, args.metrics_per_owner))
    management.state.cluster_secret = _cluster_secret(args)
    return management


def cmd_check_config(args) -> int:
    from .config import ConfigError, load

    try:
        cfg = load(args.file, args._parser)
    except ConfigError as exc:
        print(f"trisocks: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok: {len(cfg.server)} server setting(s), {len(cfg.tokens)} token(s), "
          f"{len(cfg.webhooks)} webhook(s)")
    return 0


def _read_config(args):
    """--config: the file's settings where the command line and the environment say nothing."""
    from .config import ConfigError, apply, load

    try:
        cfg = load(args.config, args._parser)
    except ConfigError as exc:
        usage_error(str(exc))
    taken = apply(cfg, args, args._parser, getattr(args, "_argv", sys.argv[1:]))
    if taken.keys() & {"debug", "log_format", "log_file", "log_limit"}:
        setup_logging_for(args)
    log.info("configuration: %s (%d setting(s), %d token(s), %d webhook(s))", args.config,
             len(taken), len(cfg.tokens), len(cfg.webhooks))
    return cfg


def _config_tokens(cfg, tokens, management) -> None:
    """The [[tokens]] of the file, with their policies (which need the management plane)."""
    from ..policy import spec
    from ..tunnel.tokens import CONNECTOR, REVERSE, TokenInfo

    for entry in cfg.tokens:
        if entry.policy is not None and management is None:
            usage_error(f"{cfg.path}: a token policy needs the management plane (-k or --db)")
        kind = {"reverse": REVERSE, "connector": CONNECTOR}.get(entry.type, "forward")
        try:
            info = tokens.add(TokenInfo(entry.token, kind, port=entry.port,
                                        username=entry.username, password=entry.password,
                                        reverse_token=entry.reverse_token,
                                        allow_manage_connector=entry.allow_manage_connector))
        except ValueError as exc:
            usage_error(f"{cfg.path}: token {entry.type}: {exc}")
        if entry.policy is not None:
            try:
                spec.put_in_force(info.account, entry.policy)
            except ValueError as exc:
                usage_error(f"{cfg.path}: token policy: {exc}")


def cmd_server(args) -> int:
    from ..tunnel.server import Server, ServerConfig, serve_until_signal
    from ..tunnel.tokens import CONNECTOR, REVERSE, TokenInfo, TokenTable, generate, redact

    cfg = _read_config(args) if args.config else None
    _secrets(args)
    credentials_pair(args)
    workers = worker_count(args)
    if worker_id() is None and workers > 1:
        if args.reverse and not (args.api_key or args.db or args.store):
            usage_error("--workers with -r needs the store (-k, --db or --store): the workers "
                        "find each other's providers through it")
        from .workers import supervise

        return supervise(args, workers)
    if worker_id() is not None:
        from ..net.transport import share_ports

        share_ports()  # every worker binds the same ports; the kernel spreads connections
    if args.grace < 0:
        usage_error("--grace must be 0 or more seconds")
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
    if cfg is not None and cfg.tokens:
        pass  # the file's [[tokens]] are added below, with the command line's
    elif not given and management is not None and management.api_key is not None:
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
    if cfg is not None:
        _config_tokens(cfg, tokens, management)
    if args.tls_key and not args.tls_cert:
        usage_error("--tls-key needs --tls-cert")
    from ..net.upstream import parse_proxy
    from ..tunnel.egress import direct_dialer, proxy_dialer

    dialer = direct_dialer
    if args.upstream_proxy:
        try:
            proxy = parse_proxy(args.upstream_proxy)
        except ValueError as exc:
            usage_error(f"{exc}")
        dialer = proxy_dialer(proxy)
        log.info("target connections go through %s", proxy.display)
    from ..policy.rules import RuleError, RuleSet

    try:
        rules = RuleSet.parse(args.rules) if args.rules else None
    except RuleError as exc:
        usage_error(f"--allow/--deny: {exc}")
    config = ServerConfig(rules=rules, ws_host=args.ws_host, ws_port=args.ws_port,
                          connect_timeout=args.connect_timeout, socks_host=args.socks_host,
                          socks_nowait=args.socks_nowait, fast_open=args.fast_open,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, dialer=dialer,
                          trusted_proxies=tuple(args.trusted_proxy),
                          max_unauthenticated=args.max_unauthenticated,
                          max_unauthenticated_per_source=args.max_unauthenticated_per_address,
                          max_sessions_per_token=args.max_sessions_per_token,
                          # workers: each also listens on a port of its own on loopback,
                          # where the others reach its providers (docs/scale-out.md)
                          node_listen=("127.0.0.1", 0) if worker_id() is not None else None,
                          node_url=args.node_url)
    try:
        server = (management.create_server(config) if management is not None
                  else Server(config, tokens))
    except ValueError as exc:
        usage_error(f"{exc}")
    open_access_log(args, server)
    log.info("%d %s token(s)%s%s configured", len(given), kind,
             f" and {len(args.connector_token)} connector token(s)" if args.connector_token else "",
             f" and {len(cfg.tokens)} from {cfg.path}" if cfg is not None and cfg.tokens else "")
    for token in given:
        log.debug("token %s", redact(token))
    if management is None:
        trio.run(partial(serve_until_signal, server, grace=args.grace))
        return 0
    management.grace = args.grace
    _plane_settings(args, management)
    if cfg is not None:
        from .reload import Reloader

        management.reloader = Reloader(args.config, args._parser, getattr(args, "_argv", sys.argv[1:]),
                                       args, management, cfg)
    from ..management import SQLiteStore, StoreError

    try:
        trio.run(_run_plane, management, cfg.webhooks if cfg is not None else [])
    except StoreError as exc:
        if management.store.shared and not isinstance(management.store, SQLiteStore):
            log.error("store: %s (is Redis running, and is --store right?)", exc)
        else:
            log.error("database: %s", exc)
        return 1
    return 0


async def _run_plane(management, webhooks: list) -> None:
    """The plane, and once it runs, the webhooks of the configuration file."""
    if not webhooks:
        await management.run()
        return
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(management.run)
            await management.webhooks.replace_from_config(webhooks)
    except BaseExceptionGroup as group:  # the plane's own exit (SystemExit(2)...) as it came
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
