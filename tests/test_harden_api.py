"""State safety of the management plane (issue 9, rows 14 and 15, and the API's part of
items 1, 6 and 7): dates in a sane range and a bad stored date that breaks nothing; one
server per database; counters written as increments; internal errors counted on /metrics;
failed keys logged; hostile requests answered with a 4xx, never a 500.

The process-level facts are checked against real ``trisocks server`` processes."""

from __future__ import annotations

import select
import socket
import sqlite3

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trisocks.management import SQLiteStore
from trisocks.management.keys import FailureLimiter, LogBudget
from trisocks.management.store import Counters, StoreInUse, UserRecord

from .api_support import KEY, http, running_api, start_api_server
from .support.peers import HOST
from .support.tools import clean_env, trisocks_cmd

YEAR_1 = "0001-01-01T00:00:00+01:00"  # year 0 once in UTC
YEAR_9999 = "9999-12-31T23:59:59-01:00"  # year 10000 once in UTC


def sql(db, statement: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=5)
    try:
        with conn:
            return list(conn.execute(statement, params))
    finally:
        conn.close()


def assert_no_traceback(peer) -> None:
    assert "Traceback" not in peer.output(), peer.proc.describe()


# -- row 14: dates -----------------------------------------------------------------------------


def test_dates_outside_the_range_are_422_and_listing_stays_200(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "d.db")
    base = server.http_url
    user = http("POST", f"{base}/api/users", json={"name": "dated"}).json()
    key = user["key"]
    for when in (YEAR_1, YEAR_9999, "1969-12-31T23:59:59Z", "2200-01-01T00:00:01Z"):
        for method, path, body in (("POST", "/api/users", {"name": "x", "expires_at": when}),
                                   ("PUT", f"/api/users/{key}/expiry", {"expires_at": when}),
                                   ("PATCH", f"/api/users/{key}", {"expires_at": when})):
            r = http(method, f"{base}{path}", json=body)
            assert r.status_code == 422, (method, path, when, r.text)
            assert r.json()["field"] == "expires_at" and "2200-01-01" in r.json()["error"]
        r = http("GET", f"{base}/api/events", params={"since": when})
        assert r.status_code == 422 and r.json()["field"] == "since"
    # the bounds themselves are fine
    for when in ("1970-01-01T00:00:00Z", "2200-01-01T00:00:00Z", "2199-12-31T23:00:00-01:00"):
        assert http("PUT", f"{base}/api/users/{key}/expiry", json={"expires_at": when}).status_code == 200
    r = http("GET", f"{base}/api/users")
    assert r.status_code == 200 and [u["name"] for u in r.json()["users"]] == ["dated"]
    assert r.json()["users"][0]["expires_at"] == "2200-01-01T00:00:00Z"
    assert_no_traceback(server)


def test_bad_stored_values_break_neither_listing_nor_restart(procs, tmp_path):
    db = tmp_path / "old.db"
    server = start_api_server(procs, db=db, tokens=["cli-token-000001"])
    base = server.http_url
    for name in ("past", "never", "garbage", "fine"):
        assert http("POST", f"{base}/api/users", json={"name": name}).status_code == 201
    assert server.proc.terminate() is not None
    # what an older trisocks (or a hand edit) may have left in the file
    sql(db, "UPDATE users SET expires_at = ? WHERE name = 'past'", -62135600400.0)
    sql(db, "UPDATE users SET expires_at = ?, last_seen = ? WHERE name = 'never'", 253402304399.0, 1e308)
    sql(db, "UPDATE users SET expires_at = 'soon', created_at = 'x', bytes_up = 'lots', "
            "limit_bytes = -5, status = 'weird' WHERE name = 'garbage'")
    sql(db, "UPDATE tokens SET created_at = 1e300, bytes_down = 'x'")
    sql(db, "UPDATE events SET time = -1e20 WHERE id = (SELECT MIN(id) FROM events)")

    for attempt in range(2):  # and a restart after that is fine too
        again = start_api_server(procs, db=db, tokens=["cli-token-000001"], name=f"again-{attempt}")
        base = again.http_url
        r = http("GET", f"{base}/api/users")
        assert r.status_code == 200, r.text
        users = {u["name"]: u for u in r.json()["users"]}
        assert (users["past"]["expires_at"], users["past"]["blocked"]) == ("1970-01-01T00:00:00Z", "expired")
        assert (users["never"]["expires_at"], users["never"]["blocked"]) == ("2200-01-01T00:00:00Z", None)
        assert users["never"]["last_seen"] == "2200-01-01T00:00:00Z"
        garbage = users["garbage"]
        assert (garbage["blocked"], garbage["status"], garbage["bytes_up"]) == ("disabled", "disabled", 0)
        assert garbage["expires_at"] == "1970-01-01T00:00:00Z"  # not a time: expired, fail closed
        assert users["fine"]["blocked"] is None
        for path in ("/api/users/" + users["past"]["key"], "/api/stats", "/api/events", "/metrics",
                     "/api/status"):
            assert http("GET", f"{base}{path}").status_code == 200, path
        assert "stored time" in again.output() and "WARN" in again.output()
        assert_no_traceback(again)
        assert again.proc.terminate() is not None


# -- row 15: one server per database ----------------------------------------------------------------


def test_a_second_server_on_the_same_database_refuses_to_start(procs, tmp_path):
    db = tmp_path / "state" / "shared.db"
    first = start_api_server(procs, db=db)
    alice = http("POST", f"{first.http_url}/api/users", json={"name": "alice"}).json()
    link = tmp_path / "link.db"
    link.symlink_to(db)  # another name for the same file: refused too
    for i, path in enumerate((db, link)):
        argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "--db", str(path), "-k", KEY]
        second = procs.start(argv, name=f"second-{i}", env=clean_env())
        assert second.wait_exit(30) == 2, second.describe()
        out = second.output()
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and str(path) in errors[0] and "in use by another trisocks server" \
            in errors[0] and "--db" in errors[0], out
        assert "Traceback" not in out and "listening on" not in out
    # the first one goes on serving, with its data intact
    users = http("GET", f"{first.http_url}/api/users").json()["users"]
    assert [(u["name"], u["key"]) for u in users] == [("alice", alice["key"])]
    assert sql(db, "SELECT name, key FROM users") == [("alice", alice["key"])]
    first.proc.terminate()
    again = start_api_server(procs, db=db, name="after-the-first")  # the lock went with it
    assert [u["name"] for u in http("GET", f"{again.http_url}/api/users").json()["users"]] == ["alice"]
    assert_no_traceback(first)


async def test_the_store_lock_and_counters_written_as_increments(tmp_path):
    db = tmp_path / "inc.db"
    store = SQLiteStore(db)
    await store.open()
    with pytest.raises(StoreInUse, match="--db"):
        await SQLiteStore(db).open()
    await store.put_user(UserRecord(id="u1", key="user-key-0001", name="u", created_at=1.0))
    await store.flush([Counters(owner="user", ident="u1", bytes_up=5, bytes_down=7,
                                total_connections=1, last_seen=100.0)], [])
    sql(db, "UPDATE users SET bytes_up = bytes_up + 1000")  # a write we did not make
    await store.flush([Counters(owner="user", ident="u1", bytes_up=5, bytes_down=7,
                                total_connections=1, last_seen=50.0)], [])
    # a change of the user's fields keeps the counters; an older last_seen does not win
    await store.put_user(UserRecord(id="u1", key="user-key-0001", name="renamed", created_at=1.0))
    assert sql(db, "SELECT name, bytes_up, bytes_down, total_connections, last_seen FROM users") == \
        [("renamed", 1010, 14, 2, 100.0)]
    # a key another user has is an error, not a silent replacement of that user
    with pytest.raises(Exception, match="UNIQUE"):
        await store.put_user(UserRecord(id="u2", key="user-key-0001", name="other", created_at=1.0))
    await store.reset_user("u1")
    assert sql(db, "SELECT bytes_up, bytes_down, total_connections FROM users") == [(0, 0, 2)]
    await store.close()
    await (reopened := SQLiteStore(db)).open()  # closing released the lock
    await reopened.close()


async def test_the_flusher_writes_growth_not_totals(tmp_path):
    db = tmp_path / "grow.db"
    async with running_api(store=SQLiteStore(db)) as api:
        user = await api.create_user(name="grows")
        account = api.plane.users[user["key"]]
        account.done_down += 300  # as a finished channel would
        await api.plane._flush()
        sql(db, "UPDATE users SET bytes_down = bytes_down + 1000")  # someone else's bytes
        account.done_down += 20
        await api.plane._flush()
        assert sql(db, "SELECT bytes_down FROM users") == [(1320,)]
        # an API change writes no counters; a reset zeroes them
        r = await api.put(f"/api/users/{user['key']}/limit", json={"limit_bytes": 1 << 30})
        assert r.status_code == 200
        assert sql(db, "SELECT bytes_down FROM users") == [(1320,)]
        assert (await api.post(f"/api/users/{user['key']}/reset")).status_code == 200
        account.done_down += 4
        await api.plane._flush()
        assert sql(db, "SELECT bytes_down FROM users") == [(4,)]


# -- internal errors on /metrics ----------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_show_internal_errors_and_parse(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "m.db")
    r = http("GET", f"{server.http_url}/metrics")
    assert r.status_code == 200
    assert "# TYPE trisocks_internal_errors_total counter" in r.text
    assert metric(r.text, "trisocks_internal_errors_total") == 0
    assert http("GET", f"{server.http_url}/api/stats").json()["internal_errors"] == 0


async def test_an_internal_error_ends_one_request_and_is_counted(monkeypatch):
    async with running_api() as api:
        before = metric((await api.get("/metrics")).text, "trisocks_internal_errors_total")

        def broken():
            raise RuntimeError("a bug")

        monkeypatch.setattr(api.plane, "list_users", broken)
        r = await api.get("/api/users")
        assert (r.status_code, r.json()) == (500, {"success": False, "error": "internal error"})
        after = metric((await api.get("/metrics")).text, "trisocks_internal_errors_total")
        assert after == before + 1
        assert (await api.get("/api/stats")).json()["internal_errors"] == after
        assert (await api.get("/api/status")).status_code == 200  # the next request is fine


# -- failed keys are logged ---------------------------------------------------------------------------


def test_failed_keys_are_logged_with_the_address_and_a_lockout_once(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "k.db")
    base = server.http_url
    wrong = "wrong-key-do-not-log-me"
    for n in range(1, 4):
        assert http("GET", f"{base}/api/users", key=wrong).status_code == 401
        server.proc.wait_for(lambda n=n: server.output().count("wrong or missing API key from 127.0.0.1")
                             == n, f"{n} warnings")
    assert http("GET", f"{base}/api/subscribe/no-such-user-key").status_code == 404
    server.proc.wait_for(lambda: "unknown user key in /api/subscribe from 127.0.0.1" in server.output(),
                         "the unknown user key logged")
    statuses = [http("GET", f"{base}/api/users", key=wrong).status_code for _ in range(10)]
    assert statuses == [401] * 6 + [429] * 4  # 10 failures, then locked out
    server.proc.wait_for(lambda: "127.0.0.1 is locked out for" in server.output(), "the lock-out")
    assert http("GET", f"{base}/api/users", key=wrong).status_code == 429
    out = server.output()
    assert out.count("wrong or missing API key from 127.0.0.1") == 9
    assert out.count("is locked out for") == 1 and "WARN" in out
    assert wrong not in out and KEY not in out


def test_the_log_budget_drops_lines_and_says_how_many():
    now = [0.0]
    budget = LogBudget(lines=2, period=60, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 60.0
    assert budget.take() == 3 and budget.take() == 0 and budget.take() is None


async def test_the_caller_address_is_what_is_counted_and_the_hook_can_change_it():
    limiter = FailureLimiter(max_failures=2)
    async with running_api(limiter=limiter) as api:
        seen = []

        def resolve(peer, headers):  # what --trusted-proxy will do: the forwarded address
            seen.append(peer)
            return headers.get("x-test-client", peer)

        api.plane.resolve_client = resolve
        for _ in range(2):
            r = await api.anon.get("/api/users", headers={"X-Test-Client": "192.0.2.7"})
            assert r.status_code == 401
        assert limiter.retry_after("192.0.2.7") > 0 and limiter.retry_after("127.0.0.1") == 0
        assert seen and set(seen) == {"127.0.0.1"}
        assert (await api.get("/api/users")).status_code == 200  # the local admin is not locked out


@pytest.mark.parametrize("api_bind", [False, True], ids=["tunnel-port", "api-bind"])
def test_behind_a_trusted_proxy_failures_count_against_the_forwarded_client(procs, tmp_path, api_bind):
    extra = ["--trusted-proxy", "127.0.0.1/32", "--api-allow-remote"]
    if api_bind:
        extra += ["--api-bind", "127.0.0.1:0"]
    server = start_api_server(procs, db=tmp_path / "p.db", extra=extra)
    base = server.http_url
    if api_bind:
        base = server.proc.wait_for_log(r"management API listening on (http://[0-9.:]+)").group(1)
    wrong = "wrong-key-behind-proxy"
    fwd = {"X-Forwarded-For": "198.51.100.7"}
    statuses = [http("GET", f"{base}/api/users", key=wrong, headers=fwd).status_code for _ in range(11)]
    assert statuses == [401] * 10 + [429]
    # another client of the same proxy, and the proxy's own address, are not locked out
    other = {"X-Forwarded-For": "198.51.100.8"}
    assert http("GET", f"{base}/api/users", key=wrong, headers=other).status_code == 401
    assert http("GET", f"{base}/api/users", headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 200
    assert http("GET", f"{base}/api/users").status_code == 200
    server.proc.wait_for(lambda: "198.51.100.7 is locked out for" in server.output(), "the lock-out")
    out = server.output()
    assert "wrong or missing API key from 198.51.100.7" in out
    assert "wrong or missing API key from 198.51.100.8" in out
    assert "key from 127.0.0.1" not in out


# -- hostile requests: a 4xx, never a 500 ---------------------------------------------------------------


def test_hostile_requests_get_4xx_and_the_server_goes_on(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "h.db")
    base = server.http_url
    user = http("POST", f"{base}/api/users", json={"name": "target"}).json()
    big = b'{"name": "' + b"a" * (2 << 20) + b'"}'

    def chunks():
        for _ in range(32):
            yield b"a" * 65536

    cases = [
        # bodies over 1 MiB, with a length and chunked
        (413, "POST", "/api/users", {"content": big, "headers": {"Content-Type": "application/json"}}),
        (413, "POST", "/api/token", {"content": chunks()}),
        # deep nesting, in place of an object and inside a field
        (422, "POST", "/api/users", {"content": b"[" * 500_000}),
        (422, "POST", "/api/users", {"content": b'{"name": ' + b"[" * 500_000}),
        (422, "POST", "/api/token", {"content": b'{"type": "forward", "x": ' + b"{" * 200_000}),
        # long names and out-of-range numbers
        (422, "POST", "/api/users", {"json": {"name": "n" * 10_000}}),
        (422, "POST", "/api/users", {"json": {"key": "k" * 100_000}}),
        (422, "POST", "/api/users", {"json": {"limit_bytes": 10**30}}),
        (422, "GET", "/api/events", {"params": {"limit": "9" * 400}}),
        (422, "GET", "/api/events", {"params": {"limit": "-1"}}),
        (422, "POST", "/api/token", {"json": {"type": "reverse", "username": "é" * 200,
                                              "password": "p"}}),
        (422, "POST", "/api/token", {"json": {"type": "reverse", "username": "u",
                                              "password": "p" * 256}}),
        (400, "POST", "/api/token", {"json": {"type": "forward", "token": "t" * 300}}),
    ]
    for status, method, path, kw in cases:
        r = http(method, f"{base}{path}", **kw)
        assert r.status_code == status, (method, path, r.status_code, r.text[:200])
        assert r.json()["success"] is False
    # a Host header that makes no URL: the bound address is used instead
    for host in ("x:99999", "[::1", "a@b", "[:::::]:80"):
        r = http("GET", f"{base}/api/subscribe/{user['key']}", key=None, headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
        assert r.json()["server"] == server.url
    assert http("GET", f"{base}/api/users").status_code == 200
    metrics = http("GET", f"{base}/metrics").text
    assert metric(metrics, "trisocks_internal_errors_total") == 0
    assert_no_traceback(server)


def endless_chunked_body(port: int) -> tuple[bytes, int]:
    """POST a chunked body that never ends; returns the answer and how much was sent when
    the server stopped reading (it answers, then closes)."""
    with socket.create_connection((HOST, port), timeout=20) as sock:
        sock.sendall(b"POST /api/users HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"a" * 65536 + b"\r\n"
        answer, sent = b"", 0
        sock.setblocking(False)
        while sent < 64 << 20 and b"}\n" not in answer:
            readable, writable, _ = select.select([sock], [sock], [], 20)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                try:
                    sent += sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
        return answer, sent


def test_the_body_limit_holds_for_bodies_that_never_say_their_length(procs, tmp_path):
    server = start_api_server(procs, db=tmp_path / "b.db")
    answer, sent = endless_chunked_body(server.port)
    assert answer.startswith(b"HTTP/1.1 413") and b"request body too large" in answer, answer
    assert sent < 4 << 20
    assert http("GET", f"{server.http_url}/api/users").status_code == 200
