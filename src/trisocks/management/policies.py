"""Policies through the API: a user's or a token's destination rules and limits, what is in
force for it, and what it is doing now.

A change is validated whole (a bad rule is refused with its text and position, nothing
changes), written to the store, then put in force at once: speed limits at the channels'
next read, rules and connection limits at the next connection. Open channels and sessions
that a stricter policy would no longer admit stay open (docs/policy.md).
"""

from __future__ import annotations

import logging

from ..policy import spec
from ..policy.chain import TOKEN_DEFAULTS, USER_DEFAULTS
from ..tunnel.tokens import TokenInfo
from . import schemas as s
from .dates import rfc3339
from .errors import Invalid, NotFound
from .model import Meter, UserAccount
from .records import token_record
from .state import PlaneState

log = logging.getLogger("trisocks.management")


def compiled(policy: spec.Policy):
    """The policy's rules compiled (for put_in_force), or Invalid naming what is wrong."""
    try:
        return spec.compile_rules(policy)
    except ValueError as exc:
        raise Invalid(f"policy.rules: {exc}") from None


def rules_in_force(meter: Meter, server_rules) -> list[s.RuleLevel]:
    levels = []
    if meter.rules:
        levels.append(s.RuleLevel(level="user" if isinstance(meter, UserAccount) else "token",
                                  rules=meter.rules.texts()))
    if server_rules:
        levels.append(s.RuleLevel(level="server", rules=server_rules.texts()))
    defaults = USER_DEFAULTS if meter.safe_defaults else TOKEN_DEFAULTS
    levels.append(s.RuleLevel(level="default", rules=defaults.texts()))
    return levels


def live(meter: Meter) -> s.Live:
    admission = meter.admission
    devices = [] if admission is None else [
        s.Device(address=d.address, since=rfc3339(d.since), sessions=len(d.sessions))
        for d in list(admission.devices.values())]
    return s.Live(rate_up=round(meter.rate_up, 1), rate_down=round(meter.rate_down, 1),
                  channels=len(meter.channels), devices=devices,
                  refused=dict(admission.refused) if admission is not None else {})


class PolicyService:
    def __init__(self, state: PlaneState) -> None:
        self.state = state

    def server_rules(self):
        server = self.state.server
        return server.destination_rules if server is not None else None

    # -- tokens (users' policies change through UserService.update) --------------------------------
    def _token(self, token: str) -> TokenInfo:
        info = self.state.tokens.get(token)
        if info is None or isinstance(info.account, UserAccount) or not isinstance(info.account, Meter):
            raise NotFound("token not found")
        return info

    def token_view(self, info: TokenInfo) -> s.TokenDetail:
        meter = info.account
        clients = self.state.token_clients().get(id(info), 0) if self.state.server else 0
        return s.TokenDetail(token=info.token, type=info.kind, clients=clients, policy=meter.policy,
                             rules_in_force=rules_in_force(meter, self.server_rules()),
                             live=live(meter))

    def get_token(self, token: str) -> s.TokenDetail:
        return self.token_view(self._token(token))

    async def patch_token(self, token: str, change: s.TokenPatch) -> s.TokenDetail:
        st = self.state
        async with st.lock:
            info = self._token(token)
            policy = spec.merged(info.account.policy, change.policy)
            rules = compiled(policy)
            old = info.account.policy
            info.account.policy = policy  # what token_record writes
            try:
                await st.persist(st.store.put_token(token_record(info)))
            except BaseException:
                info.account.policy = old
                raise
            spec.put_in_force(info.account, policy, rules)
        st.events.add("token_updated", token=info.token, detail=spec.encode(change.policy))
        log.info("API: token policy changed")
        return self.token_view(info)
