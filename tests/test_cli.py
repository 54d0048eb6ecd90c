"""The trisocks command line, run as a user runs it: subprocesses, real sockets, curl."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import trisocks

from .support import (
    clean_env,
    curl,
    free_port,
    payload_sha256,
    start_trisocks_client,
    start_trisocks_server,
    trisocks_client_argv,
    trisocks_cmd,
)

VERSION_LINE = re.compile(r"^trisocks (\d+\.\d+\.\d+\S*) \((compiled|pure) hot path\)$")

SERVER_FLAGS = {  # flag spellings -> env var named in --help
    ("-H", "--ws-host"): "TRISOCKS_WS_HOST",
    ("-P", "--ws-port"): "TRISOCKS_WS_PORT",
    ("-t", "--token"): "TRISOCKS_TOKEN",
    ("-d", "--debug"): "TRISOCKS_DEBUG",
}
CLIENT_FLAGS = {
    ("-t", "--token"): "TRISOCKS_TOKEN",
    ("-u", "--url"): "TRISOCKS_URL",
    ("-s", "--socks-host"): "TRISOCKS_SOCKS_HOST",
    ("-p", "--socks-port"): "TRISOCKS_SOCKS_PORT",
    ("-n", "--socks-username"): "TRISOCKS_SOCKS_USERNAME",
    ("-w", "--socks-password"): "TRISOCKS_SOCKS_PASSWORD",
    ("-i", "--socks-no-wait"): "TRISOCKS_SOCKS_NO_WAIT",
    ("-R", "--no-reconnect"): "TRISOCKS_NO_RECONNECT",
    ("-T", "--threads"): "TRISOCKS_THREADS",
    ("-d", "--debug"): "TRISOCKS_DEBUG",
}


def run(argv, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env(), stdin=subprocess.DEVNULL)


def env_without_require(**extra) -> dict[str, str]:
    env = clean_env()
    env.pop("TRISOCKS_REQUIRE_COMPILED", None)
    env.pop("TRISOCKS_PURE", None)
    env.update(extra)
    return env


def fetch_ok(client, payload_server, n: int = 65536, seed: int = 31) -> None:
    result = curl(payload_server.bytes_url(n, seed), socks=client.socks).check()
    assert result.sha256 == payload_sha256(n, seed)


# -- version ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "module"])
def test_version_names_the_implementation(how):
    argv = [*trisocks_cmd(), "version"] if how == "script" else [sys.executable, "-m", "trisocks",
                                                                   "version"]
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr
    m = VERSION_LINE.match(proc.stdout.strip())
    assert m, f"unexpected version line: {proc.stdout!r}"
    assert m.group(1) == trisocks.__version__


@pytest.mark.parametrize("how", ["script", "module"])
def test_version_under_require_compiled_says_compiled(how):
    argv = [*trisocks_cmd(), "version"] if how == "script" else [sys.executable, "-m", "trisocks",
                                                                   "version"]
    proc = run(argv, env=env_without_require(TRISOCKS_REQUIRE_COMPILED="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"trisocks {trisocks.__version__} (compiled hot path)"


def test_dash_dash_version_is_the_version_command():
    proc = run([*trisocks_cmd(), "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == run([*trisocks_cmd(), "version"]).stdout.strip()


def test_tls_cert_without_its_key_says_the_key_is_missing(tmp_path):
    """A certificate file without a private key is a missing --tls-key, not 'PEM lib'."""
    import trustme

    cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    proc = run([*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", "0", "-t", "tok",
                "--tls-cert", str(cert)])
    assert proc.returncode == 2, proc.stderr
    assert f"{cert} holds no private key; give the key file with --tls-key" in proc.stderr
    assert "PEM lib" not in proc.stderr


@pytest.mark.parametrize("variable", ["TRISOCKS_SOCKS_NO_WAIT", "TRISOCKS_SOCKS_NOWAIT"])
def test_socks_no_wait_has_one_variable_name_and_the_old_one_still_works(procs, variable):
    """The client and server spell it TRISOCKS_SOCKS_NO_WAIT; the server's old spelling is still
    honoured (the reverse port opens before any provider), with a warning that names the new one."""
    from .support.peers import start_trisocks_reverse_server
    from .support.procs import port_open

    server, socks_port = start_trisocks_reverse_server(procs, "nowait-token")
    server.proc.terminate()
    argv = [*trisocks_cmd(), "server", "-H", "127.0.0.1", "-P", "0", "-r", "-t", "nowait-token",
            "-p", str(socks_port)]
    proc = procs.start(argv, name="trisocks-server-nowait", env=clean_env({variable: "1"}))
    proc.wait_for_log(r"SOCKS5 port 127\.0\.0\.1:\d+")
    proc.wait_for(lambda: port_open("127.0.0.1", socks_port), "the reverse port to open without a provider")
    renamed = "TRISOCKS_SOCKS_NOWAIT is the old name of TRISOCKS_SOCKS_NO_WAIT"
    assert (renamed in proc.output()) == (variable == "TRISOCKS_SOCKS_NOWAIT"), proc.describe()


# -- hash-key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["sha256", "bcrypt"])
def test_hash_key_prints_a_form_the_server_accepts(scheme):
    from trisocks.management.keys import ApiKey

    proc = subprocess.run([*trisocks_cmd(), "hash-key", "--scheme", scheme], input="the-key\n",
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    configured = proc.stdout.strip()
    assert "the-key" not in configured
    key = ApiKey(configured)
    assert key.scheme == scheme and key.verify_slow("the-key") and not key.verify_slow("the-kez")

    proc = subprocess.run([*trisocks_cmd(), "hash-key", "--generate", "--scheme", scheme],
                          capture_output=True, text=True, timeout=30)
    lines = dict(line.split(":  " if line.startswith("key") else ": ", 1)
                 for line in proc.stdout.splitlines())
    assert ApiKey(lines["hash"]).verify_slow(lines["key"])

    proc = subprocess.run([*trisocks_cmd(), "hash-key"], input="\n", capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "trisocks: error: empty key"


_HIDE_EXTENSION = (
    "import sys; sys.modules['trisocks.wire._relay'] = None\n"  # as if the extension were not built
    "from trisocks.cli import main\n"
    "sys.exit(main(['version']))\n"
)


def test_without_extension_pure_runs_unless_compiled_is_required():
    proc = run([sys.executable, "-c", _HIDE_EXTENSION], env=env_without_require())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"trisocks {trisocks.__version__} (pure hot path)"

    proc = run([sys.executable, "-c", _HIDE_EXTENSION],
               env=env_without_require(TRISOCKS_REQUIRE_COMPILED="1"))
    assert proc.returncode != 0
    assert "pure" not in proc.stdout
    assert "ImportError" in proc.stderr and "TRISOCKS_REQUIRE_COMPILED" in proc.stderr, proc.stderr


# -- help -------------------------------------------------------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """Option entries of an argparse help text: first flag -> whitespace-normalised entry."""
    entries: dict[str, str] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line.strip()]
            entries[line.split()[0].rstrip(",")] = current  # type: ignore[assignment]
        elif current is not None and re.match(r"^\s{3,}\S", line):
            current.append(line.strip())
        else:
            current = None
    return {flag: " ".join(parts) for flag, parts in entries.items()}


@pytest.mark.parametrize("command,flags", [("server", SERVER_FLAGS), ("client", CLIENT_FLAGS)])
def test_help_lists_every_flag_with_its_env_var(command, flags):
    proc = run([*trisocks_cmd(), command, "--help"])
    assert proc.returncode == 0, proc.stderr
    entries = help_entries(proc.stdout)
    assert entries, proc.stdout
    for (short, long), env in flags.items():
        entry = entries.get(short)
        assert entry is not None, f"{short} not in `trisocks {command} --help`:\n{proc.stdout}"
        assert long in entry, f"{long} not with {short}: {entry}"
        assert env in entry, f"{short} {long} does not name {env}: {entry}"
    # and every option that exists (whatever it is) names its environment variable
    for flag, entry in entries.items():
        if flag in ("-h", "--help"):
            continue
        assert "TRISOCKS_" in entry, f"trisocks {command}: {flag} names no env var: {entry}"


# -- tokens -----------------------------------------------------------------------------------


def test_server_without_token_prints_a_generated_one_that_works(trisocks_server, trisocks_client,
                                                                 payload_server):
    server = trisocks_server(tokens=None)
    m = server.proc.wait_for_log(r"No token given; generated forward token: (\S+)")
    token = m.group(1)
    assert m.group(0) in server.proc.stdout(), "the generated token must be printed on stdout"
    assert len(token) >= 16
    client = trisocks_client(server.url, token)
    fetch_ok(client, payload_server)


def test_generated_tokens_and_keys_never_start_with_a_dash(monkeypatch):
    # one url-safe token in 64 starts with "-", and "client -t -abc..." is a usage error
    from trisocks.management.plane import new_user_key
    from trisocks.tunnel import tokens

    draws = iter(["-looks-like-a-flag", "_fine-token", "-again", "fine-key"])
    monkeypatch.setattr(tokens.secrets, "token_urlsafe", lambda nbytes: next(draws))
    assert tokens.generate() == "_fine-token"
    assert new_user_key() == "fine-key"


def test_wrong_token_exits_promptly_and_tokens_are_never_logged(procs, trisocks_server,
                                                                trisocks_client, payload_server):
    good = "GoodToken-9f3c2a71e5d84b06"
    wrong = "WrongToken-4e8b1d2c7a9f3e50"
    server = trisocks_server(tokens=[good], debug=True)

    started = time.monotonic()
    bad = procs.start(trisocks_client_argv(server.url, wrong, 0, debug=True), name="bad-client")
    status = bad.wait_exit(timeout=20)
    elapsed = time.monotonic() - started
    assert status == 1, bad.describe()
    assert "server refused token" in bad.stderr(), bad.describe()
    assert elapsed < 10, f"the client took {elapsed:.1f} s to give up on a refused token"
    server.proc.wait_for_log(r"(?i)auth\w* failed|refused|invalid token")  # it saw the attempt

    # a good client, so that the server also logs a successful authentication
    client = trisocks_client(server.url, good, debug=True)
    fetch_ok(client, payload_server)
    server.proc.wait_for_log(r"authenticated")

    for who, proc in (("server", server.proc), ("refused client", bad), ("client", client.proc)):
        out = proc.output()
        for token in (good, wrong):
            assert token not in out, f"{who} logged the token {token!r} in full:\n{proc.describe()}"


def test_env_vars_instead_of_flags(procs, payload_server):
    # the server from the environment only, with two comma-separated tokens
    server = start_trisocks_server(
        procs, argv=[*trisocks_cmd(), "server"],
        env=clean_env({"TRISOCKS_WS_HOST": "127.0.0.1", "TRISOCKS_WS_PORT": "0",
                       "TRISOCKS_TOKEN": "env-token-one,env-token-two"}))
    # the client: token, URL and SOCKS port from the environment
    port = free_port()
    client = start_trisocks_client(
        procs, None, argv=[*trisocks_cmd(), "client", "-s", "127.0.0.1"], expect_port=port,
        env=clean_env({"TRISOCKS_TOKEN": "env-token-two", "TRISOCKS_URL": server.url,
                       "TRISOCKS_SOCKS_PORT": str(port)}))
    assert client.port == port
    fetch_ok(client, payload_server)


def test_flag_wins_over_env(procs, payload_server):
    server = start_trisocks_server(procs, tokens=["flag-token-abc123"])
    client = start_trisocks_client(
        procs, server.url, "flag-token-abc123",
        env=clean_env({"TRISOCKS_TOKEN": "env-token-refused", "TRISOCKS_URL": "ws://127.0.0.1:1"}))
    fetch_ok(client, payload_server)


# -- the server's HTTP face ---------------------------------------------------------------------


def test_http_root_says_running_and_other_paths_404(trisocks_server):
    server = trisocks_server()
    root = curl(f"{server.http_url}/").check(200)
    assert root.text().strip() == f"trisocks {trisocks.__version__} is running"
    missing = curl(f"{server.http_url}/no/such/path")
    assert missing.returncode == 0 and missing.http_code == 404, missing
    assert server.proc.alive()


def test_api_calls_to_a_server_without_api_say_how_to_turn_it_on(trisocks_server):
    server = trisocks_server()
    for path in ("/api/status", "/metrics"):
        answer = curl(f"{server.http_url}{path}")
        assert answer.http_code == 404, answer
        assert "the management API is off: start the server with -k KEY" in answer.text()


def test_a_wrong_websocket_path_is_named_on_both_sides(trisocks_server, procs):
    """The server's 404 names the path it expects, and the client's retry line says what to fix."""
    server = trisocks_server()
    answer = curl(f"{server.http_url}/tunnel", extra=["-H", "Connection: Upgrade", "-H",
                                                       "Upgrade: websocket"])
    assert answer.http_code == 404 and "the tunnel is on /socket" in answer.text(), answer
    client = procs.start([*trisocks_cmd(), "client", "-u", f"{server.url}/tunnel", "-t", "test-token",
                          "-s", "127.0.0.1", "-p", "0", "-i"], name="trisocks-client-wrong-path")
    client.wait_for_log(r"HTTP 404\): nothing at /tunnel there \(trisocks, LinkSocks and pywssocks "
                        r"servers use /socket\); retrying")


@pytest.mark.parametrize("url", ["example.com", "example.com:443", "example.com/socket"])
def test_a_server_url_without_scheme_is_refused_with_both_forms(url):
    proc = run([*trisocks_cmd(), "client", "-u", url, "-t", "tok"])
    assert proc.returncode == 2, proc.stderr
    host = url.split("/")[0]
    assert f"write ws://{host} for plain WebSocket or wss://{host} for WebSocket over TLS" in proc.stderr


def test_a_server_url_without_scheme_but_with_a_port_is_plain_websocket(trisocks_server,
                                                                         trisocks_client,
                                                                         payload_server):
    server = trisocks_server()
    client = trisocks_client(f"127.0.0.1:{server.port}")
    fetch_ok(client, payload_server)


# -- several WebSocket connections ---------------------------------------------------------------


def test_threads_open_that_many_websockets(trisocks_server, trisocks_client, payload_server):
    server = trisocks_server()
    client = trisocks_client(server.url, threads=3)

    def authenticated() -> int:
        return len(re.findall(r"authenticated", server.proc.stderr()))

    server.proc.wait_for(lambda: authenticated() >= 3, "3 authenticated connections")
    for seed in range(6):  # spread over the connections
        fetch_ok(client, payload_server, n=300_000, seed=40 + seed)
    result = curl(payload_server.bytes_url(8 << 20, 47), socks=client.socks).check()
    assert result.sha256 == payload_sha256(8 << 20, 47)
    assert authenticated() == 3, server.proc.describe()
    assert len(re.findall(r"connected to ws://", client.proc.stderr())) == 3, client.proc.describe()
