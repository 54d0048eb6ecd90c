"""The attack suite, short form (``make fuzz`` is the long form: scripts/fuzz.py).

Every listener of a real server (forward, with the management API), client, reverse server and
provider gets generated hostile input (tests/support/attack.py) while another user downloads
100 MiB through the client and 100 MiB through the reverse port. Afterwards: every process
alive, both downloads intact (sha256), RSS under attack.RSS_BOUND_MIB, no traceback in a log.
Seeds are fixed (derandomize), so a failure here is reproducible; the long form is random.

Every input class runs, those of issue 9's rows too (attack.KNOWN_CLASSES names them; the long
form can leave them out with --without-known). Each row also has a reduced input of its own
(test_issue9_row); a row still open on the tree is marked ``attack_known``.

The sans-IO parsers get coverage-guided fuzzing with atheris (tests/fuzz/parsers.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import attack
from .support.attack import MiB
from .support.payload import payload_bytes

PARSERS = Path(__file__).parent / "fuzz" / "parsers.py"
# inputs per listener in the short form: about 45-60 s of attack on the 2-core reference machine
EXAMPLES = int(os.environ.get("TRISOCKS_FUZZ_EXAMPLES", "120"))


@pytest.fixture
def stack(procs, tmp_path, payload_server):
    s = attack.start_stack(procs, tmp_path, payload_server)
    try:
        yield s
    finally:
        s.udp_echo.close()


def attack_all(stack: attack.Stack, *, known: bool, examples: int, planned: float) -> None:
    transfers = [
        attack.Transfer(stack.payload, stack.client.socks, seconds=planned,
                        proxy_user=f"{attack.SOCKS_USER}:{attack.SOCKS_PASS}", name="forward-100MiB"),
        attack.Transfer(stack.payload, f"{attack.HOST}:{stack.reverse_socks}", seconds=planned,
                        seed=8, name="reverse-100MiB"),
    ]
    monitor = attack.Monitor(stack)
    monitor.start()
    tally = attack.Tally()
    t0 = time.monotonic()
    for t in transfers:
        t.start()
        t.stop()  # one download each: stop after the first
    failure: BaseException | None = None
    try:
        for listener in attack.LISTENERS:
            attack.run_campaign(stack, tally, listener, known=known, max_examples=examples,
                                derandomize=True)
    except (attack.ProcessDied, attack.ServerError) as exc:
        failure = exc
    finally:
        for t in transfers:
            t.join(planned * 3 + 120)
        monitor.stop()
    report = attack.summary(stack, tally, monitor, time.monotonic() - t0, transfers)
    print(report)
    problems = attack.verdict(stack, transfers, monitor)
    if failure is not None:
        problems.insert(0, str(failure))
    assert not problems, report + "\n\n" + "\n\n".join(problems)


def test_attack_every_listener(stack):
    """The CI gate: all listeners, every input class (those of issue 9's rows included)."""
    attack_all(stack, known=True, examples=EXAMPLES, planned=40)


# -- sans-IO parsers, coverage-guided -----------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
@pytest.mark.parametrize(("target", "runs"), [("decoder", 40000), ("protocol", 300000),
                                              ("socks5", 300000)])
def test_parsers_atheris(target, runs, tmp_path):
    """libFuzzer (through atheris) on one parser for a fixed seed and number of runs: only the
    documented errors, and the pure and compiled decoders agree (see tests/fuzz/parsers.py)."""
    env = dict(os.environ, FUZZ_TARGET=target)
    proc = subprocess.run(
        [sys.executable, str(PARSERS), "-seed=1", f"-runs={runs}", "-max_total_time=30",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    done = re.search(r"^Done (\d+) runs", out, re.MULTILINE)
    # a loaded machine may hit the time cap first; a quarter of the runs still says something
    assert done and int(done.group(1)) >= runs // 4, out[-3000:]



# -- issue 9's rows, one input each, against the same processes ----------------------------------


def _alive_and_serving(stack: attack.Stack) -> None:
    assert not stack.dead(), {n: p.describe() for n, p in stack.processes().items() if not p.alive()}
    from .test_faults import short_request
    assert short_request(stack.client.port, stack.payload.port, auth=attack.AUTH), "client stopped"
    assert short_request(stack.reverse_socks, stack.payload.port), "reverse port stopped"


def _row1_credentials(stack):
    for port, src in ((stack.client.port, "127.0.0.9"), (stack.reverse_socks, "127.0.0.10")):
        s = attack.connect(port, src)
        s.sendall(b"\x05\x01\x02" + b"\x01\x02\xff\xfe\x02\xff\xff")
        attack.drain(s, 1.0)
        s.close()


def _row2_resets(stack):
    target = b"\x01" + socket.inet_aton(attack.HOST) + stack.payload.port.to_bytes(2, "big")
    for port, auth in ((stack.client.port, attack.AUTH), (stack.reverse_socks, None)):
        for cmd in (1, 3):
            for _ in range(10):
                s = attack.connect(port, attack.HOST)
                greeting = b"\x05\x01\x02" if auth else b"\x05\x01\x00"
                s.sendall(greeting)
                attack.read_until(s, lambda b: 2 if len(b) >= 2 else None)
                if auth:
                    u, p = (x.encode() for x in auth)
                    s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
                    attack.read_until(s, lambda b: 2 if len(b) >= 2 else None)
                s.sendall(bytes([5, cmd, 0]) + target)
                attack.finish(s, "rst")


def _row3_hostnames(stack):
    for port, auth in ((stack.client.port, attack.AUTH), (stack.reverse_socks, None)):
        for name in attack.BAD_NAMES:
            s = attack.connect(port, attack.HOST)
            try:
                attack.socks_handshake(s, auth, 1, b"\x03" + bytes([len(name)]) + name + b"\x00\x50")
            except (OSError, ValueError):
                pass
            s.close()
        script = attack.UdpScript([b"\x00\x00\x00\x03" + bytes([len(n)]) + n + b"\x00\x35" + b"q"
                                   for n in attack.BAD_NAMES], "close")
        attack.hit_udp(port, auth, script, attack.HOST)


def _row4_gzip_bomb(stack):
    s, _ = attack.ws_open(stack.server.port, "127.0.0.11")
    try:
        s.sendall(attack.ws_frame(2, b"\x01\x04\x01" + b"\x00" * 16 + b"\x01"
                                  + attack._gzip_members(50000)))
        # the server must keep answering others meanwhile: a fresh connection pings and gets a pong
        p, _ = attack.ws_open(stack.server.port, "127.0.0.12")
        t0 = time.monotonic()
        p.sendall(attack.ws_frame(9, b"alive?"))
        _, n = attack.read_until(p, lambda b: 1 if b"alive?" in b else None, budget=5)
        p.close()
        assert n is not None and time.monotonic() - t0 < 3, "the server froze on a gzip bomb"
    finally:
        s.close()


def _row8_pings(stack):
    """256 MiB of pings whose pongs are never read: the server must stop reading (backpressure)
    rather than queue pongs; its RSS may not grow by more than 64 MiB."""
    pid = stack.server.proc.pid
    before = attack.rss_kib(pid)
    s, _ = attack.ws_open(stack.server.port, "127.0.0.13")
    s.settimeout(5)
    ping = attack.ws_frame(9, b"p" * 125) * 512
    sent = 0
    peak = before
    try:
        while sent < 256 * MiB:
            s.sendall(ping)
            sent += len(ping)
            if sent % (8 * MiB) < len(ping):
                peak = max(peak, attack.rss_kib(pid) or 0)
    except OSError:
        pass  # the server stopped reading (a 5 s stall) or closed: that is backpressure
    peak = max(peak, attack.rss_kib(pid) or 0)
    s.close()
    assert peak - before < 64 * 1024, f"server RSS {before} -> {peak} KiB after {sent >> 20} MiB of pings"


def _row10_half_close(stack):
    size = 1 * MiB
    for port, auth in ((stack.client.port, attack.AUTH), (stack.reverse_socks, None)):
        s = attack.connect(port, attack.HOST, timeout=20)
        code, _ = attack.socks_handshake(s, auth, 1, b"\x01" + socket.inet_aton(attack.HOST)
                                         + stack.payload.port.to_bytes(2, "big"))
        assert code == 0
        s.sendall(f"GET /bytes/{size}?seed=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        body, _ = attack.read_until(s, lambda b: None, budget=20, limit=size + 4096)
        s.close()
        assert body.endswith(payload_bytes(size, 5)), f"port {port}: {len(body)} bytes arrived"


ROWS = {"row1_credentials_0xff": _row1_credentials, "row2_reset_after_request": _row2_resets,
        "row3_bad_hostnames": _row3_hostnames, "row4_gzip_bomb_preauth": _row4_gzip_bomb,
        "row8_pongs_never_read": _row8_pings, "row10_half_close": _row10_half_close}
KNOWN_ROWS: set[str] = set()  # rows still open on the tree: marked attack_known


@pytest.mark.parametrize("row", [pytest.param(r, marks=[pytest.mark.attack_known] if r in KNOWN_ROWS
                                              else []) for r in ROWS])
def test_issue9_row(stack, row):
    """One reduced input of issue 9's table against the processes: afterwards every process is
    alive and both the client and the reverse port still carry requests."""
    ROWS[row](stack)
    _alive_and_serving(stack)
    assert not stack.tracebacks(), stack.tracebacks()
