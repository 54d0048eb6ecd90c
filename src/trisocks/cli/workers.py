"""``trisocks server --workers N``: a supervisor process and N worker processes that share
the listening ports (docs/scale-out.md).

Each worker is the same ``trisocks server`` command line, run again with
``TRISOCKS_WORKER_ID`` set: it binds its ports with SO_REUSEPORT (the kernel spreads new
connections over the workers), opens the SQLite file ``shared`` (the supervisor holds the
file's lock for all of them) and never supervises in turn. The supervisor:

- checks the port is free and holds it (bound, not listening) for its whole life, so that
  port 0 is chosen once for all workers and nobody takes the port between two restarts;
- starts worker 0, then, once it is ready, the others: a configuration error that only a
  worker finds is then reported once, and the supervisor exits 2 without restart loops;
- restarts a worker that dies, with a backoff (0.1 s doubling to 30 s; back to 0.1 s after
  a worker ran 60 s), logging its exit status or signal;
- forwards SIGTERM/SIGINT (each worker stops gracefully with its --grace; a second one
  stops them at once) and SIGHUP (each re-reads --config), and exits 0 when every worker
  stopped cleanly;
- is the service's main process for systemd: workers notify a socket of the supervisor's
  (identified by the sender's pid, SO_PASSCRED); READY=1 goes to the service manager once
  every worker said READY=1, then STOPPING=1 and WATCHDOG=1 from the supervisor itself.

Workers run in a process group of their own (a Ctrl-C on the terminal reaches the
supervisor only, which forwards it once: the grace period holds) and get SIGTERM when the
supervisor dies (PR_SET_PDEATHSIG). Workers are started with :class:`subprocess.Popen`
from the event loop's thread and awaited through a pidfd: PR_SET_PDEATHSIG belongs to the
thread that forked, and ``trio.lowlevel.open_process`` forks in a worker thread that may
end long before the supervisor.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass

import trio

from ..net.notify import Notifier

# set by the supervisor in each worker's environment (cli/server.py reads them)
WORKER_ENV = "TRISOCKS_WORKER_ID"
SECRET_ENV = "TRISOCKS_CLUSTER_SECRET"


def worker_id() -> int | None:
    """This process's number among the workers of a supervisor; None for a lone server."""
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw and raw.isdigit() else None


log = logging.getLogger("trisocks.supervisor")

FIRST_DELAY = 0.1  # seconds before the first restart of a worker
MAX_DELAY = 30.0  # the backoff doubles up to this
STEADY = 60.0  # a worker that ran this long restarts after FIRST_DELAY again
COUNT_ENV = "TRISOCKS_WORKERS"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# what the supervisor keeps to itself: systemd's socket, watchdog and socket activation
_NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                    "LISTEN_FDNAMES", SECRET_ENV)
_PR_SET_PDEATHSIG = 1


def supervise(args, n: int) -> int:
    """Run ``n`` workers of this ``trisocks server`` command line until stopped; the exit
    status of the service (0: stopped cleanly; 2: a configuration error)."""
    argv = list(getattr(args, "_argv", None) or [])
    if not argv or argv[0] != "server":
        raise RuntimeError(f"supervise(): the command line is not `server ...`: {argv!r}")
    lock_fd = None
    if (args.api_key or args.db or args.store) and (not args.store
                                                    or args.store.startswith("sqlite:")):
        from ..management import default_path
        from ..management.store import StoreError, StoreInUse, lock_database

        path = args.db or (args.store.split(":", 1)[1].removeprefix("//") if args.store
                           else default_path())
        try:
            lock_fd = lock_database(path)
        except StoreInUse as exc:
            log.error("%s", exc)
            return 2
        except StoreError as exc:
            log.error("database: %s", exc)
            return 1
    hold = None
    try:
        try:
            port, hold = _claim_port(args.ws_host, args.ws_port)
        except OSError as exc:
            log.error("cannot listen on %s:%d for the server: %s", args.ws_host, args.ws_port,
                      (exc.strerror or str(exc)).lower())
            return 2
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_WORKERS}
        env[COUNT_ENV] = str(n)
        if not args.cluster_secret_file:
            env[SECRET_ENV] = secrets.token_hex(32)
        if args.ws_port == 0:
            argv += ["--ws-port", str(port)]  # the last one wins: every worker on this port
        token = _token_for_workers(args)
        if token is not None:
            env["TRISOCKS_TOKEN"] = token
        command = [sys.executable, "-m", "trisocks", *argv]
        supervisor = Supervisor(command, n, env, f"{args.ws_host}:{port}", port)
        return trio.run(supervisor.run)
    finally:
        if hold is not None:
            hold.close()
        if lock_fd is not None:
            os.close(lock_fd)


def _claim_port(host: str, port: int) -> tuple[int, socket.socket]:
    """The server's port, checked free (a bind without SO_REUSEPORT fails if anyone has
    it, even another supervisor's workers), then held bound with SO_REUSEPORT (which the
    workers' listeners join; a socket that does not listen gets no connections)."""
    from ..net.transport import bind_tcp, share_ports

    probe = bind_tcp(host, port)
    try:
        port = probe.getsockname()[1]
    finally:
        probe.close()
    share_ports()
    return port, bind_tcp(host, port)


def _token_for_workers(args) -> str | None:
    """A server without tokens generates one: the supervisor does, once for all workers
    (they read it from TRISOCKS_TOKEN), as ``cmd_server`` would."""
    if args.token or args.api_key:
        return None
    if args.config:
        from .config import ConfigError, load

        try:
            if load(args.config, args._parser).tokens:
                return None
        except ConfigError:
            return None  # read before: cannot happen; the worker says what is wrong
    from ..tunnel.tokens import generate

    token = generate()
    print(f"No token given; generated {'reverse' if args.reverse else 'forward'} token: "
          f"{token}", flush=True)
    return token


def describe(status: int) -> str:
    """How a worker ended, from its Popen return code."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _pdeathsig():
    """The child's set-up before exec: SIGTERM when the supervisor dies (Linux)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl: do not run orphaned
            os._exit(1)

    return setup


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready: bool = False  # said READY=1 since its last start
    ever_ready: bool = False


class Supervisor:
    def __init__(self, command: list[str], n: int, env: dict[str, str], where: str,
                 port: int) -> None:
        self.command = command
        self.env = env
        self.where = where
        self.port = port
        self.slots = [Slot(i) for i in range(n)]
        self.by_pid: dict[int, Slot] = {}
        self.notifier = Notifier.from_environment()
        self.stopping = False
        self.stop_event = trio.Event()
        self.first_ready = trio.Event()
        self.announced = False
        self.code: int | None = None  # set by a fatal start failure
        self.unclean: list[str] = []
        self._preexec = _pdeathsig()

    # -- the whole ---------------------------------------------------------------------------
    async def run(self) -> int:
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
            relay = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            with relay:
                relay.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                name = f"trisocks-supervisor-{os.getpid()}-{secrets.token_hex(6)}"
                await relay.bind(b"\0" + name.encode())
                self.env["NOTIFY_SOCKET"] = "@" + name
                async with trio.open_nursery() as outer:
                    outer.start_soon(self._relay, relay)
                    outer.start_soon(self._on_signals, signals)
                    if self.notifier.watchdog is not None:
                        outer.start_soon(self._watchdog)
                    async with trio.open_nursery() as workers:
                        # worker 0 first: an error only a worker finds is said once
                        workers.start_soon(self._keep, self.slots[0])
                        await self.first_ready.wait()
                        for slot in self.slots[1:]:
                            if not self.stopping:
                                workers.start_soon(self._keep, slot)
                    outer.cancel_scope.cancel()
        self.notifier.close()
        if self.code is not None:
            return self.code
        if self.unclean:
            log.warning("stopped; not cleanly: %s", "; ".join(self.unclean))
            return 1
        log.info("stopped: every worker exited cleanly")
        return 0

    def stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_event.set()
            self.first_ready.set()
            self.notifier.stopping(f"stopping {self.alive()} workers")
        self.forward(signum)

    def alive(self) -> int:
        return sum(1 for s in self.slots if s.proc is not None)

    def forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.proc is not None:
                try:
                    slot.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    # -- one worker, restarted until the end -------------------------------------------------
    async def _keep(self, slot: Slot) -> None:
        delay = FIRST_DELAY
        while not self.stopping:
            self._spawn(slot)
            proc = slot.proc
            assert proc is not None
            status = await _wait(proc)
            ran = trio.current_time() - slot.started
            was_ready, slot.ready, slot.proc = slot.ready, False, None
            self.by_pid.pop(proc.pid, None)
            if self.stopping:
                if status not in (0, 130, -signal.SIGTERM, -signal.SIGINT):
                    self.unclean.append(f"worker {slot.index} (pid {proc.pid}) {describe(status)}")
                log.debug("worker %d (pid %d) %s", slot.index, proc.pid, describe(status))
                return
            if not was_ready and status > 0 and (status == 2 or not slot.ever_ready):
                # a configuration error (2), or it never came up: restarting cannot help
                log.error("worker %d (pid %d) %s before it was ready; stopping every worker, "
                          "no restart (its error is above)", slot.index, proc.pid,
                          describe(status))
                self.code = 2 if status == 2 else 1
                self.stop(signal.SIGTERM)
                return
            if ran >= STEADY:
                delay = FIRST_DELAY
            log.warning("worker %d (pid %d) %s after %.1f s; restarting it in %g s", slot.index,
                        proc.pid, describe(status), ran, delay)
            self.notifier.status(f"{self.ready_count()} of {len(self.slots)} workers ready")
            with trio.move_on_after(delay):
                await self.stop_event.wait()
            delay = min(delay * 2, MAX_DELAY)

    def _spawn(self, slot: Slot) -> None:
        env = dict(self.env)
        env[WORKER_ENV] = str(slot.index)
        # its own process group: a terminal's Ctrl-C reaches the supervisor only
        slot.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                     process_group=0, preexec_fn=self._preexec)
        slot.started = trio.current_time()
        self.by_pid[slot.proc.pid] = slot
        if self.announced:
            log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def ready_count(self) -> int:
        return sum(1 for s in self.slots if s.ready)

    def _ready(self, slot: Slot) -> None:
        if slot.ready:
            return
        slot.ready = slot.ever_ready = True
        if slot.index == 0:
            self.first_ready.set()
        if self.announced:
            log.info("worker %d is ready (pid %d)", slot.index, slot.proc.pid if slot.proc else 0)
            self.notifier.status(self._status())
        elif self.ready_count() == len(self.slots):
            self.announced = True
            pids = ", ".join(str(s.proc.pid) for s in self.slots if s.proc is not None)
            log.info("%d workers (pids %s) on port %d", len(self.slots), pids, self.port)
            self.notifier.ready(self._status())

    def _status(self) -> str:
        return f"{self.ready_count()} of {len(self.slots)} workers listening on {self.where}"

    # -- signals, notifications --------------------------------------------------------------
    async def _on_signals(self, signals) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: passed to %d workers (each re-reads its --config)",
                         self.alive())
                self.forward(signum)
            elif not self.stopping:
                log.info("%s: stopping %d workers (each gets its --grace to finish)", name,
                         self.alive())
                self.stop(signum)
            else:
                log.info("%s again: passed on, the workers stop at once", name)
                self.forward(signum)

    async def _relay(self, sock) -> None:
        """READY=1 of the workers (sd_notify); the sender is known by its pid."""
        creds = struct.calcsize("3i")
        while True:
            data, ancdata, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            pid = None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:creds])[0]
            slot = self.by_pid.get(pid) if pid is not None else None
            if slot is not None and b"READY=1" in data.split(b"\n"):
                self._ready(slot)

    async def _watchdog(self) -> None:
        while True:
            if self.alive():
                self.notifier.send("WATCHDOG=1")
            await trio.sleep(self.notifier.watchdog)


async def _wait(proc: subprocess.Popen) -> int:
    """The exit status of ``proc``, awaited without a thread (a pidfd)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        while proc.poll() is None:  # no pidfd here: look now and then
            await trio.sleep(0.05)
        return proc.returncode
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return proc.wait()
