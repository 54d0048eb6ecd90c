"""A user's life with a controllable clock: calendar resets, validity that starts at the first
connection, the five statuses, filtered listing and removal in one call."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import trio

from trisocks.management import SQLiteStore
from trisocks.management.lifecycle import next_boundary

from .api_support import running_api, wait_until
from .inproc import echo_handler, echo_roundtrip, serve_tcp


def ts(*args, tz=UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def test_calendar_boundaries():
    assert next_boundary("none", ts(2026, 12, 3, 9)) is None
    assert next_boundary("day", ts(2026, 12, 3, 9)) == ts(2026, 12, 4)
    assert next_boundary("day", ts(2026, 12, 4)) == ts(2026, 12, 5)  # strictly after
    assert next_boundary("week", ts(2026, 12, 3, 9)) == ts(2026, 12, 7)  # Thursday -> Monday
    assert next_boundary("week", ts(2026, 12, 7)) == ts(2026, 12, 14)
    assert next_boundary("month", ts(2026, 12, 3, 9)) == ts(2027, 1, 1)
    assert next_boundary("month", ts(2027, 1, 31, 23, 59)) == ts(2027, 2, 1)
    assert next_boundary("year", ts(2026, 12, 3)) == ts(2027, 1, 1)
    tokyo = timezone(timedelta(hours=9))  # a boundary at local midnight, not UTC's
    assert next_boundary("month", ts(2026, 12, 31, 16), tokyo) == ts(2027, 2, 1, tz=tokyo)
    assert next_boundary("month", ts(2026, 12, 31, 14), tokyo) == ts(2027, 1, 1, tz=tokyo)


async def test_a_monthly_reset_restores_a_limited_user_at_the_boundary():
    start = time.time()
    now = [start]
    async with running_api() as api, trio.open_nursery() as nursery:
        api.plane.state.clock = lambda: now[0]
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="monthly", limit_bytes=100_000, reset_strategy="month")
        boundary = next_boundary("month", start)
        assert user["next_reset"] == iso(boundary)
        socks = await api.client(nursery, user["key"])
        await echo_roundtrip(socks, echo, b"m" * 60_000)  # 120 000 bytes: cut at the limit
        account = api.plane.users[user["key"]]
        await wait_until(lambda: not account.channels, "the channel to end")
        seen = await api.user(user["key"])
        assert (seen["status"], seen["blocked"]) == ("limited", "traffic limit reached")
        limited = (await api.get("/api/users", params={"status": "limited"})).json()
        assert [u["name"] for u in limited["users"]] == ["monthly"]

        now[0] = boundary + 1
        api.plane.state.wake_enforcer()
        await wait_until(lambda: account.refuse_reason() is None, "the periodic reset")
        seen = await api.user(user["key"])
        assert (seen["status"], seen["bytes_up"], seen["bytes_down"]) == ("active", 0, 0)
        assert seen["last_reset"] == iso(boundary + 1)
        assert seen["next_reset"] == iso(next_boundary("month", boundary + 1))
        assert await echo_roundtrip(socks, echo, b"again")
        events = (await api.get("/api/events", params={"type": "user_reset"})).json()["events"]
        assert [e["detail"] for e in events] == ["periodic (month)"]
        nursery.cancel_scope.cancel()


async def test_an_on_hold_user_starts_its_validity_at_the_first_connection(tmp_path):
    db = tmp_path / "hold.db"
    first_use = time.time()
    async with running_api(store=SQLiteStore(db)) as api, trio.open_nursery() as nursery:
        api.plane.state.clock = lambda: first_use
        r = await api.post("/api/users", json={"name": "held", "status": "on_hold"})
        assert r.status_code == 400 and "on_hold_duration" in r.json()["error"]
        user = await api.create_user(name="held", status="on_hold", on_hold_duration=30 * 86400)
        assert (user["status"], user["expires_at"], user["blocked"]) == ("on_hold", None, None)
        echo = await serve_tcp(nursery, echo_handler)
        socks = await api.client(nursery, user["key"])
        assert await echo_roundtrip(socks, echo, b"first")
        seen = await api.user(user["key"])
        assert (seen["status"], seen["expires_at"]) == ("active", iso(first_use + 30 * 86400))
        events = (await api.get("/api/events", params={"type": "user_activated"})).json()["events"]
        assert len(events) == 1
        await api.plane.loops.flush()
        nursery.cancel_scope.cancel()
    async with running_api(store=SQLiteStore(db)) as api:  # kept
        seen = await api.user(user["key"])
        assert (seen["status"], seen["expires_at"]) == ("active", iso(first_use + 30 * 86400))


async def test_listing_filters_paging_and_removal_in_one_call():
    async with running_api() as api:
        past = iso(time.time() - 60)
        soon = iso(time.time() + 3600)
        await api.create_user(name="fine", limit_bytes=10 << 20, expires_at=iso(time.time() + 86400 * 90))
        await api.create_user(name="gone", expires_at=past)
        await api.create_user(name="empty", limit_bytes=0)  # nothing left: limited
        await api.create_user(name="soon", expires_at=soon)
        await api.create_user(name="off", status="disabled")

        async def names(**params):
            r = await api.get("/api/users", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            return [u["name"] for u in body["users"]], body["total"]

        assert await names(status="expired") == (["gone"], 1)
        assert await names(status="limited") == (["empty"], 1)
        assert await names(status="disabled") == (["off"], 1)
        assert await names(expiring_before=iso(time.time() + 7200)) == (["gone", "soon"], 2)
        assert await names(usage_over=50) == (["empty"], 1)
        assert await names(offset=1, limit=2) == (["gone", "empty"], 5)
        assert (await api.get("/api/users", params={"status": "sleeping"})).status_code == 422
        r = await api.post("/api/users/remove", json={"status": ["expired", "limited"]})
        assert r.status_code == 200 and sorted(r.json()["removed"]) == ["empty", "gone"]
        assert await names() == (["fine", "soon", "off"], 3)
        assert (await api.post("/api/users/remove", json={"status": []})).status_code == 422
