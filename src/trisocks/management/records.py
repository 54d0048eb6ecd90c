"""Live tokens and users as the store's rows, and users back from them."""

from __future__ import annotations

import logging
import time

import msgspec

from ..policy import spec
from ..tunnel.tokens import TokenInfo
from .model import REASON_EXPIRED, REASON_LIMIT, Meter, TokenMeter, UserAccount
from .store import TokenRecord, UserRecord

log = logging.getLogger("trisocks.management")


def token_record(info: TokenInfo) -> TokenRecord:
    meter = info.account
    up, down = meter.totals() if isinstance(meter, Meter) else (0, 0)
    return TokenRecord(
        token=info.token, kind=info.kind,
        origin=meter.origin if isinstance(meter, TokenMeter) and meter.origin != "runtime" else "api",
        port=info.port, username=info.username, password=info.password,
        allow_manage_connector=info.allow_manage_connector, reverse_token=info.reverse_token,
        created_at=getattr(meter, "created_at", time.time()), bytes_up=up, bytes_down=down,
        total_connections=getattr(meter, "total_connections", 0),
        policy=spec.encode(meter.policy) if isinstance(meter, Meter) else "")


def user_record(user: UserAccount, **override) -> UserRecord:
    up, down = user.totals()
    rec = UserRecord(id=user.id, key=user.key, name=user.name, limit_bytes=user.limit_bytes,
                     expires_at=user.expires_at, status=user.status, created_at=user.created_at,
                     last_seen=user.last_seen, bytes_up=up, bytes_down=down,
                     total_connections=user.total_connections, policy=spec.encode(user.policy),
                     reset_strategy=user.reset_strategy, next_reset=user.next_reset,
                     last_reset=user.last_reset, on_hold_duration=user.on_hold_duration)
    for name, value in override.items():
        setattr(rec, name, value)
    return rec


def user_from_record(rec: UserRecord) -> UserAccount:
    user = UserAccount(id=rec.id, key=rec.key, name=rec.name, limit_bytes=rec.limit_bytes,
                       expires_at=rec.expires_at, status=rec.status,
                       created_at=rec.created_at, bytes_up=rec.bytes_up,
                       bytes_down=rec.bytes_down, total_connections=rec.total_connections,
                       last_seen=rec.last_seen, reset_strategy=rec.reset_strategy,
                       next_reset=rec.next_reset, last_reset=rec.last_reset,
                       on_hold_duration=rec.on_hold_duration)
    restore_policy(user, rec.policy, f"user {rec.name!r}")
    user.quota_noted = user.refuse_reason() == REASON_LIMIT
    user.expiry_noted = user.refuse_reason() == REASON_EXPIRED
    return user


def restore_policy(meter: Meter, text: str, what: str) -> None:
    """Put a stored policy in force; one that cannot be read leaves the account with none
    (users keep the safe destination defaults) and says so."""
    try:
        spec.put_in_force(meter, spec.decode(text))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        log.warning("%s: stored policy cannot be used (%s); it has none now", what, exc)
        spec.put_in_force(meter, spec.Policy())
