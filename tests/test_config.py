"""The configuration file: the same server from flags and from a file, precedence, errors
with their line, and live reload under traffic."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from .api_support import KEY, http, start_api_server
from .support.curl import curl
from .support.payload import payload_sha256
from .support.peers import start_trisocks_client
from .support.tools import clean_env, trisocks_cmd
from .test_policy import events, new_user, reply_code

MiB = 1 << 20


def check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run([*trisocks_cmd(), "check-config", str(path)], capture_output=True,
                          text=True, env=clean_env(), timeout=30)


def test_check_config_names_the_key_and_its_line(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[server]\nws_port = 8765\nrules = ["deny private"]\n\n'
                    '[[tokens]]\ntoken = "tok-0000000001"\ntype = "forward"\n')
    r = check_config(good)
    assert r.returncode == 0 and "1 token(s)" in r.stdout, r.stderr
    cases = {
        '[server]\nws_host = "::"\nws_port = "8765"\n': ("line 3", "server.ws_port", "Expected `int`"),
        '[server]\nws_host = "::"\n\nws_prot = 1\n': ("line 4", "unknown key 'server.ws_prot'", ""),
        '# a comment\n[servr]\nx = 1\n': ("line 2", "unknown key 'servr'", ""),
        '[[tokens]]\ntoken = "a-token-000001"\n[[tokens]]\ntoken = "b-token-000001"\nport = 70000\n':
            ("line 5", "tokens[1].port", "<= 65535"),
        '[server]\nrules = ["allow 10.0.0.1/8"]\n': ("", "", ""),  # checked when the server starts
        '[server\n': ("line 1", "", ""),
    }
    for i, (text, (line, key, what)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.toml"
        bad.write_text(text)
        r = check_config(bad)
        if not line:
            assert r.returncode == 0, r.stderr
            continue
        assert r.returncode == 2, (text, r.stdout)
        assert line in r.stderr and key in r.stderr and what in r.stderr, (text, r.stderr)


def test_precedence_command_line_then_environment_then_file(tmp_path, monkeypatch):
    from trisocks.cli import build_parser
    from trisocks.cli.config import apply, load

    monkeypatch.setenv("TRISOCKS_MAX_SESSIONS_PER_TOKEN", "7")
    parser = build_parser()
    server = parser._subparsers._group_actions[0].choices["server"]
    path = tmp_path / "p.toml"
    path.write_text("[server]\nws_port = 9000\nmax_sessions_per_token = 3\nconnect_timeout = 4.5\n")
    argv = ["server", "-P", "9100"]
    args = parser.parse_args(argv)
    taken = apply(load(str(path), server), args, server, argv)
    assert (args.ws_port, args.max_sessions_per_token, args.connect_timeout, args.grace) == (
        9100, 7, 4.5, 5.0)  # command line, environment, file, default
    assert taken == {"connect_timeout": 4.5}


def _equivalent(tmp_path, payload_port: int, other_port: int) -> tuple[list[str], str]:
    flags = ["--allow", f"127.0.0.1:{payload_port}", "--deny", f"127.0.0.1:{other_port}",
             "--max-sessions-per-token", "2", "-t", "cli-token-0000001"]
    toml = (f'[server]\nrules = ["allow 127.0.0.1:{payload_port}", "deny 127.0.0.1:{other_port}"]\n'
            'max_sessions_per_token = 2\ntoken = ["cli-token-0000001"]\n')
    return flags, toml


def test_a_file_equivalent_to_a_command_line_behaves_the_same(procs, tmp_path, payload_server):
    other = 9  # nothing listens there; the rule decides before any dial
    flags, toml = _equivalent(tmp_path, payload_server.port, other)
    conf = tmp_path / "same.toml"
    conf.write_text(toml)
    seen = []
    for name, extra in (("flags", flags), ("file", ["--config", str(conf)])):
        server = start_api_server(procs, db=tmp_path / f"{name}.db", local_targets=False,
                                  extra=extra, name=f"server-{name}")
        base = server.http_url
        user = new_user(base, f"u-{name}")
        client = start_trisocks_client(procs, server.url, user["key"], name=f"client-{name}")
        token_client = start_trisocks_client(procs, server.url, "cli-token-0000001",
                                             name=f"token-{name}")
        outcome = (
            curl(payload_server.url("/"), socks=client.socks).returncode,
            reply_code(client.port, "127.0.0.1", other),
            reply_code(token_client.port, "127.0.0.1", other),
            curl(payload_server.url("/"), socks=token_client.socks).returncode,
            http("GET", f"{base}/api/users/{user['key']}").json()["rules_in_force"],
            http("GET", f"{base}/api/status").json()["tokens"][0]["token"],
        )
        seen.append(outcome)
    assert seen[0] == seen[1]
    assert seen[0][:4] == (0, 2, 2, 0)


def _download(socks: str, url: str, size: int, seed: int, results: list, i: int) -> None:
    r = curl(url, socks=socks, timeout=120)
    results[i] = r.returncode == 0 and r.sha256 == payload_sha256(size, seed)


def test_reload_under_traffic_changes_only_what_it_concerns(procs, tmp_path, payload_server):
    other = 9
    conf = tmp_path / "live.toml"
    base_toml = ('[server]\nrules = ["deny 10.0.0.0/8"]\n\n'
                 '[[tokens]]\ntoken = "keep-token-00001"\npolicy = { speed_down = %d }\n\n'
                 '[[tokens]]\ntoken = "gone-token-00001"\n')
    conf.write_text(base_toml % (10 * MiB))
    server = start_api_server(procs, db=tmp_path / "live.db", local_targets=False,
                              extra=["--config", str(conf)])  # rules from the file alone
    base = server.http_url
    keep = start_trisocks_client(procs, server.url, "keep-token-00001", name="keep-client")
    gone = start_trisocks_client(procs, server.url, "gone-token-00001", name="gone-client")
    assert curl(payload_server.url("/"), socks=gone.socks).returncode == 0
    assert reply_code(keep.port, "127.0.0.1", other) != 2  # no rule against it yet

    # 50 channels moving data through the token that stays (2 MiB each, 10 MiB/s in all: ~10 s)
    size = 2 * MiB
    results: list = [None] * 50
    threads = [threading.Thread(target=_download, args=(
        keep.socks, payload_server.url(f"/bytes/{size}?seed={i}"), size, i, results, i))
        for i in range(50)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 15
    token = "keep-token-00001"
    # (the first few finish within the limit's burst: most of the 50 are open at once)
    while http("GET", f"{base}/api/tokens/{token}").json()["live"]["channels"] < 40:
        assert time.monotonic() < deadline, "the channels did not open"
        time.sleep(0.05)

    # the gone token removed, a rule added, the keep token's limit raised; then SIGHUP
    conf.write_text(base_toml.split("[[tokens]]\ntoken = \"gone")[0].replace(
        '"deny 10.0.0.0/8"', f'"deny 10.0.0.0/8", "deny 127.0.0.1:{other}"') % (50 * MiB))
    server.proc.popen.send_signal(signal.SIGHUP)
    changed = time.monotonic()
    deadline = changed + 1.0
    while True:
        assert server.proc.alive(), server.output()
        detail = http("GET", f"{base}/api/tokens/{token}").json()
        if detail["policy"].get("speed_down") == 50 * MiB:
            break
        assert time.monotonic() < deadline, f"the new limit did not apply within 1 s: {detail}"
        time.sleep(0.02)
    assert reply_code(keep.port, "127.0.0.1", other) == 2  # the new rule
    assert http("GET", f"{base}/api/tokens/gone-token-00001").status_code == 404
    r = curl(payload_server.url("/"), socks=gone.socks, timeout=10)
    assert r.returncode != 0, "the removed token still carries traffic"
    assert time.monotonic() - changed < 5
    for t in threads:
        t.join(120)
    assert results == [True] * 50, "a channel the reload did not concern was hurt"
    reloaded = events(base, "config_reloaded")
    assert len(reloaded) == 1 and "rules" in reloaded[0]["detail"]

    # a broken file changes nothing, and says why (log, event, API)
    conf.write_text(f'[server]\nrules = ["deny 127.0.0.1:{other}"]\nws_port = "oops"\n')
    server.proc.popen.send_signal(signal.SIGHUP)
    r = http("POST", f"{base}/api/reload")
    assert r.status_code == 400 and "ws_port" in r.json()["error"] and "line 3" in r.json()["error"]
    deadline = time.monotonic() + 5
    while len(events(base, "config_rejected")) < 2:
        assert time.monotonic() < deadline, "the SIGHUP reload was not reported"
        time.sleep(0.05)
    assert "reload of" in server.output() and "nothing changed" in server.output()
    assert curl(payload_server.url("/"), socks=keep.socks).returncode == 0  # still in force
    assert reply_code(keep.port, "127.0.0.1", other) == 2
    assert server.proc.alive()


def test_reload_without_a_file_says_so(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "nofile.db")
    r = http("POST", f"{server.http_url}/api/reload")
    assert r.status_code == 400 and "--config" in r.json()["error"]
    server.proc.popen.send_signal(signal.SIGHUP)
    assert http("GET", f"{server.http_url}/api/status", key=KEY).status_code == 200
    deadline = time.monotonic() + 5
    while "no --config file to reload" not in server.output():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.proc.alive()




def test_the_example_in_docs_operations_loads(procs, tmp_path):
    """docs/operations.md's complete example is a valid file, and a server runs with it."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    block = re.search(r"<!-- operations-example -->\n```toml\n(.*?)```", doc, re.S).group(1)
    example = tmp_path / "trisocks.toml"
    # run it here: files and ports moved to this test's places
    (tmp_path / "api-key").write_text(KEY + "\n")
    (tmp_path / "office-token").write_text("office-token-00001\n")
    runnable = (block.replace("/etc/trisocks/", f"{tmp_path}/")
                .replace("/var/lib/trisocks/", f"{tmp_path}/")
                .replace("ws_port = 8765", "ws_port = 0").replace("port = 9870", "port = 0"))
    example.write_text(runnable)
    r = check_config(example)  # (it reads the token files too, as the server would)
    assert r.returncode == 0 and "3 token(s), 1 webhook(s)" in r.stdout, r.stderr
    server = start_api_server(procs, db=tmp_path / "example.db", local_targets=False,
                              extra=["--config", str(example)])
    status = http("GET", f"{server.http_url}/api/status").json()
    assert {t["token"] for t in status["tokens"]} >= {"office-token-00001",
                                                      "partner-reverse-token-0001"}
    detail = http("GET", f"{server.http_url}/api/tokens/partner-connector-0001").json()
    assert detail["policy"] == {"max_clients": 4, "speed_down": 20971520}
    hooks = http("GET", f"{server.http_url}/api/webhooks").json()
    assert "billing" in str(hooks)
