"""Tunnel -> socket: writing the peer's Data to a channel's socket, without copies when the
socket keeps up and without dropping anything when it does not.

``Channel.deliver`` is called by the session's read loop for every Data piece. It sends
straight from the decoder's buffer when the socket takes the bytes; whatever the socket
refuses is queued in ``pending`` and a drain task finishes the job. With a trisocks peer
every byte received was granted as window, so what a channel holds is bounded by it and
consumed bytes are granted back (growing the window while the reader keeps up, flow.py).
With a LinkSocks peer, ``deliver`` returns True past ``limit`` and the read loop waits.

This half of the channel is a mixin of :class:`~trisocks.net.channel.Channel`; the state
constants live here because both halves use them.
"""

from __future__ import annotations

import logging
import socket

import trio
from trio.lowlevel import wait_writable

from ..wire import protocol
from .transport import IOV_MAX

log = logging.getLogger("trisocks.channel")

OPENING, OPEN, LOCAL_CLOSED, REMOTE_CLOSED, CLOSED = range(5)

DRAIN_STALL = 30.0  # a reader that takes nothing this long after its peer closed is given up
# Held bytes at least this long stay views into the decoder's buffer rather than copies; the
# floor keeps a 256 KiB buffer from being kept alive for a few bytes (at most 4x overhead).
PIN_MIN = 64 << 10


class Delivery:
    """The tunnel -> socket half of a channel (attributes are the Channel's slots)."""

    __slots__ = ()

    def deliver(self, data, decoder=None) -> bool:
        """Write Data from the peer; True when the read loop must wait (``wait_space``).

        ``decoder`` is given when ``data`` is a view into its buffer: a large remainder is
        then kept as that view (the decoder moves on to another buffer) instead of copied.
        """
        if self.state >= CLOSED or self.error:
            return False
        account = self.account
        if account is not None and not account.charge(len(data)):
            self.fail(account.refuse_reason() or "traffic limit reached")
            return False
        sock = self.sock
        pacer = None if account is None else self._pacer()
        if sock is None or self.pending or (pacer is not None and not pacer.try_take(len(data))):
            # (over a speed limit: the drain writes it, paid for step by step)
            self._hold(data, decoder)
            if sock is not None:
                self._kick_drain()
        else:
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._write_failed(exc)
                return False
            if n:
                self._consumed(n)
            if n < len(data):
                self._hold(data[n:], decoder)
                if pacer is not None:
                    self._allowance += len(data) - n  # paid for already: the drain need not
                self._kick_drain()
        return self.held > self.limit or self.session.pending_bytes > self.session.pending_max

    def _hold(self, data, decoder=None) -> None:
        if self.window and self.held + len(data) > self.window:
            # a trisocks peer never sends past the window we granted: this one breaks the rules
            self.fail("peer exceeded the flow-control window")
            return
        if decoder is not None and len(data) >= PIN_MIN:
            decoder.hold()  # keep the view: the decoder reads into another buffer next
            self.pending.append(data)
        else:
            self.pending.append(bytes(data))  # small, or not the decoder's: copy
        self.held += len(data)
        self.session.pending_changed(len(data))

    def _release(self, n: int) -> None:
        """``n`` bytes from the front of the queue were sent."""
        pending = self.pending
        self.held -= n
        self.session.pending_changed(-n)
        while n:
            size = len(pending[0])
            if n < size:
                pending[0] = memoryview(pending[0])[n:]
                return
            pending.popleft()
            n -= size

    def _drop_pending(self) -> None:
        if self.pending:
            self.session.pending_changed(-self.held)
            self.pending.clear()
            self.held = 0

    async def wait_space(self) -> None:
        while self.held > self.limit and self.state < CLOSED and not self.error:
            await self._lot.park()

    def _consumed(self, n: int) -> None:
        self.bytes_down += n
        window = self.window
        if window:
            self._unacked += n
            if self._unacked >= window >> 2 and self.state in (OPEN, LOCAL_CLOSED):
                grant = self._unacked
                if not self.held:  # the reader keeps up: let the sender go faster
                    extra = self.session.windows.grow(window)
                    self.window = window + extra
                    grant += extra
                self.session.send_if_open(protocol.WindowUpdate(self.id, grant))
                self._unacked = 0

    def _pacer(self):
        """The speed limit of the bytes we write: the user's download when our socket is the
        user's, their upload when it is a target's."""
        account = self.account
        return account.pace_down if self.ingress else account.pace_up

    def _kick_drain(self) -> None:
        if not self._draining and self.sock is not None:
            self._draining = True
            self.session.spawn(self._drain, unit="drain")

    async def _drain(self) -> None:
        sock = self.sock
        scope = self._drain_scope = trio.CancelScope()
        try:
            with scope:
                while self.pending and self.state < CLOSED:
                    pacer = None if self.account is None else self._pacer()
                    if pacer is not None and self._allowance < self.held:
                        if pacer.try_take(self.held - self._allowance):
                            self._allowance = self.held  # room for all of it: write as unpaced
                        elif self._allowance <= 0:
                            # pay for the next step before writing it (pace.py: fair among
                            # channels)
                            self._allowance = min(self.held, pacer.quantum)
                            delay = pacer.take(self._allowance)
                            if delay:
                                await trio.sleep(delay)
                    try:
                        await wait_writable(sock)
                        pending = self.pending
                        if pacer is not None and self._allowance < self.held:
                            n = sock.send(memoryview(pending[0])[: self._allowance])
                        elif len(pending) == 1:
                            n = sock.send(pending[0])
                        else:
                            n = sock.sendmsg([pending[i] for i in range(min(len(pending), IOV_MAX))])
                    except BlockingIOError:
                        continue
                    except (OSError, trio.ClosedResourceError) as exc:
                        if isinstance(exc, OSError):
                            self._write_failed(exc)
                        break
                    if pacer is not None:
                        self._allowance = max(0, self._allowance - n)
                    self._release(n)
                    self._consumed(n)
                    if self.held <= self.limit:
                        self._lot.unpark_all()
        finally:
            self._draining = False
            if self._drained is not None:
                self._drained.set()
            self._lot.unpark_all()
        if self._eof_in and not self.pending:
            self._end_output()

    def _write_failed(self, exc: OSError) -> None:
        """The local socket refused our bytes: the channel is over."""
        self.fail((exc.strerror or str(exc)).lower())

    async def _flush_pending(self) -> None:
        """The tunnel side is done, but we still hold bytes for our socket: keep writing them
        for as long as the socket takes any. A slow reader gets everything; only a reader
        that takes nothing for DRAIN_STALL seconds loses the rest (and the channel ends)."""
        while self.pending and not self.error and self._draining:
            before = self.held
            self._drained = trio.Event()
            with trio.move_on_after(DRAIN_STALL):
                await self._drained.wait()
            if self.held >= before:
                log.info("%r: reader took nothing for %.0f s; dropping %d bytes", self,
                         DRAIN_STALL, self.held)
                return

    def on_remote_eof(self) -> None:
        """The peer's socket ended its direction: once what came before reached our socket,
        end our socket's sending direction too (half-close)."""
        if self.state in (OPENING, OPEN) and not self._eof_in:
            self._eof_in = True
            if not self.pending and self.sock is not None:
                self._end_output()

    def _end_output(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._remote_done.set()  # this direction is over; the pump ends the channel with its own EOF
