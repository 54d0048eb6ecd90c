"""An operator's common mistakes and situations get a clear answer (issue 16, rows 4, 10 and
11, item 5): a TLS mismatch is named, a client refused for an account reason keeps trying
and says why, and secrets stay off the command line. Real processes, real sockets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .api_support import KEY, http, start_api_server
from .support import (
    clean_env,
    curl,
    payload_sha256,
    start_trisocks_server,
    trisocks_client_argv,
    trisocks_cmd,
)
from .test_run_demo import start_demo

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"SOCKS5 proxy listening on 127\.0\.0\.1:(\d+)")
ARGV_WARNING = "a secret on the command line is visible to every local user in ps"


def run(argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30,
                          env=env if env is not None else clean_env(), stdin=subprocess.DEVNULL)


def fetch_through(socks_port: int, payload_server, n: int = 65536, seed: int = 16) -> None:
    result = curl(payload_server.bytes_url(n, seed), socks=f"127.0.0.1:{socks_port}",
                  timeout=30).check()
    assert result.sha256 == payload_sha256(n, seed)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- row 4: TLS mismatch ----------------------------------------------------------------------


@pytest.fixture
def tls_server(procs, tmp_path):
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return start_trisocks_server(procs, tokens=("tls-token",),
                                 extra=["--tls-cert", str(cert_file), "--tls-key", str(key_file)])


def test_ws_to_a_tls_server_says_use_wss_and_keeps_trying(procs, tls_server):
    client = procs.start(trisocks_client_argv(f"ws://127.0.0.1:{tls_server.port}", "tls-token"),
                         name="trisocks-client")
    line = r"cannot reach ws://127\.0\.0\.1:\d+/socket: the server speaks TLS: use wss:// .*retrying in"
    client.wait_for_log(line, 20)
    client.wait_for(lambda: len(re.findall(line, client.output())) >= 2, "a second retry line")
    assert client.alive(), client.describe()


def test_wss_to_a_plain_server_says_use_ws_and_keeps_trying(procs, trisocks_server):
    server = trisocks_server(tokens=("plain-token",))
    client = procs.start(trisocks_client_argv(f"wss://127.0.0.1:{server.port}", "plain-token"),
                         name="trisocks-client")
    line = (r"cannot reach wss://127\.0\.0\.1:\d+/socket: the server does not speak TLS: "
            r"use ws:// .*retrying in")
    client.wait_for_log(line, 20)
    client.wait_for(lambda: len(re.findall(line, client.output())) >= 2, "a second retry line")
    assert client.alive(), client.describe()


# -- row 10: refused for now, retried; an unknown token ends the client ----------------------


def test_refusals_the_operator_can_lift_are_retried_and_unknown_tokens_are_final():
    from trisocks.tunnel.client import Client, ClientConfig, RefusedForNow

    client = Client(ClientConfig(token="some-token-0001"))
    for reason in ("traffic limit reached", "expired", "disabled", "too many sessions for this token",
                   "not allowed: device limit (3 in use)", "not allowed: client limit (2 connected)"):
        assert isinstance(client._refused(reason), RefusedForNow), reason
    for reason in ("invalid token", "invalid auth message"):
        assert not isinstance(client._refused(reason), RefusedForNow), reason


def test_a_disabled_user_keeps_retrying_and_comes_back_when_enabled(procs, tmp_path, payload_server):
    server = start_api_server(procs, db=tmp_path / "db")
    key = http("POST", f"{server.http_url}/api/users", json={"name": "carol"}).json()["key"]
    assert http("PATCH", f"{server.http_url}/api/users/{key}",
                json={"status": "disabled"}).status_code == 200
    # TRISOCKS_TEST_REFUSED_BACKOFF (tests only): a first wait of 1 s instead of 30 s
    client = procs.start(trisocks_client_argv(server.url, None, 0), name="trisocks-client",
                         env=clean_env({"TRISOCKS_TOKEN": key, "TRISOCKS_TEST_REFUSED_BACKOFF": "1"}))
    line = r"server refused token .+?: disabled; retrying in \d+ s"
    client.wait_for_log(line, 20)
    client.wait_for(lambda: len(re.findall(line, client.output())) >= 2, "a second refusal", 20)
    assert client.alive(), client.describe()
    assert key not in client.output()

    # the operator re-enables the user: the client gets in on its next try and carries traffic
    assert http("PATCH", f"{server.http_url}/api/users/{key}",
                json={"status": "active"}).status_code == 200
    port = int(client.wait_for_log(LISTENING, 20).group(1))
    fetch_through(port, payload_server)


def test_an_unknown_token_still_exits_1_with_a_clear_message(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "db")
    client = procs.start(trisocks_client_argv(server.url, None, 0), name="trisocks-client",
                         env=clean_env({"TRISOCKS_TOKEN": "no-such-token-00000001"}))
    assert client.wait_exit(20) == 1, client.describe()
    assert re.search(r"ERROR .*server refused token .+?: invalid token", client.stderr()), \
        client.describe()
    assert "retrying" not in client.output()


# -- row 11 and item 5: secrets off the command line ------------------------------------------


def test_token_files_for_server_and_client_and_no_warning(procs, tmp_path, payload_server):
    tokens = secret_file(tmp_path / "tokens", "first-file-token-01  \n\nsecond-file-token-02\n")
    mine = secret_file(tmp_path / "mine", "second-file-token-02\t\n")
    server = start_trisocks_server(procs, tokens=None, extra=["--token-file", str(tokens)])
    client = procs.start([*trisocks_client_argv(server.url, None, 0), "--token-file", str(mine)],
                         name="trisocks-client")
    fetch_through(int(client.wait_for_log(LISTENING, 20).group(1)), payload_server)
    assert "2 forward token(s) configured" in server.output(), server.output()
    for proc in (server.proc, client):
        assert ARGV_WARNING not in proc.output(), proc.describe()


def test_client_token_file_from_the_environment(procs, tmp_path, payload_server):
    mine = secret_file(tmp_path / "mine", "env-file-token-0001\n")
    server = start_trisocks_server(procs, tokens=("env-file-token-0001",))
    client = procs.start(trisocks_client_argv(server.url, None, 0), name="trisocks-client",
                         env=clean_env({"TRISOCKS_TOKEN_FILE": str(mine)}))
    fetch_through(int(client.wait_for_log(LISTENING, 20).group(1)), payload_server)
    assert ARGV_WARNING not in client.output()


def test_a_secret_on_argv_is_warned_about(procs, trisocks_server, tmp_path):
    server = trisocks_server(tokens=("argv-token-0001",))
    assert f"{ARGV_WARNING}; use --token-file or TRISOCKS_TOKEN" in server.output()
    client = procs.start(trisocks_client_argv(server.url, "argv-token-0001", 0),
                         name="trisocks-client")
    client.wait_for_log(LISTENING, 20)
    assert f"{ARGV_WARNING}; use --token-file or TRISOCKS_TOKEN" in client.output()
    api = start_api_server(procs, db=tmp_path / "db", name="trisocks-api")
    assert f"{ARGV_WARNING}; use --api-key-file or TRISOCKS_API_KEY" in api.output()


def test_api_key_file(procs, tmp_path):
    key_file = secret_file(tmp_path / "api-key", KEY + "\n")
    server = start_api_server(procs, db=tmp_path / "db", extra=["--api-key-file", str(key_file)],
                              key_in_env=True, env=clean_env(), name="trisocks-api")
    # key_in_env keeps -k off the command line (and puts the same key in TRISOCKS_API_KEY,
    # which the file flag on the command line wins over)
    assert http("GET", f"{server.http_url}/api/status").status_code == 200
    assert http("GET", f"{server.http_url}/api/status", key="wrong-key-000000000").status_code != 200
    assert ARGV_WARNING not in server.output()


@pytest.mark.parametrize("command", ["server", "client", "provider", "connector"])
@pytest.mark.parametrize("problem", ["missing", "empty", "unreadable"])
def test_a_bad_token_file_is_a_usage_error_naming_it(tmp_path, command, problem):
    path = tmp_path / "token"
    if problem == "empty":
        path.write_text("   \n\n")
    elif problem == "unreadable":
        path.mkdir()  # a directory: unreadable as a file even for root (who reads any mode)
    proc = run([*trisocks_cmd(), command, "--token-file", str(path)])
    assert proc.returncode == 2, proc.stderr
    assert f"--token-file {path}:" in proc.stderr, proc.stderr


def test_bad_secret_files_and_conflicts(tmp_path):
    missing = tmp_path / "nope"
    proc = run([*trisocks_cmd(), "server", "-P", "0", "--api-key-file", str(missing)])
    assert proc.returncode == 2 and f"--api-key-file {missing}: cannot read it" in proc.stderr
    two = secret_file(tmp_path / "two", "a-token-00001\nb-token-00002\n")
    proc = run([*trisocks_cmd(), "client", "--token-file", str(two)])
    assert proc.returncode == 2 and "holds 2 lines" in proc.stderr, proc.stderr
    proc = run([*trisocks_cmd(), "client", "-t", "x-token-0001", "--token-file", str(two)])
    assert proc.returncode == 2 and "-t/--token and --token-file" in proc.stderr, proc.stderr
    proc = run([*trisocks_cmd(), "client", "--token-file", str(two)],
               env=clean_env({"TRISOCKS_TOKEN": "x-token-0001"}))
    assert proc.returncode == 2 and "both set" not in proc.stderr  # the flag wins: its own error
    proc = run([*trisocks_cmd(), "client"],
               env=clean_env({"TRISOCKS_TOKEN": "x", "TRISOCKS_TOKEN_FILE": str(two)}))
    assert proc.returncode == 2 and "TRISOCKS_TOKEN and TRISOCKS_TOKEN_FILE are both set" in proc.stderr


def _command_lines() -> str:
    """Every process's command line, as any local user can read it (ps, /proc)."""
    lines = [subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass  # the process ended meanwhile
    return "\n".join(lines)


def test_make_run_keeps_its_secrets_out_of_ps(procs, tmp_path):
    demo, state = start_demo(procs, tmp_path)
    token = (state / "token").read_text().strip()
    key = (state / "api-key").read_text().strip()
    seen = _command_lines()
    assert "--token-file" in seen  # the demo's processes are there
    assert token not in seen and key not in seen
    # and the line to paste for a second client passes the token by file too
    assert re.search(r"trisocks client -u \S+ --token-file \S+token -p \d+", demo.stdout())
    for log in ("server.log", "client.log"):
        assert ARGV_WARNING not in (state / log).read_text()


def test_socks5_password_and_connector_tokens_from_files(procs, tmp_path, payload_server):
    """Every secret the commands take has a file form: the reverse port's SOCKS5 password,
    connector tokens, and a client's own SOCKS5 password; on argv they get the warning."""
    import socket

    password = secret_file(tmp_path / "socks-password", "port-password-01\n")
    connectors = secret_file(tmp_path / "connectors", "file-connector-001\n")
    server = start_trisocks_server(procs, tokens=None, extra=[
        "-r", "-t", "rev-token-file-001", "-p", "0", "-n", "porter",
        "--socks-password-file", str(password), "--connector-token-file", str(connectors)])
    out = server.output()
    assert "socks-password-file or TRISOCKS_SOCKS_PASSWORD" not in out
    assert "connector-token-file" not in out and "1 connector token(s)" in out, out
    # the connector token from the file works; the client's own password from a file too
    mine = secret_file(tmp_path / "client-password", "local-password-1\n")
    client = procs.start([*trisocks_client_argv(server.url, "file-connector-001", 0), "-n", "me",
                          "--socks-password-file", str(mine)], name="connector-client")
    port = int(client.wait_for_log(LISTENING, 20).group(1))
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    s.sendall(b"\x01\x02me\x10local-password-1")
    assert s.recv(2) == b"\x01\x00"  # the password from the file
    s.close()
    argv = procs.start([*trisocks_client_argv(server.url, "file-connector-001", 0), "-n", "me",
                        "-w", "on-the-command-line"], name="argv-client")
    argv.wait_for_log(LISTENING, 20)
    assert "use --socks-password-file or TRISOCKS_SOCKS_PASSWORD" in argv.output()
