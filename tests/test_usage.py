"""Usage history: hourly buckets counted from the same increments as the traffic counters,
with a controllable clock, through a restart."""

from __future__ import annotations

from datetime import UTC, datetime

import trio

from trisocks.management import MemoryStore, SQLiteStore

from .api_support import running_api, wait_until
from .inproc import echo_handler, echo_roundtrip, serve_tcp

HOUR = 3600
T0 = 1_800_000_000 // HOUR * HOUR + 600  # ten minutes into an hour (2027-01-15)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


async def move(api, nursery, key: str, echo: int, n: int) -> None:
    socks = await api.client(nursery, key)
    assert await echo_roundtrip(socks, echo, b"u" * n)
    user = next(u for u in api.plane.users.values() if u.key == key)
    await wait_until(lambda: not user.channels, "the channel to finish")
    await api.plane.loops.flush()


async def test_usage_lands_in_its_hour_and_survives_a_restart(tmp_path):
    db = tmp_path / "usage.db"
    now = [float(T0)]
    async with running_api(store=SQLiteStore(db)) as api, trio.open_nursery() as nursery:
        api.plane.state.clock = lambda: now[0]
        echo = await serve_tcp(nursery, echo_handler)
        alice = await api.create_user(name="alice")
        await move(api, nursery, alice["key"], echo, 100_000)
        now[0] += HOUR  # the next hour
        await move(api, nursery, alice["key"], echo, 30_000)
        totals = await api.user(alice["key"])
        nursery.cancel_scope.cancel()
    assert totals["bytes_up"] == totals["bytes_down"] == 130_000

    async with running_api(store=SQLiteStore(db)) as api:
        api.plane.state.clock = lambda: now[0]
        q = {"from": iso(T0 - HOUR), "to": iso(T0 + 2 * HOUR)}
        r = await api.get(f"/api/users/{alice['key']}/usage", params=q)
        assert r.status_code == 200, r.text
        usage = r.json()
        assert [(b["start"], b["bytes_up"], b["bytes_down"], b["connections"])
                for b in usage["buckets"]] == [
            (iso(T0 - 600), 100_000, 100_000, 1), (iso(T0 - 600 + HOUR), 30_000, 30_000, 1)]
        # the sums are the counters
        assert (usage["bytes_up"], usage["bytes_down"]) == (totals["bytes_up"], totals["bytes_down"])
        day = (await api.get(f"/api/users/{alice['key']}/usage", params={**q, "step": "day"})).json()
        assert [b["bytes_down"] for b in day["buckets"]] == [130_000]
        # a range reaching far into the past and the future still finds what is kept
        wide = {"from": "2000-01-01T00:00:00Z", "to": "2199-01-01T00:00:00Z"}
        far = (await api.get(f"/api/users/{alice['key']}/usage", params=wide)).json()
        assert far["bytes_down"] == 130_000 and len(far["buckets"]) == 2
        server = (await api.get("/api/usage", params=q)).json()
        assert server["bytes_down"] == 130_000 and len(server["buckets"]) == 2
        # bad queries
        r = await api.get(f"/api/users/{alice['key']}/usage", params={"step": "week"})
        assert r.status_code == 422
        r = await api.get("/api/usage", params={"from": iso(T0), "to": iso(T0 - HOUR)})
        assert r.status_code == 400
        assert (await api.get("/api/users/nobody-000000/usage")).status_code == 404


async def test_usage_older_than_the_history_is_pruned():
    store = MemoryStore()
    now = [float(T0)]
    async with running_api(store=store) as api, trio.open_nursery() as nursery:
        api.plane.state.clock = lambda: now[0]
        api.plane.state.usage_days = 1
        echo = await serve_tcp(nursery, echo_handler)
        bob = await api.create_user(name="bob")
        await move(api, nursery, bob["key"], echo, 5000)
        now[0] += 2 * 24 * HOUR
        await move(api, nursery, bob["key"], echo, 7000)
        q = {"from": iso(T0 - HOUR), "to": iso(now[0])}
        assert await store.usage("user", api.plane.users[bob["key"]].id, 0, 1 << 40) == [
            (int(now[0] // HOUR), 7000, 7000, 1)]
        usage = (await api.get(f"/api/users/{bob['key']}/usage", params=q)).json()
        assert usage["bytes_down"] == 7000
        nursery.cancel_scope.cancel()
