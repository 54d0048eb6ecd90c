"""trisocks.net.outbox: the single writer of a WebSocket."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trisocks.net.outbox import COPY_MAX, Outbox
from trisocks.net.transport import IOV_MAX

from .fakes import FakeTransport


async def test_send_nowait_on_an_idle_transport_goes_out_at_once():
    t = FakeTransport(take_now=1 << 20)
    box = Outbox(t)
    assert box.send_nowait(b"hello") is None
    assert bytes(t.written) == b"hello"
    assert box.queued_bytes == 0
    assert box.sent_frames == 1


async def test_send_nowait_on_a_busy_transport_queues_and_keeps_order():
    t = FakeTransport(take_now=3)  # the kernel takes 3 bytes, then nothing
    box = Outbox(t)
    assert box.send_nowait(b"abcdef") is not None  # the rest waits
    assert box.send_nowait(b"ghi") is not None
    assert box.queued_bytes == 6
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(t.written) == b"abcdefghi"
        assert box.queued_bytes == 0
        assert box.sent_frames == 2
        box.close()
    assert box.finished.is_set()


async def test_queued_frames_are_coalesced_into_batches_of_at_most_iov_max():
    t = FakeTransport()
    box = Outbox(t)
    frames = [bytes([i]) * 3 for i in range(IOV_MAX + 6)]
    for f in frames:
        box.send_nowait(f)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        assert t.batches == [IOV_MAX]
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        assert t.batches == [IOV_MAX, 6]
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert bytes(t.written) == b"".join(frames)
    assert box.batches == 2
    assert box.sent_frames == len(frames)


async def test_partial_write_resumes_inside_a_frame():
    t = FakeTransport()
    box = Outbox(t)
    box.send_nowait(b"0123456789")
    box.send_nowait(b"abc")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        t.grant(4)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(t.written) == b"0123"
        assert box.queued_bytes == 9
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert bytes(t.written) == b"0123456789abc"


async def test_send_borrowed_returns_only_once_written():
    t = FakeTransport()
    box = Outbox(t)
    buf = bytearray(b"x" * (COPY_MAX + 1))  # too big to be copied: the caller waits
    done = trio.Event()

    async def sender():
        await box.send_borrowed(memoryview(buf))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        t.grant(COPY_MAX)  # most of it, not all
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        t.grant()
        await done.wait()
        box.close()
    assert bytes(t.written) == bytes(buf)


async def test_send_borrowed_on_an_idle_transport_returns_at_once():
    t = FakeTransport(take_now=1 << 30)
    box = Outbox(t)
    buf = bytearray(b"y" * (COPY_MAX * 2))
    await box.send_borrowed(memoryview(buf))  # no writer task: it must not wait
    assert bytes(t.written) == bytes(buf)


async def test_a_small_borrowed_frame_that_must_wait_is_copied():
    t = FakeTransport()
    box = Outbox(t)
    buf = bytearray(b"original")
    with trio.move_on_after(5) as scope:  # no writer running: it must not wait for one
        sent = await box.send_borrowed(memoryview(buf))
    assert not scope.cancelled_caught
    assert sent is not None and not sent.is_set()  # ...but the caller can wait for the copy
    buf[:] = b"REUSED!!"  # the caller refills its buffer at once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        assert sent.is_set()
        box.close()
    assert bytes(t.written) == b"original"


async def test_replace_a_queued_frame_not_yet_started():
    t = FakeTransport()
    box = Outbox(t)
    box.send_nowait(b"first")
    item = box.send_nowait(b"pong-1")
    assert box.replace(item, b"pong-two")
    assert box.queued_bytes == len(b"first") + len(b"pong-two")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert bytes(t.written) == b"firstpong-two"


async def test_replace_is_refused_once_the_frame_started_or_was_sent():
    t = FakeTransport()
    box = Outbox(t)
    item = box.send_nowait(b"0123456789")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        t.grant(2)  # partly sent
        await trio.testing.wait_all_tasks_blocked()
        assert not box.replace(item, b"other")
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        assert not box.replace(item, b"other")  # sent
        box.close()
    assert bytes(t.written) == b"0123456789"


async def test_replace_is_refused_while_the_writer_is_sending_the_frame():
    """Its bytes are already handed to the transport: replacing it would splice two frames."""
    t = FakeTransport()
    box = Outbox(t)
    item = box.send_nowait(b"AAAA")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits inside write_some
        assert not box.replace(item, b"BBBBBBBB")
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert bytes(t.written) == b"AAAA"
    assert box.queued_bytes == 0


async def test_replace_is_refused_after_close():
    box = Outbox(FakeTransport())
    item = box.send_nowait(b"abc")
    box.close()
    assert not box.replace(item, b"xyz")


async def test_wait_for_space_waits_while_above_high_water():
    t = FakeTransport()
    box = Outbox(t, high_water=100)
    for _ in range(3):
        box.send_nowait(b"z" * 50)
    woke = trio.Event()

    async def waiter():
        await box.wait_for_space()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        t.grant(50)  # 100 left: not above the mark, but not yet down to half of it
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        t.grant(60)  # 40 left: below half, the writer wakes it
        await woke.wait()
        t.grant()
        await trio.testing.wait_all_tasks_blocked()
        box.close()


async def test_wait_for_space_returns_at_once_below_high_water():
    box = Outbox(FakeTransport(), high_water=100)
    box.send_nowait(b"z" * 100)
    with trio.move_on_after(5) as scope:
        await box.wait_for_space()
    assert not scope.cancelled_caught


async def test_close_refuses_new_frames_and_flushes_what_is_queued():
    t = FakeTransport()
    box = Outbox(t)
    box.send_nowait(b"one")
    box.send_nowait(b"two")
    box.close()
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(b"three")
    with pytest.raises(trio.ClosedResourceError):
        await box.send_borrowed(memoryview(b"three"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()
        assert not box.finished.is_set()
        t.grant()
        await box.flush_closed()
    assert bytes(t.written) == b"onetwo"


async def test_flush_waits_for_what_was_queued_before():
    t = FakeTransport()
    box = Outbox(t)
    box.send_nowait(b"abc")
    flushed = trio.Event()

    async def flusher():
        await box.flush()
        flushed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        nursery.start_soon(flusher)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()
        t.grant()
        await flushed.wait()
        assert bytes(t.written) == b"abc"
        box.close()


async def test_a_failed_write_unblocks_every_waiter_and_closes():
    t = FakeTransport()
    box = Outbox(t, high_water=10)
    box.send_nowait(b"q" * 20)
    results = {}

    async def borrowed():
        try:
            await box.send_borrowed(memoryview(bytearray(COPY_MAX + 10)))
        except trio.ClosedResourceError:
            results["borrowed"] = "closed"

    async def space():
        await box.wait_for_space()
        results["space"] = "woke"

    async def writer():
        with pytest.raises(ConnectionResetError):
            await box.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(borrowed)
        nursery.start_soon(space)
        await trio.testing.wait_all_tasks_blocked()
        assert results == {}
        t.fail(ConnectionResetError())
    assert results == {"borrowed": "closed", "space": "woke"}
    assert box.finished.is_set()
    assert box.queued_bytes == 0
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(b"more")


async def test_an_error_from_try_send_closes_the_outbox():
    t = FakeTransport(take_now=1 << 20)
    t.fail_with = BrokenPipeError()
    box = Outbox(t)
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(b"x")
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(b"y")
