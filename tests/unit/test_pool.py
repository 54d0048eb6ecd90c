"""trisocks.tunnel.pool: round robin over responsive sessions."""

from __future__ import annotations

import trio
import trio.testing

from trisocks.tunnel.pool import PING_GRACE, SessionPool


class FakeSession:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ping_sent_at: float | None = None  # an unanswered ping, if any
        self.closed = False

    def responsive(self, now: float, grace: float) -> bool:
        if self.closed:
            return False
        return self.ping_sent_at is None or now - self.ping_sent_at < grace

    def __repr__(self) -> str:
        return self.name


async def test_pick_on_an_empty_pool_is_none():
    assert SessionPool().pick() is None


async def test_pick_goes_round_robin():
    pool = SessionPool()
    a, b, c = FakeSession("a"), FakeSession("b"), FakeSession("c")
    for s in (a, b, c):
        pool.add(s)
    picks = [pool.pick() for _ in range(6)]
    assert sorted(map(repr, picks[:3])) == ["a", "b", "c"]
    assert picks[3:] == picks[:3]


async def test_a_session_with_an_old_unanswered_ping_is_skipped(mock_clock):
    mock_clock.autojump_threshold = 0
    pool = SessionPool()
    a, b = FakeSession("a"), FakeSession("b")
    pool.add(a)
    pool.add(b)
    a.ping_sent_at = trio.current_time()
    await trio.sleep(PING_GRACE / 2)
    assert {pool.pick(), pool.pick()} == {a, b}  # still within its grace
    await trio.sleep(PING_GRACE)
    assert [pool.pick() for _ in range(4)] == [b] * 4
    b.ping_sent_at = trio.current_time() - PING_GRACE - 1
    assert pool.pick() is None


async def test_remove_takes_a_session_out_and_unknown_is_ignored():
    pool = SessionPool()
    a, b = FakeSession("a"), FakeSession("b")
    pool.add(a)
    pool.add(b)
    pool.remove(a)
    pool.remove(FakeSession("never added"))
    assert len(pool) == 1
    assert [pool.pick() for _ in range(3)] == [b] * 3
    assert list(pool) == [b]


async def test_wait_pick_returns_a_session_that_joins_later(mock_clock):
    mock_clock.autojump_threshold = 0
    pool = SessionPool()
    a = FakeSession("a")
    got = []

    async def picker():
        got.append(await pool.wait_pick(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(picker)
        await trio.sleep(3)
        assert got == []
        pool.add(a)
    assert got == [a]
    assert trio.current_time() < 4


async def test_wait_pick_notices_a_session_that_recovers_without_a_change(mock_clock):
    mock_clock.autojump_threshold = 0
    pool = SessionPool()
    a = FakeSession("a")
    a.ping_sent_at = trio.current_time()
    pool.add(a)
    got = []

    async def picker():
        got.append(await pool.wait_pick(30))

    async with trio.open_nursery() as nursery:
        await trio.sleep(PING_GRACE + 1)
        nursery.start_soon(picker)
        await trio.sleep(2)
        assert got == []
        a.ping_sent_at = None  # the pong came: nothing joined the pool
    assert got == [a]


async def test_wait_pick_gives_up_after_the_timeout(mock_clock):
    mock_clock.autojump_threshold = 0
    pool = SessionPool()
    start = trio.current_time()
    assert await pool.wait_pick(7) is None
    assert trio.current_time() - start == 7


async def test_wait_nonempty(mock_clock):
    mock_clock.autojump_threshold = 0
    pool = SessionPool()
    done = trio.Event()

    async def waiter():
        await pool.wait_nonempty()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(100)
        assert not done.is_set()
        pool.add(FakeSession("a"))
    assert done.is_set()
