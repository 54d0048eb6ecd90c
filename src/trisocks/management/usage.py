"""Usage history: a user's, a token's or the server's traffic by hour or by day.

The flusher writes, once a second, what every meter grew by into the current hour's
bucket (store.flush with ``hour``), the same increments that the traffic counters add up:
the sums of the buckets equal the counters (up to the last second, not yet flushed).
Hours are kept ``usage_days`` (default 90) and pruned once an hour.
"""

from __future__ import annotations

from datetime import UTC, datetime

from . import schemas as s
from .errors import Invalid, NotFound
from .state import PlaneState

HOUR = 3600
DEFAULT_SPAN = {"hour": 7 * 24 * HOUR, "day": 30 * 24 * HOUR}


class UsageService:
    def __init__(self, state: PlaneState) -> None:
        self.state = state

    async def of_user(self, key: str, q: s.UsageQuery) -> s.Usage:
        user = self.state.users.get(key)
        if user is None:
            raise NotFound("user not found")
        return await self._usage("user", user.id, q)

    async def of_server(self, q: s.UsageQuery) -> s.Usage:
        return await self._usage("server", "", q)

    async def _usage(self, owner: str, ident: str, q: s.UsageQuery) -> s.Usage:
        st = self.state
        to = q.to.timestamp() if q.to is not None else st.clock()
        start = q.from_.timestamp() if q.from_ is not None else to - DEFAULT_SPAN[q.step]
        if start > to:
            raise Invalid("'from' is after 'to'")
        start = max(start, st.clock() - st.usage_days * 24 * HOUR - HOUR)  # nothing older is kept
        rows = await st.persist(st.store.usage(owner, ident, int(start // HOUR), int(to // HOUR)))
        buckets: dict[int, list[int]] = {}
        for hour, up, down, conns in rows:
            key = hour * HOUR if q.step == "hour" else hour // 24 * 24 * HOUR  # UTC days
            b = buckets.setdefault(key, [0, 0, 0])
            b[0] += up
            b[1] += down
            b[2] += conns
        out = [s.UsageBucket(start=_utc(t), bytes_up=b[0], bytes_down=b[1], connections=b[2])
               for t, b in sorted(buckets.items())]
        return s.Usage(step=q.step, from_=_utc(start), to=_utc(to),
                       bytes_up=sum(b.bytes_up for b in out),
                       bytes_down=sum(b.bytes_down for b in out),
                       connections=sum(b.connections for b in out), buckets=out)


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(int(t), UTC)
