"""trisocks.management.model: meters, token meters, user accounts."""

from __future__ import annotations

import time

from trisocks.management.model import (
    DISABLED,
    REASON_DISABLED,
    REASON_EXPIRED,
    REASON_LIMIT,
    ManagedTokenTable,
    Meter,
    TokenMeter,
    UserAccount,
)
from trisocks.tunnel.tokens import FORWARD, TokenInfo


class FakeChannel:
    def __init__(self) -> None:
        self.uploaded = 0
        self.downloaded = 0
        self.failed: str | None = None

    def fail(self, reason: str) -> None:
        self.failed = reason


def user(**kw) -> UserAccount:
    return UserAccount(id=kw.pop("id", "u1"), key=kw.pop("key", "k1"), name=kw.pop("name", "alice"), **kw)


def test_a_plain_meter_never_refuses():
    m = Meter()
    assert m.charge(1 << 40)
    assert m.refuse_reason() is None


def test_charge_within_the_limit_and_past_it():
    u = user(limit_bytes=100)
    assert u.charge(60)
    assert u.charge(40)  # exactly at the limit
    assert not u.charge(1)
    assert u.refuse_reason() == REASON_LIMIT


def test_limit_counts_what_was_stored():
    u = user(limit_bytes=100, bytes_up=70, bytes_down=20)
    assert u.charge(10)
    assert not u.charge(1)


def test_disabled_user_is_refused_and_charges_nothing():
    u = user(status=DISABLED)
    assert u.refuse_reason() == REASON_DISABLED
    assert not u.charge(1)


def test_expired_user_is_refused_and_charges_nothing():
    u = user(expires_at=time.time() - 1)
    assert u.refuse_reason() == REASON_EXPIRED
    assert not u.charge(1)
    later = user(expires_at=1000.0)
    assert later.refuse_reason(now=999.0) is None
    assert later.refuse_reason(now=1000.0) == REASON_EXPIRED


def test_update_allow_after_a_change_of_status():
    u = user()
    assert u.charge(10)
    u.status = DISABLED
    u.update_allow()
    assert not u.charge(1)
    u.status = "active"
    u.limit_bytes = 1000
    u.update_allow()
    assert u.charge(1)


def test_on_quota_is_called_once():
    calls = []
    u = user(limit_bytes=10)
    u.on_quota = calls.append
    u.charge(20)
    assert u.refuse_reason() == REASON_LIMIT
    assert u.refuse_reason() == REASON_LIMIT
    assert calls == [u]
    u.reset()
    assert u.refuse_reason() is None
    u.charge(20)
    u.refuse_reason()
    assert calls == [u, u]


def test_opened_and_closed_add_final_counts():
    m = Meter(bytes_up=5, bytes_down=7, total_connections=1)
    ch = FakeChannel()
    m.opened(ch)
    assert m.total_connections == 2
    assert m.last_seen is not None
    ch.uploaded, ch.downloaded = 100, 200
    assert m.totals() == (105, 207)  # open channels count in totals
    m.closed(ch)
    assert (m.done_up, m.done_down) == (105, 207)
    m.closed(ch)  # twice: counted once
    assert m.totals() == (105, 207)
    assert m.channels == {}


def test_the_provider_end_of_an_agent_relay_is_not_counted():
    class Bridge:
        connector = None

    m = Meter()
    provider_end = FakeChannel()
    provider_end.bridge = Bridge()
    Bridge.connector = FakeChannel()
    m.opened(provider_end)
    assert m.total_connections == 0
    provider_end.uploaded = 50
    m.closed(provider_end)
    assert m.totals() == (0, 0)


def test_reset_zeroes_and_open_channels_count_from_then():
    u = user(limit_bytes=100, bytes_up=90)
    ch = FakeChannel()
    u.opened(ch)
    ch.uploaded = 30
    u.charge(30)
    assert u.refuse_reason() == REASON_LIMIT
    u.reset()
    assert u.totals() == (0, 0)
    assert u.refuse_reason() is None
    assert u.charge(100)
    ch.uploaded = 45
    u.closed(ch)
    assert (u.done_up, u.done_down) == (15, 0)


def test_sample_gives_rates_between_samples():
    m = Meter()
    ch = FakeChannel()
    m.opened(ch)
    assert m.sample(10.0) == (0, 0)
    ch.uploaded, ch.downloaded = 1000, 4000
    assert m.sample(12.0) == (1000, 4000)
    assert (m.rate_up, m.rate_down) == (500.0, 2000.0)


def test_close_channels_fails_every_open_channel():
    m = Meter()
    chans = [FakeChannel() for _ in range(3)]
    for ch in chans:
        m.opened(ch)
    assert m.close_channels("user deleted") == 3
    assert [ch.failed for ch in chans] == ["user deleted"] * 3


def test_token_meter_never_refuses():
    t = TokenMeter(TokenInfo("tok", FORWARD), bytes_up=1 << 50)
    assert t.refuse_reason() is None
    assert t.charge(1 << 40)


def test_managed_token_table_attaches_a_meter_and_reports_changes():
    added, removed = [], []
    table = ManagedTokenTable(on_added=added.append, on_removed=removed.append)
    info = table.add_forward("some-token")
    assert isinstance(info.account, TokenMeter)
    assert info.account.info is info
    assert added == [info]
    mine = Meter()
    other = table.add(TokenInfo("second", FORWARD, account=mine))
    assert other.account is mine
    table.remove("some-token")
    table.remove("some-token")
    assert removed == [info]
