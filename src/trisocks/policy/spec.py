"""A policy as the API takes it and the store keeps it, and how it is put in force.

One msgspec Struct for both: a request body field (validated like every body: a wrong
type or an out-of-range number is a 422 naming the field), the JSON kept in the store,
and what ``GET /api/users/{key}`` shows. In a change, an absent field stays as it was and
``null`` removes that rule list or limit.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .admission import REFUSE
from .pace import Pacer
from .rules import RuleError, RuleSet

Speed = Annotated[int, Meta(ge=1024, le=1 << 40, description="bytes per second (at least 1024)")]
Count = Annotated[int, Meta(ge=0, le=1 << 30)]
MAX_RULES = 1000  # a list of 1000 compiles in about 0.2 s at worst (nested ranges with ports)


class Policy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Destination rules and limits of a user or a token (docs/policy.md)."""

    rules: Annotated[list[str], Meta(max_length=MAX_RULES)] | None | UnsetType = UNSET
    speed_up: Speed | None | UnsetType = UNSET
    speed_down: Speed | None | UnsetType = UNSET
    burst: Annotated[int, Meta(ge=16 << 10, le=1 << 40)] | None | UnsetType = UNSET
    max_channels: Count | None | UnsetType = UNSET
    connection_rate: Annotated[float, Meta(gt=0, le=1e6)] | None | UnsetType = UNSET
    connection_burst: Annotated[int, Meta(ge=1, le=1 << 20)] | None | UnsetType = UNSET
    max_devices: Annotated[int, Meta(ge=1, le=1 << 20)] | None | UnsetType = UNSET
    device_policy: Literal["refuse", "replace_oldest"] | UnsetType = UNSET
    max_clients: Count | None | UnsetType = UNSET


FIELDS = Policy.__struct_fields__


def merged(old: Policy | None, change: Policy) -> Policy:
    """``old`` with the fields ``change`` gives; a null removes the field."""
    values = {f: getattr(old, f) for f in FIELDS} if old is not None else {}
    for f in FIELDS:
        value = getattr(change, f)
        if value is not UNSET:
            values[f] = value
    return Policy(**{f: v for f, v in values.items() if v is not None and v is not UNSET})


def compile_rules(policy: Policy) -> RuleSet | None:
    """The policy's rules compiled; ValueError naming the bad rule."""
    if not policy.rules:
        return None
    try:
        return RuleSet.parse(policy.rules)
    except RuleError as exc:
        raise ValueError(str(exc)) from None


def encode(policy: Policy | None) -> str:
    return msgspec.json.encode(policy).decode() if policy is not None else "{}"


def decode(text: str | None) -> Policy:
    """A stored policy; what cannot be read is no policy (the store logs nothing secret)."""
    if not text:
        return Policy()
    return msgspec.json.decode(text, type=Policy)


def _pacer(current: Pacer | None, rate, burst) -> Pacer | None:
    if rate is UNSET or rate is None:
        return None
    burst = None if burst is UNSET else burst
    if current is None:
        return Pacer(rate, burst)
    current.set(rate, burst)  # the same object: channels paced by it keep their place
    return current


def put_in_force(account, policy: Policy, rules: RuleSet | None = None) -> None:
    """Give ``account`` (a management Meter) the policy: its rules, pacers and limits, live.

    Channels read the pacers at every read and the rules at every new connection, so a
    change applies within one quantum (speed) or at the next connection (rules, limits)."""
    account.policy = policy
    account.rules = rules if rules is not None or not policy.rules else compile_rules(policy)
    account.pace_up = _pacer(account.pace_up, policy.speed_up, policy.burst)
    account.pace_down = _pacer(account.pace_down, policy.speed_down, policy.burst)

    def given(value):
        return None if value is UNSET else value

    account.admission.configure(
        max_channels=given(policy.max_channels), rate=given(policy.connection_rate),
        burst=given(policy.connection_burst), max_devices=given(policy.max_devices),
        device_policy=given(policy.device_policy) or REFUSE, max_clients=given(policy.max_clients))
