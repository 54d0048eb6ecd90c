"""The single writer of a WebSocket: a FIFO of ready frames, flushed in batches.

Frames come from many channels at once. When the socket is idle a frame is
sent on the spot (no task switch); when it is busy, frames queue up and the
writer task flushes as many as fit with one ``sendmsg`` call (coalescing).

Two ways in:

* :meth:`Outbox.send_nowait` for small frames the caller owns (control
  messages). Never waits, so the read loop can answer pings and grant credit
  without ever blocking on its own peer.
* :meth:`Outbox.send_borrowed` for a frame that lives in the caller's reusable
  buffer. It returns once the kernel has the bytes, so the buffer can be
  refilled: this is the zero-copy data path, and also the backpressure (a
  channel has at most one frame in flight). A small frame that has to wait is
  copied instead and the caller gets an event to wait on with its buffer already
  back in the pool, so a waiting frame never pins a buffer much larger than itself
  (1000 channels with a few bytes each must not hold 1000 MiB buffers).
"""

from __future__ import annotations

from collections import deque

import trio
from trio.lowlevel import ParkingLot

from .transport import IOV_MAX

# A borrowed frame up to this size that cannot go out at once is copied and the caller's
# buffer released: what waits then costs at most 1 MiB / 128 KiB = 8x its size in buffers.
COPY_MAX = 128 << 10


class Outbox:
    __slots__ = ("_transport", "_queue", "_queued", "_work", "_space", "_closed", "high_water",
                 "_error", "sent_frames", "batches", "finished", "_torn", "_writing")

    def __init__(self, transport, *, high_water: int = 4 << 20) -> None:
        self._transport = transport
        # items are [memoryview-or-bytes, trio.Event | None]
        self._queue: deque[list] = deque()
        self._queued = 0
        self._work = ParkingLot()
        self._space = ParkingLot()
        self._closed = False
        self._error: BaseException | None = None
        self.high_water = high_water
        self.sent_frames = 0
        self.batches = 0
        self.finished = trio.Event()
        self._torn = False  # the writer died with a frame half sent: the stream is unusable
        self._writing = 0  # frames at the head of the queue handed to the transport right now

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("WebSocket is closed") from self._error

    def _try_send(self, frame) -> int:
        try:
            return self._transport.try_send(frame)
        except OSError as exc:
            self._fail(exc)
            raise trio.ClosedResourceError("WebSocket is closed") from exc

    def send_nowait(self, frame: bytes) -> list | None:
        """Queue a frame the outbox may keep (it is not reused by the caller).

        Returns the queue entry while the frame waits (see :meth:`replace`), None if it went out."""
        self._check()
        if not self._queue:
            n = self._try_send(frame)
            if n == len(frame):
                self.sent_frames += 1
                return None
            if n:
                frame = memoryview(frame)[n:]
        item = [frame, None]
        self._queue.append(item)
        self._queued += len(frame)
        self._work.unpark()
        return item

    def replace(self, item: list, frame: bytes) -> bool:
        """Put ``frame`` in place of a queued frame not yet started; False if it is gone or
        partly sent (``item`` is what :meth:`send_nowait` returned)."""
        old = item[0]
        if self._closed or type(old) is not bytes:  # sent (None) or partly sent (a view)
            return False
        queue = self._queue
        if any(queue[i] is item for i in range(min(self._writing, len(queue)))):
            return False  # the writer is sending it: its bytes are already on their way
        self._queued += len(frame) - len(old)
        item[0] = frame
        return True

    async def send_borrowed(self, frame) -> trio.Event | None:
        """Send a frame from a buffer the caller will reuse; return when the kernel has it.

        A small frame that must wait is copied: the call returns at once with an event that
        is set when the kernel has the copy. The caller puts its buffer back, then waits on
        the event, so the channel still has one frame in flight (and reads in large pieces
        while it waits), but the buffer does not wait with it."""
        self._check()
        if not self._queue:
            n = self._try_send(frame)
            if n == len(frame):
                self.sent_frames += 1
                return
            frame = frame[n:]
        done = trio.Event()
        if len(frame) <= COPY_MAX:
            self._queue.append([bytes(frame), done])
            self._queued += len(frame)
            self._work.unpark()
            return done
        item = [frame, done]
        self._queue.append(item)
        self._queued += len(frame)
        self._work.unpark()
        try:
            await done.wait()
        except BaseException:
            if not done.is_set():
                # We are being cancelled with our bytes still queued: keep a copy
                # so the buffer can go back to the pool and the frame stays whole.
                item[0] = bytes(item[0])
                item[1] = None
            raise
        if self._error is not None and self._closed:
            raise trio.ClosedResourceError("WebSocket is closed") from self._error

    async def wait_for_space(self) -> None:
        """Wait while more than ``high_water`` bytes are queued."""
        while self._queued > self.high_water and not self._closed:
            await self._space.park()

    async def run(self) -> None:
        """The writer task: flush queued frames until the outbox is closed."""
        queue = self._queue
        transport = self._transport
        try:
            while True:
                while not queue:
                    if self._closed:
                        return
                    await self._work.park()
                views = [queue[i][0] for i in range(min(len(queue), IOV_MAX))]
                self._writing = len(views)
                try:
                    n = await transport.write_some(views)
                finally:
                    self._writing = 0
                self.batches += 1
                self._queued -= n
                while queue:
                    item = queue[0]
                    size = len(item[0])
                    if size > n:
                        if n:
                            item[0] = memoryview(item[0])[n:]
                        break
                    queue.popleft()
                    item[0] = None  # sent: replace() must not touch it
                    n -= size
                    self.sent_frames += 1
                    if item[1] is not None:
                        item[1].set()
                if self._queued <= self.high_water // 2:
                    self._space.unpark_all()
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self.finished.set()

    def close(self) -> None:
        """Stop accepting frames; the writer finishes what is queued, then returns."""
        self._closed = True
        self._work.unpark_all()

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        self._work.unpark_all()
        self._error = exc
        self._torn = self._torn or bool(self._queue)
        for item in self._queue:
            if item[1] is not None:
                item[1].set()
        self._queue.clear()
        self._queued = 0
        self._space.unpark_all()

    def send_last(self, frame: bytes) -> None:
        """A final small frame (a close) even after the writer stopped, if the stream is still
        at a frame boundary; best effort, never waits."""
        if self._queue or self._torn:
            if not self._closed:
                self.send_nowait(frame)
            return
        try:
            self._transport.try_send(frame)
        except OSError:
            pass

    async def flush_closed(self) -> None:
        """After :meth:`close`: wait until the writer has sent everything and stopped."""
        await self.finished.wait()

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or the outbox failed)."""
        if not self._queue:
            return
        done = trio.Event()
        self._queue.append([b"", done])
        self._work.unpark()
        await done.wait()
