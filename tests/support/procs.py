"""Subprocesses for tests: own process group, output captured to files, readiness waits, and
teardown that kills the whole group, so that no process outlives its test.

The process-group primitives (start in a new session, signal the group, is a port open) are
benchmarks/procs.py's, shared with the benchmark runner (standard library only).

Readiness is always an observable fact (a log line appeared, a port accepts connections), never
a sleep: the waits poll every few milliseconds against a deadline and, when they give up, the
failure message carries the captured output of the process.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.procs import connectable, signal_group, start_in_group

from .tools import clean_env

POLL = 0.01  # seconds between two looks at a condition
LOG_TAIL = 6000  # characters of captured output quoted in a failure message


class ProcessFailure(AssertionError):
    pass


# Every ManagedProcess not yet terminated, so that a test run killed from outside (SIGTERM, say
# a CI timeout) can still take its subprocesses down with it: see kill_all_live().
_live: set[ManagedProcess] = set()


def kill_all_live() -> None:
    """SIGKILL the process group of every ManagedProcess still running (last-resort cleanup)."""
    for proc in list(_live):
        if proc.popen.poll() is not None:
            _live.discard(proc)
            continue
        signal_group(proc.pid, signal.SIGKILL)
        _live.discard(proc)


class ManagedProcess:
    """One command running in its own session/process group, stdout and stderr in files."""

    def __init__(self, argv: Sequence[str], name: str, log_dir: Path,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        self.stdout_path = Path(log_dir) / f"{name}.stdout"
        self.stderr_path = Path(log_dir) / f"{name}.stderr"
        # the environment is exactly ``env`` when given (build it with tools.clean_env), else
        # the test's own environment without proxy and TRISOCKS_* settings
        full_env = dict(env) if env is not None else clean_env()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = start_in_group(self.argv, out, err, env=full_env, cwd=cwd)
        self.pid = self.popen.pid
        _live.add(self)

    # -- output ----------------------------------------------------------------------
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """stdout then stderr, as text."""
        return self.stdout() + self.stderr()

    def describe(self) -> str:
        status = self.popen.poll()
        state = "running" if status is None else f"exited with status {status}"
        out = self.stdout()[-LOG_TAIL:]
        err = self.stderr()[-LOG_TAIL:]
        return (f"process {self.name!r} ({state}): {' '.join(self.argv)}\n"
                f"--- stdout ---\n{out}\n--- stderr ---\n{err}\n--- end ---")

    def fail(self, why: str) -> None:
        raise ProcessFailure(f"{why}\n{self.describe()}")

    # -- waiting ---------------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 20.0,
                 allow_exit: bool = False):
        """Poll ``condition`` until it is truthy; fail (with the log) on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if not allow_exit and not self.alive():
                result = condition()  # the last words may be what we wait for
                if result:
                    return result
                self.fail(f"{self.name} exited while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(POLL)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 20.0,
                     allow_exit: bool = False) -> re.Match[str]:
        """Wait until stdout or stderr matches ``pattern`` (a regex); returns the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self.wait_for(lambda: regex.search(self.output()),
                             f"output matching {regex.pattern!r}", timeout, allow_exit)

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        self.wait_for(lambda: port_open(host, port), f"{host}:{port} to accept connections",
                      timeout)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"did not exit within {timeout:.0f} s")
            raise  # unreachable

    # -- stopping --------------------------------------------------------------------
    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after ``timeout``; returns the status.

        Once the leader has been reaped its id may belong to someone else: then nothing is sent."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            if not signal_group(self.pid, sig):
                break
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _live.discard(self)
        return self.popen.poll()


class ProcessFactory:
    """Starts :class:`ManagedProcess` es and stops all of them (newest first) at :meth:`close`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self._names: dict[str, int] = {}

    def start(self, argv: Sequence[str], name: str = "proc", env: dict[str, str] | None = None,
              cwd=None) -> ManagedProcess:
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        unique = name if count == 0 else f"{name}-{count}"
        proc = ManagedProcess(argv, unique, self.log_dir, env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        self.processes.clear()


def clean_processes(log_dir: Path):
    """A fixture's body: a ProcessFactory, and at teardown every process stopped and no
    trisocks log holding a traceback (failures are one clear log line each)."""
    factory = ProcessFactory(log_dir)
    try:
        yield factory
        for proc in factory.processes:
            if proc.name.startswith("trisocks"):
                assert "Traceback" not in proc.output(), f"traceback in a log\n{proc.describe()}"
    finally:
        factory.close()


# -- ports -------------------------------------------------------------------------------

# Ports handed out in this test process; never handed out twice.
_given: set[int] = set()
PORT_RANGE = (10000, 32767)  # below the ephemeral range 32768-60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port below 32768 that nothing listens on now (checked by binding it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*PORT_RANGE)
        if port in _given:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if port_open(host, port, timeout=0.2):
            continue  # someone listens with SO_REUSEPORT or on a wildcard address
        _given.add(port)
        return port
    raise RuntimeError("no free port found below 32768")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    return connectable(host, port, timeout)


def address_in_use(text: str) -> bool:
    low = text.lower()
    return "address already in use" in low or "errno 98" in low or "bind: address" in low


def start_with_free_ports(factory: ProcessFactory, make_argv: Callable[..., Sequence[str]],
                          ready: Callable[[ManagedProcess, Sequence[int]], None], nports: int,
                          name: str, env: dict[str, str] | None = None,
                          attempts: int = 3) -> tuple[ManagedProcess, list[int]]:
    """Start ``make_argv(*ports)`` with ``nports`` fresh ports; retry with other ports if the
    process dies because one was taken meanwhile (another program on the machine won the race).
    ``ready(proc, ports)`` must return when the process is ready or raise."""
    last: ProcessFailure | None = None
    for _ in range(attempts):
        ports = [free_port() for _ in range(nports)]
        proc = factory.start(make_argv(*ports), name=name, env=env)
        try:
            ready(proc, ports)
            return proc, ports
        except ProcessFailure as exc:
            if proc.alive() or not address_in_use(proc.output()):
                raise
            last = exc
    assert last is not None
    raise last
