"""Process plumbing for the benchmark: spawning in process groups, guaranteed teardown,
loopback port allocation, readiness waits, and RSS/CPU readings from /proc.

Every process is started in a new session (its own process group), registered in a
module-level registry, and killed as a group: on normal teardown, on an exception, at
interpreter exit, and on SIGTERM/SIGHUP (turned into SystemExit so ``finally`` runs).

The primitives (:func:`start_in_group`, :func:`signal_group`, :func:`connectable`) are
also what tests/support/procs.py builds its ManagedProcess on: one implementation of
"own process group, kill the group, is the port open". Standard library only, so the
tests import it without the benchmark's extra virtualenvs.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIVE: dict[int, Proc] = {}  # pgid -> Proc


class StartError(RuntimeError):
    """A system could not be started or did not become ready."""


@dataclass
class Proc:
    label: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def start_in_group(argv: list[str], stdout, stderr, env: dict[str, str] | None = None,
                   cwd=None) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group, so that killing the group
    reaches its children too), stdin closed, output to the given files."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, env=env, cwd=cwd)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when it is gone (or not ours any more)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def connectable(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def spawn(label: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: str | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            popen = start_in_group(argv, out, subprocess.STDOUT, env=env, cwd=cwd)
        except OSError as exc:
            raise StartError(f"{label}: cannot run {argv[0]}: {exc}") from exc
    proc = Proc(label, argv, popen, log_path)
    _LIVE[popen.pid] = proc
    return proc


def stop(proc: Proc, grace: float = 5.0) -> None:
    """SIGTERM the process group, wait, SIGKILL what is left, reap the leader."""
    pgid = proc.pid
    signal_group(pgid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while tree_pids([pgid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
    try:
        proc.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _LIVE.pop(pgid, None)


def stop_all() -> None:
    for proc in list(_LIVE.values())[::-1]:
        stop(proc, grace=2.0)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


class PortAllocator:
    """Hands out loopback TCP ports below 32768 (outside the ephemeral range), never
    the same one twice in a run, each checked free by binding it."""

    def __init__(self, start: int = 21000, stop: int = 32000) -> None:
        # Spread runs apart so that a leftover TIME_WAIT from a previous run is unlikely.
        span = stop - start
        self._next = start + (os.getpid() * 97) % span
        self._start, self._stop = start, stop

    def get(self) -> int:
        for _ in range(self._stop - self._start):
            port = self._next
            self._next += 1
            if self._next >= self._stop:
                self._next = self._start
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise StartError("no free port below 32768")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    return connectable(host, port, timeout)


def wait_port(port: int, procs: list[Proc], timeout: float = 30.0) -> None:
    """Wait until ``port`` accepts TCP connections; fail fast if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(procs)
        if port_open(port):
            return
        time.sleep(0.02)
    raise StartError(f"port {port} not accepting connections after {timeout:.0f}s")


def check_alive(procs: list[Proc]) -> None:
    for p in procs:
        rc = p.popen.poll()
        if rc is not None:
            raise StartError(f"{p.label} exited with code {rc}:\n{p.log_tail()}")


# ---- /proc readings ---------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: index 0 is field 3 (state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def tree_pids(pgids: list[int]) -> list[int]:
    """Every live process in the groups, and their descendants in groups of their own
    (``trisocks server --workers N`` starts each worker in a process group of its own)."""
    wanted = set(pgids)
    pids = []
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        if int(fields[2]) in wanted:
            pids.append(int(entry.name))
        else:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    todo = list(pids)
    while todo:
        more = children.pop(todo.pop(), [])
        pids += more
        todo += more
    return pids


def rss_bytes(pgids: list[int]) -> int:
    """Sum of VmRSS over every live process in the given process groups."""
    total = 0
    for pid in tree_pids(pgids):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pgids: list[int]) -> float:
    """utime+stime of every live process in the groups, plus cutime+cstime (children
    that already exited and were reaped, e.g. socat's per-connection forks)."""
    ticks = 0
    for pid in tree_pids(pgids):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # fields index = field number - 3: utime 14, stime 15, cutime 16, cstime 17
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def raise_nofile(target: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by every system we spawn); return the soft limit."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (target, hard):
        try:
            new_hard = max(hard, want) if os.geteuid() == 0 else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
