"""The LinkSocks-compatible token API: /api/status and /api/token (see LinkSocks's
docs/guide/http-api.md; the same requests get the same JSON here)."""

from __future__ import annotations

from . import schemas as s
from .errors import Invalid
from .operations import Call, Operation

TAG = "tokens (LinkSocks-compatible)"


async def get_status(call: Call):
    return call.plane.token_status()


async def add_token(call: Call):
    return await call.plane.add_token(call.body)


async def delete_token(call: Call):
    return await call.plane.remove_token(call.params["token"])


async def _delete_by_body(call: Call):
    token = call.body.token
    if not token:
        raise Invalid("token not specified")
    return await call.plane.remove_token(token)


def operations() -> list[Operation]:
    return [
        Operation(
            "GET", "/api/status", get_status, summary="Server version and every token", tag=TAG,
            responses={200: (s.StatusResponse, "version and tokens"),
                       401: (s.Error, "invalid API key")},
            description="Forward and reverse tokens with their connected clients; a reverse token "
            "also shows its SOCKS5 port and its connector tokens. Users are listed by "
            "/api/users, not here."),
        Operation(
            "POST", "/api/token", add_token, summary="Add a forward, reverse or connector token",
            tag=TAG, body=s.TokenRequest,
            responses={200: (s.TokenResult, "the token (and for reverse tokens the SOCKS5 port)"),
                       400: (s.Error, ("invalid request body / invalid token type / "
                             "reverse_token is required for connector token")),
                       409: (s.Error, "token already exists / cannot allocate port"),
                       422: (s.ValidationError, "a field of the wrong type, or unknown"),
                       503: (s.Error, "database unavailable")},
            description="``token`` is generated when empty or absent. Reverse tokens get their "
            "SOCKS5 port at once (``port`` absent or 0: any free port). Takes effect at once."),
        Operation(
            "DELETE", "/api/token/{token}", delete_token, summary="Remove a token (token in the path)",
            tag=TAG,
            responses={200: (s.TokenResult, "removed"), 404: (s.Error, "token not found"),
                       503: (s.Error, "database unavailable")},
            description="Disconnects the token's clients; a reverse token's SOCKS5 port is closed "
            "and its connector tokens go with it."),
        Operation(
            "DELETE", "/api/token", _delete_by_body, summary="Remove a token (token in the body)",
            tag=TAG, body=s.TokenDeleteRequest, body_error="token not specified",
            operation_id="delete_token_by_body",
            responses={200: (s.TokenResult, "removed"), 400: (s.Error, "token not specified"),
                       404: (s.Error, "token not found"),
                       422: (s.ValidationError, "a field of the wrong type, or unknown"),
                       503: (s.Error, "database unavailable")}),
        # LinkSocks also answers DELETE /api/token/ (empty path token) from the body
        Operation(
            "DELETE", "/api/token/", _delete_by_body, summary="Remove a token (token in the body)",
            tag=TAG, body=s.TokenDeleteRequest, body_error="token not specified", hidden=True,
            operation_id="delete_token_by_body_slash"),
    ]
