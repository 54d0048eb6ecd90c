"""Usage history: the server's and each user's traffic by hour or by day (usage.py)."""

from __future__ import annotations

from . import schemas as s
from .operations import Call, Operation

TAG = "usage"
RANGE = (s.ValidationError, "a date out of range, or a step other than hour or day")
DESCRIPTION = ("``from`` and ``to`` are RFC 3339 times (default: the last 7 days by hour, the "
               "last 30 by day); ``step`` is ``hour`` or ``day`` (UTC days). Only buckets with "
               "traffic are listed; the figures are the same increments the counters add up, "
               "written once a second, and kept ``--usage-days`` days (90).")


async def server_usage(call: Call):
    return await call.plane.server_usage(call.query)


async def user_usage(call: Call):
    return await call.plane.user_usage(call.params["key"], call.query)


def operations() -> list[Operation]:
    return [
        Operation("GET", "/api/usage", server_usage, summary="The server's traffic over time",
                  tag=TAG, query=s.UsageQuery,
                  responses={200: (s.Usage, ""), 400: (s.Error, "'from' is after 'to'"),
                             422: RANGE, 503: (s.Error, "database unavailable")},
                  description=DESCRIPTION),
        Operation("GET", "/api/users/{key}/usage", user_usage, summary="A user's traffic over time",
                  tag=TAG, query=s.UsageQuery,
                  responses={200: (s.Usage, ""), 400: (s.Error, "'from' is after 'to'"),
                             404: (s.Error, "user not found"), 422: RANGE,
                             503: (s.Error, "database unavailable")},
                  description=DESCRIPTION),
    ]
