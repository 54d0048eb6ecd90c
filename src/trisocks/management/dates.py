"""Dates: the one range the API accepts, and conversions that never raise.

``datetime`` only spans the years 1 to 9999, and a time at an edge with a UTC offset
(``0001-01-01T00:00:00+01:00``) is a valid request that no longer fits once turned into
UTC: stored as it came, it made every listing fail. So the API accepts dates in a range
that means something for expiry and events, and whatever the database gives back (an
old file, a hand edit) is brought into that range before anything uses it.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime

log = logging.getLogger("trisocks.management.store")

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
MIN_TIME = EARLIEST.timestamp()
MAX_TIME = LATEST.timestamp()
RANGE = "between 1970-01-01T00:00:00Z and 2200-01-01T00:00:00Z"


def in_range(when: datetime) -> bool:
    return EARLIEST <= when <= LATEST


def rfc3339(t: float | None) -> datetime | None:
    """A stored time as an aware datetime; a time outside the range shows as its bound."""
    if t is None:
        return None
    return datetime.fromtimestamp(min(max(t, MIN_TIME), MAX_TIME), UTC)


def stored_time(value, what: str, *, invalid: float | None) -> float | None:
    """A time read from the database, in range; ``invalid`` stands for what is not a time.

    Out of range is clamped (year 1 is long past, year 9999 is "never"); a text or NaN
    means nothing, so the caller says what it stands for (expiry: expired, fail closed).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        log.warning("%s: stored time %r is not a time; taken as %s", what, value,
                    "none" if invalid is None else rfc3339(invalid).isoformat())
        return invalid
    if MIN_TIME <= value <= MAX_TIME:
        return float(value)
    bound = MIN_TIME if value < MIN_TIME else MAX_TIME
    log.warning("%s: stored time %r is outside the range %s; taken as %s", what, value, RANGE,
                rfc3339(bound).isoformat())
    return bound
