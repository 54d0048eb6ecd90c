"""Logs operators can use (issue 16 item 4, docs/logging.md): JSON lines with the documented
fields, the access log's byte counts, a log file moved away by logrotate, and a flood of
failed logins that writes a few lines instead of filling the disk.

Real server and client processes throughout; the formatter and the limiter are also
checked alone, with a clock of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

from trisocks.cli.logs import JsonFormatter, Limiter, parse_limit, rfc3339
from trisocks.net.access import text_value
from trisocks.wire import protocol
from trisocks.wire.codec import OP_BINARY, encode_frame

from .support.curl import curl
from .support.payload import payload_sha256
from .support.peers import HOST, start_trisocks_client, start_trisocks_server, trisocks_server_argv
from .support.socks import handshake

MiB = 1 << 20
TOKEN = "logs-test-token-0123456789"
TOKEN_ID = hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
ACCESS_FIELDS = ("user", "token_id", "role", "client", "target", "up", "down", "duration", "end")


# -- helpers ----------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON: a line that does not parse fails the test."""
    out = []
    for line in text.splitlines():
        assert line.strip(), "an empty line in a JSON log"
        try:
            out.append(json.loads(line))
        except ValueError as exc:
            raise AssertionError(f"not JSON ({exc}): {line!r}") from None
    return out


def assert_documented(record: dict) -> None:
    assert TIME.match(record["time"]), record
    assert record["level"] in LEVELS, record
    assert record["logger"].startswith("trisocks"), record
    assert isinstance(record["message"], str) and record["message"], record


def wrong_token(port: int, source: str = "127.0.0.1", token: str = "wrong-token-abcdef") -> None:
    """One failed authentication: upgrade, an Auth with a token the server does not know, and
    the refusal read back (so the server has logged it by the time this returns)."""
    with socket.create_connection((HOST, port), timeout=10, source_address=(source, 0)) as s:
        auth = protocol.pack(protocol.Auth(token, False, os.urandom(16)))
        s.sendall((f"GET /socket HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
                  + encode_frame(OP_BINARY, auth, int.from_bytes(os.urandom(4), "big")))
        got = b""
        while b"invalid token" not in got:
            data = s.recv(4096)
            assert data, f"closed before the refusal: {got[:300]!r}"
            got += data
        assert got.startswith(b"HTTP/1.1 101"), got[:200]


def start_logged_server(procs, log_file: Path, extra=()):
    """A server logging to ``log_file`` only: ready once the file says where it listens."""
    argv = trisocks_server_argv([TOKEN], 0, extra=["--log-file", str(log_file), *extra])
    proc = procs.start(argv, name="trisocks-server")
    ready = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    match = proc.wait_for(lambda: log_file.exists() and ready.search(log_file.read_text()),
                          f"{log_file} to say the server listens")
    port = int(match.group(1))
    proc.wait_for_port(port, HOST)
    assert "listening on" not in proc.stderr(), "the log went to stderr too"
    return proc, port


class EchoTarget:
    """A TCP target with exact counts: reads until the client's EOF, then answers ``reply``
    bytes and closes."""

    def __init__(self, reply: int) -> None:
        self.reply = reply
        self.received = None
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
            self.received = total
            conn.sendall(b"x" * self.reply)

    def close(self) -> None:
        self.sock.close()


# -- JSON lines -------------------------------------------------------------------------------


def test_json_lines_parse_and_carry_the_documented_fields(procs, payload_server):
    server = start_trisocks_server(procs, tokens=[TOKEN],
                                   extra=["--log-format", "json", "--access-log", "-"])
    client = start_trisocks_client(procs, server.url, TOKEN, extra=["--log-format", "json"])
    curl(payload_server.bytes_url(64 << 10), socks=client.socks).check()
    wrong_token(server.port)
    server.proc.wait_for(lambda: '"channel"' in server.proc.stdout(), "the access log line")
    client.proc.terminate()
    assert server.proc.terminate() == 0

    logs = json_lines(server.proc.stderr()) + json_lines(client.proc.stderr())
    for record in logs:
        assert_documented(record)
    messages = [r["message"] for r in logs]
    assert any("authentication failed from 127.0.0.1:" in m for m in messages), messages
    assert any(r["level"] == "WARNING" for r in logs)
    assert any(r["logger"] == "trisocks.client" and "SOCKS5 proxy listening" in r["message"]
               for r in logs)

    (access,) = json_lines(server.proc.stdout())
    assert_documented(access)
    assert access["logger"] == "trisocks.access" and access["event"] == "channel"
    assert set(ACCESS_FIELDS) <= set(access), access
    assert access["token_id"] == TOKEN_ID and access["user"] is None
    assert access["role"] == "forward"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", access["client"]), access
    assert access["target"] == payload_server.netloc
    assert access["down"] > 64 << 10 and 0 < access["up"] < 1024
    assert isinstance(access["duration"], float) and access["end"] == "eof"
    # the message is the same record as text
    assert access["message"].startswith(f"user=- token_id={TOKEN_ID} role=forward client=")

    everything = server.proc.output() + client.proc.output()
    assert TOKEN not in everything, "a token in the logs"


def test_json_formatter_alone():
    record = logging.LogRecord("trisocks.server", logging.WARNING, __file__, 1, "from %s", ("x",), None)
    record.created = 1714564800.1234
    record.event, record.peer = "auth_failure", "10.0.0.1:5"
    line = JsonFormatter().format(record)
    assert json.loads(line) == {"time": "2024-05-01T12:00:00.123Z", "level": "WARNING",
                                "logger": "trisocks.server", "message": "from x",
                                "event": "auth_failure", "peer": "10.0.0.1:5"}
    try:
        raise ValueError("boom \udcff")
    except ValueError:
        import sys

        record = logging.LogRecord("trisocks", logging.ERROR, __file__, 1, "bad", (), sys.exc_info())
    parsed = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in parsed["exception"]
    assert rfc3339(0.999) == "1970-01-01T00:00:00.999Z"
    assert text_value("connection reset by peer") == '"connection reset by peer"'
    assert text_value("eof") == "eof" and text_value(None) == "-" and text_value(3) == "3"
    assert text_value(0.04) == "0.040"


# -- the access log -------------------------------------------------------------------------


def test_access_log_counts_the_bytes_of_each_transfer(procs, payload_server, tmp_path):
    access = tmp_path / "access.log"
    server = start_trisocks_server(procs, tokens=[TOKEN], extra=["--access-log", str(access)])
    client = start_trisocks_client(procs, server.url, TOKEN)

    # exact counts both ways: N bytes up, then EOF, then M bytes back
    up, down = MiB + 7, 3 * MiB + 11
    target = EchoTarget(down)
    try:
        hs = handshake(("127.0.0.1", client.port), HOST, target.port, keep_open=True)
        assert hs.reply == 0, hs
        with hs.sock as s:
            s.sendall(b"u" * up)
            s.shutdown(socket.SHUT_WR)
            got = 0
            while data := s.recv(1 << 16):
                got += len(data)
        assert got == down and target.received == up
    finally:
        target.close()

    # a 3 MiB download: the response is the body and the head curl saw
    head = tmp_path / "head"
    size = 3 * MiB
    r = curl(payload_server.bytes_url(size, seed=3), socks=client.socks,
             extra=["--dump-header", str(head)]).check()
    assert (r.size, r.sha256) == (size, payload_sha256(size, seed=3))

    lines = server.proc.wait_for(
        lambda: (lines := access.read_text().splitlines()) and len(lines) >= 2 and lines,
        "two access log lines")
    assert len(lines) == 2, lines
    fields = [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]
    for line, f in zip(lines, fields, strict=True):
        assert TIME.match(line.split(" ", 1)[0]), line
        assert f["token_id"] == TOKEN_ID and f["user"] == "-" and f["end"] == "eof", line
        assert re.fullmatch(r"\d+\.\d{3}", f["duration"]), line
    echo, download = fields
    assert echo["target"] == f"127.0.0.1:{target.port}"
    assert (int(echo["up"]), int(echo["down"])) == (up, down), lines[0]
    assert int(download["down"]) == size + head.stat().st_size, (lines[1], head.read_bytes())
    assert 0 < int(download["up"]) < 1024
    assert TOKEN not in access.read_text()


# -- the log file -----------------------------------------------------------------------------


def test_moved_log_file_is_followed_by_a_new_one(procs, tmp_path):
    log_file = tmp_path / "trisocks.log"
    proc, port = start_logged_server(procs, log_file)
    wrong_token(port, "127.0.0.2")
    proc.wait_for(lambda: "from 127.0.0.2:" in log_file.read_text(), "the first failure logged")
    rotated = tmp_path / "trisocks.log.1"
    log_file.rename(rotated)  # what logrotate does (create mode); no signal is sent
    wrong_token(port, "127.0.0.3")
    proc.wait_for(lambda: log_file.exists() and "from 127.0.0.3:" in log_file.read_text(),
                  "the next line in a new file")
    assert "127.0.0.3" not in rotated.read_text()
    assert "127.0.0.2" not in log_file.read_text()
    # appended, never truncated: a restart adds to the file
    before = log_file.read_text()
    assert proc.terminate() == 0
    assert log_file.read_text().startswith(before)


def test_unwritable_log_file_is_a_usage_error(procs, tmp_path):
    proc = procs.start(trisocks_server_argv([TOKEN], 0, extra=[
        "--log-file", str(tmp_path / "missing" / "x.log")]), name="trisocks-server")
    assert proc.wait_exit() == 2
    assert "--log-file" in proc.stderr() and "No such file or directory" in proc.stderr()


# -- floods -----------------------------------------------------------------------------------

FLOOD_ATTEMPTS = 3000
FLOOD_LOG_MAX = 32 << 10  # the stated bound: docs/logging.md


def test_a_flood_of_failed_logins_does_not_fill_the_disk(procs, tmp_path):
    """Wrong tokens from ever new addresses (so the per-address lock-out never stops them):
    each is a WARNING line, but with the default --log-limit only 50 of them are written,
    then one line with the count of the rest."""
    log_file = tmp_path / "trisocks.log"
    proc, port = start_logged_server(procs, log_file, extra=["--log-format", "json"])
    started = time.monotonic()
    for i in range(FLOOD_ATTEMPTS):
        wrong_token(port, f"127.2.{i // 250}.{i % 250 + 1}")
    flood_seconds = time.monotonic() - started
    assert proc.alive()
    during = log_file.stat().st_size
    assert proc.terminate() == 0  # the held-back count is written at exit at the latest
    size = log_file.stat().st_size
    records = json_lines(log_file.read_text())
    for record in records:
        assert_documented(record)
    failed = [r for r in records if r["message"].startswith("authentication failed")]
    summaries = [r for r in records if r.get("event") == "log_suppressed"]
    # unlimited, the flood would have written one such line per attempt
    shortest = min(len(json.dumps(r, separators=(",", ":"))) for r in failed)
    assert FLOOD_ATTEMPTS * shortest > 4 * FLOOD_LOG_MAX
    assert size < FLOOD_LOG_MAX, f"{size} bytes of log after {FLOOD_ATTEMPTS} failures"
    assert during <= size
    assert summaries, "no line says how many were held back"
    held = sum(r["suppressed"] for r in summaries if r["source_logger"] == "trisocks.server"
               and r["template"].startswith("authentication failed"))
    assert len(failed) + held == FLOOD_ATTEMPTS, (len(failed), held, flood_seconds)
    assert len(failed) <= 50 * (int(flood_seconds // 10) + 2)  # 50 per window of 10 s
    assert all(r["level"] == "WARNING" for r in summaries)
    assert re.search(r"suppressed \d+ more WARNING lines of trisocks\.server within 10 s, the "
                     r"last: authentication failed from 127\.2\.", summaries[-1]["message"])


def test_limiter_windows_with_its_own_clock():
    now = [100.0]
    limiter = Limiter(3, 10.0, clock=lambda: now[0])
    out: list[logging.LogRecord] = []
    limiter.sink = out.append

    def rec(msg: str, *args, name: str = "trisocks.server") -> bool:
        return limiter.filter(logging.LogRecord(name, logging.WARNING, "", 0, msg, args, None))

    assert [rec("failed from %s", i) for i in range(5)] == [True] * 3 + [False] * 2
    assert rec("other %s", 1) and rec("failed from %s", 9, name="trisocks.client")
    assert out == []
    now[0] += 10.0
    assert rec("failed from %s", 5)  # a new window: its summary comes first
    (summary,) = out
    assert summary.getMessage() == ("suppressed 2 more WARNING lines of trisocks.server within "
                                    "10 s, the last: failed from 4")
    assert (summary.suppressed, summary.template) == (2, "failed from %s")
    assert limiter.suppressed_total == 2
    assert [rec("failed from %s", i) for i in range(3)] == [True, True, False]
    limiter.flush()  # at exit
    assert out[-1].suppressed == 1
    assert parse_limit("50/10") == (50, 10.0) and parse_limit("0") is None
    for bad in ("5", "0/10", "5/0", "x/1"):
        try:
            parse_limit(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
