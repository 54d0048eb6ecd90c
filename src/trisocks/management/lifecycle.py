"""A user's life: traffic that resets on calendar boundaries, a plan whose clock starts at
the first connection, and the status that sums it up.

Status, as the API shows it (one word, and ``blocked`` says why traffic is refused):

* ``disabled``: switched off through the API;
* ``on_hold``: waiting for its first connection, which starts ``on_hold_duration``
  seconds of validity (``expires_at`` is set then);
* ``expired``: past ``expires_at``;
* ``limited``: used ``limit_bytes`` (until a reset, periodic or by hand);
* ``active``: none of these.

Periodic resets (``reset_strategy``: day, week, month, year) fall on calendar boundaries in
the server's time zone (UTC unless ``--reset-timezone``): midnight, Monday midnight, the
first of the month, the first of January. ``next_reset`` is the next one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

RESETS = ("none", "day", "week", "month", "year")

ACTIVE, DISABLED, ON_HOLD, EXPIRED, LIMITED = "active", "disabled", "on_hold", "expired", "limited"
STATUSES = (ACTIVE, DISABLED, ON_HOLD, EXPIRED, LIMITED)


def next_boundary(strategy: str, after: float, tz: tzinfo = UTC) -> float | None:
    """The first calendar boundary of ``strategy`` strictly after ``after`` (unix time), or
    None for "none"."""
    if strategy == "none":
        return None
    local = datetime.fromtimestamp(after, tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if strategy == "day":
        nxt = midnight + timedelta(days=1)
    elif strategy == "week":
        nxt = midnight + timedelta(days=7 - midnight.weekday())  # the next Monday
    elif strategy == "month":
        first = midnight.replace(day=1)
        nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else \
            first.replace(month=first.month + 1)
    elif strategy == "year":
        nxt = midnight.replace(year=midnight.year + 1, month=1, day=1)
    else:
        raise ValueError(f"unknown reset strategy {strategy!r} (one of {', '.join(RESETS)})")
    # wall-clock midnight in the zone (a DST change moves it, the date stays)
    nxt = nxt.replace(tzinfo=None).replace(tzinfo=tz)
    return nxt.timestamp()


def status_of(user, now: float) -> str:
    """The one-word status of a user (see the module docstring)."""
    if user.status == DISABLED:
        return DISABLED
    if user.status == ON_HOLD:
        return ON_HOLD
    if user.expires_at is not None and now >= user.expires_at:
        return EXPIRED
    if user.limit_bytes is not None and user.used >= user.limit_bytes:
        return LIMITED
    return ACTIVE
