"""Containment: a unit of work that belongs to one peer fails alone.

A SOCKS5 connection, a WebSocket connection, a channel, a dial, a UDP association:
each runs under :func:`contained`. What a peer can make happen (a reset, a refused
write, a timeout) ends the unit quietly; anything else is a bug, and a bug must cost
one unit, never the process: it is logged once with its traceback and a connection
id, and counted (``trisocks_internal_errors_total``). Nothing raised inside reaches
the nursery that started the unit.
"""

from __future__ import annotations

import itertools
import logging

import trio

log = logging.getLogger("trisocks.guard")

# What a peer, the network or the clock can do to a unit of work: not a bug.
PEER_ERRORS = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
               trio.TooSlowError)

_ids = itertools.count(1)


class Stats:
    """Process-wide counters for /metrics."""

    internal_errors = 0


def next_id() -> int:
    """A short id for log lines: which connection a message is about."""
    return next(_ids)


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_expected(e) for e in exc.exceptions)
    return isinstance(exc, PEER_ERRORS)


def report(unit: str, exc: BaseException) -> None:
    """Log and count an unexpected failure of ``unit``."""
    Stats.internal_errors += 1
    log.error("internal error in %s, which is closed (the process goes on): %r", unit, exc,
              exc_info=exc)


async def contained(unit: str, fn, *args) -> None:
    """Run ``fn(*args)``; whatever it raises (except cancellation) ends here."""
    try:
        await fn(*args)
    except Exception as exc:
        if _expected(exc):
            log.debug("%s ended: %r", unit, exc)
        else:
            report(unit, exc)
