"""Telling a service manager how the process is doing: the sd_notify protocol, stdlib only.

systemd (``Type=notify``) and other supervisors pass the path of a Unix datagram socket in
``NOTIFY_SOCKET``; the service sends it newline-separated ``KEY=VALUE`` lines:
``READY=1`` once it serves, ``STATUS=...`` (shown by ``systemctl status``), ``STOPPING=1``
when it begins to stop and, when ``WATCHDOG_USEC`` is set, ``WATCHDOG=1`` at least that
often. A path starting with ``@`` is in the abstract namespace (a NUL byte in its place).

Without ``NOTIFY_SOCKET`` every call does nothing. A socket that is gone or full never
fails the server: the first failure is logged at debug, later ones are not.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("trisocks.notify")


def socket_address(value: str) -> str | bytes | None:
    """The address in ``NOTIFY_SOCKET``: an absolute path, or ``@name`` for the abstract
    namespace (returned as bytes starting with NUL); None for anything else."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, when it is set and
    ``WATCHDOG_PID`` is absent or names this process; None otherwise."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted = environ.get("WATCHDOG_PID", "")
    if wanted:
        try:
            if int(wanted) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1e6


class Notifier:
    """The service manager's socket, if there is one (``Notifier.from_environment()``)."""

    def __init__(self, address: str | bytes | None = None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog  # seconds between two WATCHDOG=1, or None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.debug("NOTIFY_SOCKET=%r is not a path or @name: no notifications", raw)
        return cls(address, watchdog_interval(env) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False if there is no socket or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never wait for the manager: a full queue drops
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("cannot notify the service manager (NOTIFY_SOCKET): %s; "
                          "further failures are not logged", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def start_watchdog(self, nursery: trio.Nursery) -> None:
        """With ``WATCHDOG_USEC`` set: ``WATCHDOG=1`` every half of it, from the event loop
        (a loop that hangs stops the pings, and the manager restarts the service)."""
        if self.watchdog is not None:
            nursery.start_soon(self._watchdog_loop)

    async def _watchdog_loop(self) -> None:
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
