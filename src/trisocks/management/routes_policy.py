"""Tokens' policies: destination rules and limits of a forward, reverse or connector token
(users' policies are part of the user: POST/PATCH /api/users)."""

from __future__ import annotations

from . import schemas as s
from .operations import Call, Operation

TAG = "policy"
NOT_FOUND = (s.Error, "token not found")


async def get_token(call: Call):
    return call.plane.token_detail(call.params["token"])


async def patch_token(call: Call):
    return await call.plane.patch_token(call.params["token"], call.body)


def operations() -> list[Operation]:
    return [
        Operation(
            "GET", "/api/tokens/{token}", get_token, summary="A token's policy and live usage",
            tag=TAG, responses={200: (s.TokenDetail, ""), 404: NOT_FOUND},
            description="The token's own rules and limits, every rule level in force in the "
            "order it is checked, and what the token is doing now (rates, channels, devices, "
            "refusals). Users are at /api/users/{key}."),
        Operation(
            "PATCH", "/api/tokens/{token}", patch_token, summary="Change a token's policy",
            tag=TAG, body=s.TokenPatch,
            responses={200: (s.TokenDetail, ""), 400: (s.Error, "a rule that does not parse"),
                       404: NOT_FOUND,
                       422: (s.ValidationError, "a field of the wrong type, out of range or unknown"),
                       503: (s.Error, "database unavailable")},
            description='{"policy": {"speed_down": 10485760, "max_clients": 3}}: the fields '
            "given change, null removes one. Speed limits apply within a fraction of a second, "
            "rules and connection limits to new connections (docs/policy.md)."),
    ]
