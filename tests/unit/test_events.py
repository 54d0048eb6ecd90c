"""trisocks.management.events: the in-memory event log."""

from __future__ import annotations

from trisocks.management.events import EventLog
from trisocks.management.store import EventRecord


def test_add_numbers_events_and_counts_types():
    log = EventLog()
    a = log.add("auth_success", token="t")
    b = log.add("auth_failure", peer="1.2.3.4")
    c = log.add("auth_success", user="bob")
    assert (a.id, b.id, c.id) == (1, 2, 3)
    assert log.counts == {"auth_success": 2, "auth_failure": 1}
    assert [e.id for e in log.query()] == [1, 2, 3]


def test_the_ring_keeps_the_most_recent():
    log = EventLog(keep=3)
    for i in range(5):
        log.add("token_added", detail=str(i))
    assert [e.detail for e in log.query()] == ["2", "3", "4"]


def test_query_limit_gives_the_most_recent_oldest_first():
    log = EventLog()
    for i in range(10):
        log.add("token_added", detail=str(i))
    assert [e.detail for e in log.query(limit=3)] == ["7", "8", "9"]


def test_query_filters():
    log = EventLog()
    log.add("auth_success", token="t1", user="alice")
    log.add("auth_success", token="t2", user="bob")
    log.add("quota_exceeded", user="alice")
    log.add("auth_failure", token="t1")
    assert [e.id for e in log.query(token="t1")] == [1, 4]
    assert [e.id for e in log.query(user="alice")] == [1, 3]
    assert [e.id for e in log.query(user="alice", user_aliases=frozenset({"bob"}))] == [1, 2, 3]
    assert [e.id for e in log.query(type="auth_success")] == [1, 2]
    assert [e.id for e in log.query(type="auth_success", token="t2")] == [2]


def test_query_by_time():
    log = EventLog()
    log.restore([EventRecord(id=i, time=100.0 + i, type="token_added") for i in range(1, 6)])
    assert [e.id for e in log.query(since=102.0)] == [2, 3, 4, 5]
    assert [e.id for e in log.query(until=103.0)] == [1, 2, 3]
    assert [e.id for e in log.query(since=102.0, until=104.0)] == [2, 3, 4]


def test_restore_continues_the_numbering_and_is_not_unsaved():
    log = EventLog()
    log.restore([EventRecord(id=41, time=1.0, type="token_added")])
    assert log.add("token_removed").id == 42
    assert [e.id for e in log.take_unsaved()] == [42]
    assert [e.id for e in log.query()] == [41, 42]


def test_take_unsaved_empties_and_put_back_keeps_order():
    log = EventLog()
    for t in ("user_created", "user_updated"):
        log.add(t)
    taken = log.take_unsaved()
    assert [e.id for e in taken] == [1, 2]
    assert log.take_unsaved() == []
    log.add("user_deleted")
    log.put_back(taken)  # the flush failed
    assert [e.id for e in log.take_unsaved()] == [1, 2, 3]


def test_put_back_past_the_bound_drops_the_oldest():
    log = EventLog(unsaved_max=3)
    for _ in range(3):
        log.add("auth_failure")
    taken = log.take_unsaved()
    log.add("auth_failure")
    log.add("auth_failure")
    log.put_back(taken)  # the flush failed, and two more came meanwhile
    assert [e.id for e in log.take_unsaved()] == [3, 4, 5]


def test_unsaved_is_bounded():
    log = EventLog(unsaved_max=3)
    for _ in range(5):
        log.add("auth_failure")
    assert [e.id for e in log.take_unsaved()] == [3, 4, 5]
