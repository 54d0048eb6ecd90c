"""trisocks.tunnel.throttle: failed authentication per source, decaying with time."""

from __future__ import annotations

from trisocks.tunnel.throttle import FailureLimiter, TokenBucket, address_key


def test_limit_then_decay_and_success_clears_nothing():
    now = [0.0]
    limiter = FailureLimiter(max_failures=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.failed("198.51.100.7")
    limiter.succeeded("198.51.100.7")
    assert limiter.retry_after("198.51.100.7") == 60
    now[0] = 61
    assert limiter.retry_after("198.51.100.7") == 0


def test_ipv6_counts_per_64():
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_sources_whose_failures_aged_out_are_forgotten():
    """Memory follows the failures of the last window, not every source ever seen."""
    now = [0.0]
    limiter = FailureLimiter(window=60, clock=lambda: now[0])
    for i in range(1000):
        limiter.failed(f"10.0.{i // 250}.{i % 250}")
    assert len(limiter._failures) == 1000
    now[0] = 120
    limiter.failed("192.0.2.1")
    assert len(limiter._failures) == 1


def test_at_most_max_addresses_are_kept():
    limiter = FailureLimiter(max_addresses=5)
    for i in range(20):
        limiter.failed(f"192.0.2.{i}")
    assert len(limiter._failures) == 5


def test_token_bucket_burst_then_rate():
    now = [0.0]
    bucket = TokenBucket(burst=2, rate=1.0, clock=lambda: now[0])
    assert bucket.take() and bucket.take() and not bucket.take()
    now[0] = 1.0
    assert bucket.take() and not bucket.take()
