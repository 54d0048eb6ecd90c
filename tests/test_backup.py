"""Backup, restore and upgrade of the server's database (issue 16 item 7), against real processes.

* ``trisocks backup`` copies the database of a running server while the API writes to it; the
  copy is 0600 and consistent; a restore (stop, copy it into place, start) brings back the users,
  tokens and counters as they were at the backup, and nothing of what came later.
* Its mistakes: no database, OUT exists (no --force), not a database, a missing directory.
* Upgrade: tests/data/trisocks-0.1.0.db was written by the 0.1.0 code itself (schema 1,
  scripts/make_old_db.py, tests/data/README.md). Today's server starts on a copy: every user,
  token, counter and event is there, the schema is the current one, alice's key still works,
  and the 0.1.0 code then refuses the file instead of misreading it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

from trisocks.management.store import SCHEMA_VERSION

from .api_support import KEY, MiB, http, start_api_server
from .support.curl import curl
from .support.peers import start_trisocks_client
from .support.procs import POLL
from .support.tools import clean_env, trisocks_cmd

ROOT = Path(__file__).resolve().parent.parent
OLD_DB = ROOT / "tests" / "data" / "trisocks-0.1.0.db"
OLD_COMMIT = "6bfe335"
LINE = re.compile(r"^backed up (\S+) to (\S+): schema (\d+), (\d+) user\(s\), (\d+) token\(s\), "
                  r"(\d+) event\(s\), (\d+) KiB$")


def backup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*trisocks_cmd(), "backup", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=env or clean_env())


def rows(path, sql: str) -> list[tuple]:
    # read-write (never created): a read-only connection to a WAL file leaves -wal and -shm
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def wait_until(condition, what: str, timeout: float = 10.0):
    import time

    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)
    return result


def users_of(base: str) -> dict[str, dict]:
    return {u["name"]: u for u in http("GET", f"{base}/api/users").json()["users"]}


COUNTED = ("key", "id", "bytes_up", "bytes_down", "total_connections", "limit_bytes",
           "expires_at", "status")


def test_backup_of_a_running_server_and_a_restore(procs, tmp_path, payload_server):
    state = tmp_path / "state"
    db = state / "trisocks.db"
    server = start_api_server(procs, db=db)
    base = server.http_url
    assert http("POST", f"{base}/api/token", json={"type": "forward",
                                                   "token": "fwd-backup-0001"}).json()["success"]
    alice = http("POST", f"{base}/api/users", json={"name": "alice", "limit_bytes": 64 * MiB}).json()
    http("POST", f"{base}/api/users", json={"name": "bob", "status": "disabled"})
    upload = tmp_path / "up.bin"
    upload.write_bytes(os.urandom(300_000))
    for token in (alice["key"], "fwd-backup-0001"):
        client = start_trisocks_client(procs, server.url, token, name="client")
        curl(payload_server.url(f"/bytes/{MiB}"), socks=client.socks).check(200)
        curl(payload_server.url("/upload"), socks=client.socks, upload=str(upload)).check(200)
        client.proc.terminate()
    live = users_of(base)
    assert live["alice"]["bytes_down"] > MiB and live["alice"]["bytes_up"] > 300_000
    # the flusher writes the counters within a second: wait until the file has them
    wait_until(lambda: rows(db, "SELECT bytes_down FROM users WHERE name = 'alice'")[0][0]
               == live["alice"]["bytes_down"], "alice's counters in the database")
    stats = {t["token"]: t for t in http("GET", f"{base}/api/stats").json()["tokens"]}
    # ...and the token's, whose traffic came after alice's (a flush may have taken hers alone)
    wait_until(lambda: rows(db, "SELECT bytes_up, bytes_down FROM tokens WHERE token = "
                                "'fwd-backup-0001'")[0] == (stats["fwd-backup-0001"]["bytes_up"],
                                                           stats["fwd-backup-0001"]["bytes_down"]),
               "the token's counters in the database")

    # back up while the API keeps writing (users created in a loop)
    stop = threading.Event()
    made: list[int] = []

    def writer():
        while not stop.is_set():
            made.append(http("POST", f"{base}/api/users",
                             json={"name": f"busy-{len(made):04d}"}).status_code)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(made) >= 5, "the writer to get going")
        out = tmp_path / "backups" / "during.db"
        out.parent.mkdir()
        done = backup("--db", db, out)
        seen_at_backup = len(made)
    finally:
        stop.set()
        thread.join()
    assert set(made) == {201}
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    line = LINE.match(done.stdout.strip())
    assert line and len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert (line[1], line[2], int(line[3])) == (str(db), str(out), SCHEMA_VERSION)
    assert int(line[4]) >= 2 + 5 and int(line[5]) == 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["during.db"]  # no side files left
    assert rows(out, "PRAGMA quick_check") == [("ok",)]
    assert rows(out, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
    busy_in_copy = rows(out, "SELECT count(*) FROM users WHERE name LIKE 'busy-%'")[0][0]
    assert 5 <= busy_in_copy <= seen_at_backup + 1

    # OUT exists: refused without --force, replaced with it; a directory gets a dated name
    forced = tmp_path / "backups" / "forced.db"
    assert backup("--db", db, forced).returncode == 0
    again = backup("--db", db, forced)
    assert again.returncode == 2 and f"{forced} exists" in again.stderr and "--force" in again.stderr
    assert backup("--db", db, forced, "--force").returncode == 0
    (tmp_path / "dated").mkdir()
    dated = backup("--db", db, tmp_path / "dated")
    assert dated.returncode == 0, dated.stderr
    assert re.search(r" to \S+/dated/trisocks-\d{8}-\d{6}\.db: ", dated.stdout), dated.stdout
    assert len(list((tmp_path / "dated").iterdir())) == 1

    # later changes, which the restore must undo
    http("POST", f"{base}/api/users", json={"name": "after-backup"})
    http("DELETE", f"{base}/api/users/{alice['key']}")
    server.proc.terminate()
    assert server.proc.returncode == 0

    # restore as docs/deploy.md says: stopped server, side files gone, the copy in place
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    shutil.copy(out, db)
    os.chmod(db, 0o600)
    restored = start_api_server(procs, db=db, name="api-server-restored")
    base = restored.http_url
    after = users_of(base)
    assert "after-backup" not in after
    for name in ("alice", "bob"):
        assert {k: after[name][k] for k in COUNTED} == {k: live[name][k] for k in COUNTED}, name
    assert len([n for n in after if n.startswith("busy-")]) == busy_in_copy
    after_stats = {t["token"]: t for t in http("GET", f"{base}/api/stats").json()["tokens"]}
    for k in ("bytes_up", "bytes_down", "total_connections"):
        assert after_stats["fwd-backup-0001"][k] == stats["fwd-backup-0001"][k] > 0, k
    # and the restored key works
    client = start_trisocks_client(procs, restored.url, alice["key"], name="client-after")
    curl(payload_server.url(f"/bytes/{MiB}"), socks=client.socks).check(200)


def test_backup_mistakes_are_named(tmp_path):
    # no database: a usage error, nothing created
    missing = backup("--db", tmp_path / "none.db", tmp_path / "out.db")
    assert missing.returncode == 2
    assert f"no database at {tmp_path / 'none.db'}" in missing.stderr and "--db" in missing.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "out.db").exists()
    # the default is the server's: TRISOCKS_DB, then XDG_STATE_HOME
    env = clean_env({"XDG_STATE_HOME": str(tmp_path / "xdg")})
    default = backup(tmp_path / "out.db", env=env)
    assert default.returncode == 2
    assert str(tmp_path / "xdg" / "trisocks" / "trisocks.db") in default.stderr
    # a missing directory for OUT
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all, but long enough to have a header..." * 4)
    nodir = backup("--db", junk, tmp_path / "no" / "such" / "out.db")
    assert nodir.returncode == 2 and "does not exist" in nodir.stderr
    # not a database: a failure, and nothing left behind
    bad = backup("--db", junk, tmp_path / "out.db")
    assert bad.returncode == 1 and "failed: file is not a database" in bad.stderr, bad.stderr
    # a SQLite file that is not trisocks's
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    foreign = backup("--db", other, tmp_path / "out.db")
    assert foreign.returncode == 1 and "not a trisocks database" in foreign.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db", "other.db"]
    # the database itself as OUT
    db = tmp_path / "db" / "trisocks.db"
    db.parent.mkdir()
    shutil.copy(OLD_DB, db)
    same = backup("--db", db, db, "--force")
    assert same.returncode == 2 and "is the database itself" in same.stderr
    # TRISOCKS_DB is the default, as for the server
    env = clean_env({"TRISOCKS_DB": str(db)})
    ok = backup(tmp_path / "copy.db", env=env)
    assert ok.returncode == 0 and ": schema 1, 3 user(s), 5 token(s), " in ok.stdout, ok.stdout
    assert sorted(p.name for p in db.parent.iterdir()) == ["trisocks.db"]  # no -wal/-shm made


def test_a_database_of_0_1_0_is_migrated_at_start(procs, tmp_path, payload_server):
    manifest = json.loads(OLD_DB.with_suffix(".json").read_text())
    db = tmp_path / "state" / "trisocks.db"
    db.parent.mkdir(mode=0o700)
    shutil.copy(OLD_DB, db)
    os.chmod(db, 0o600)
    assert manifest["schema"] == 1 and rows(db, "PRAGMA user_version") == [(1,)]
    cli_tokens = [t["token"] for t in manifest["tokens"] if t["origin"] == "cli"]
    server = start_api_server(procs, db=db, tokens=cli_tokens)
    assert "database: tokens.policy added" in server.output()
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    base = server.http_url

    users = {u["key"]: u for u in http("GET", f"{base}/api/users").json()["users"]}
    assert sorted(users) == sorted(u["key"] for u in manifest["users"])
    for old in manifest["users"]:
        new = users[old["key"]]
        for k in ("id", "name", "limit_bytes", "status", "bytes_up", "bytes_down",
                  "total_connections"):
            assert new[k] == old[k], (old["name"], k, new[k], old[k])
        assert (new["expires_at"] is None) == (old["expires_at"] is None)
    alice = users["alice-key-0001"]
    assert [alice["bytes_up"], alice["bytes_down"]] == manifest["traffic"]["alice-key-0001"]
    assert alice["expires_at"].startswith("2099-01-01T00:00:00")

    status = {t["token"]: t for t in http("GET", f"{base}/api/status").json()["tokens"]}
    stats = {t["token"]: t for t in http("GET", f"{base}/api/stats").json()["tokens"]}
    for old in manifest["tokens"]:
        if old["kind"] == "connector":  # listed under its reverse token, as LinkSocks does
            assert old["token"] in status[old["reverse_token"]]["connector_tokens"]
        else:
            assert status[old["token"]]["type"] == old["kind"], old["token"]
        for k in ("bytes_up", "bytes_down", "total_connections"):
            assert stats[old["token"]][k] == old[k], (old["token"], k)
    assert [stats["old-forward-api-0001"][k] for k in ("bytes_up", "bytes_down")] == \
        manifest["traffic"]["old-forward-api-0001"]
    rev = next(t for t in manifest["tokens"] if t["kind"] == "reverse")
    assert status[rev["token"]]["port"] > 0

    events = http("GET", f"{base}/api/events", params={"limit": 1000}).json()["events"]
    assert [e["type"] for e in events][:len(manifest["events"])] == manifest["events"]

    # the old credentials work: alice's key carries traffic, counted on top of the old figures
    client = start_trisocks_client(procs, server.url, "alice-key-0001", name="client-alice")
    curl(payload_server.url("/bytes/1000"), socks=client.socks).check(200)
    client.proc.terminate()
    server.proc.terminate()
    assert server.proc.returncode == 0
    down = rows(db, "SELECT bytes_down FROM users WHERE key = 'alice-key-0001'")[0][0]
    assert down > alice["bytes_down"]

    # a backup of the migrated file says so, and the 0.1.0 code refuses it rather than misread it
    done = backup("--db", db, tmp_path / "after.db")
    assert done.returncode == 0 and f": schema {SCHEMA_VERSION}, 3 user(s), 5 token(s), " in done.stdout
    old_src = _old_tree(tmp_path)
    if old_src is not None:
        env = clean_env({"PYTHONPATH": str(old_src), "TRISOCKS_PURE": "1"})
        env.pop("TRISOCKS_REQUIRE_COMPILED", None)
        old = subprocess.run([sys.executable, "-m", "trisocks", "server", "-H", "127.0.0.1",
                              "-P", "0", "-k", KEY, "--db", str(db)],
                             capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        assert old.returncode == 1, old.stderr
        assert f"was written by a newer trisocks (schema {SCHEMA_VERSION}, this one knows 1)" \
            in old.stderr


def _old_tree(tmp_path: Path) -> Path | None:
    """The 0.1.0 package, from git (None outside a clone that has that commit)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return None
    archive = subprocess.run([git, "archive", "--format=tar", OLD_COMMIT, "src"], cwd=ROOT,
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True, timeout=60)
    return tmp_path / "src"
