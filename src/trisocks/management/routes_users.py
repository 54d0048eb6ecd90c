"""Users: access keys with traffic accounting, limits, expiry, status and rotation."""

from __future__ import annotations

from . import schemas as s
from .operations import Call, Operation, Reply

TAG = "users"
NOT_FOUND = (s.Error, "user not found")
UNAVAILABLE = (s.Error, "database unavailable")
INVALID = (s.ValidationError, "a field of the wrong type, out of range, missing or unknown")
BAD_BODY = (s.Error, "invalid request body")


async def server_status(call: Call):
    return call.plane.server_status()


async def list_users(call: Call):
    return call.plane.list_users(call.query)


async def remove_users(call: Call):
    return await call.plane.remove_users(call.body)


async def create_user(call: Call):
    return Reply(await call.plane.create_user(call.body), status=201)


async def get_user(call: Call):
    return call.plane.get_user(call.params["key"])


async def delete_user(call: Call):
    return await call.plane.delete_user(call.params["key"])


async def set_limit(call: Call):
    return await call.plane.update_user(call.params["key"], limit_bytes=call.body.limit_bytes)


async def set_expiry(call: Call):
    return await call.plane.update_user(call.params["key"], expires_at=call.body.expires_at)


async def patch_user(call: Call):
    body = call.body
    changes = {f: getattr(body, f) for f in body.__struct_fields__
               if getattr(body, f) is not s.UNSET}
    return await call.plane.update_user(call.params["key"], **changes)


async def reset_user(call: Call):
    return await call.plane.reset_user(call.params["key"])


async def rotate_user(call: Call):
    return await call.plane.rotate_user(call.params["key"])


def operations() -> list[Operation]:
    return [
        Operation("GET", "/api/server/status", server_status,
                  summary="Version, uptime and number of users", tag=TAG,
                  responses={200: (s.ServerStatus, "")}),
        Operation("GET", "/api/users", list_users, summary="Users, with filters and paging",
                  tag=TAG, query=s.UsersQuery,
                  responses={200: (s.UserList, "users, oldest first"), 422: INVALID},
                  description="``status`` (active, disabled, on_hold, expired, limited), "
                  "``expiring_before`` (an RFC 3339 time), ``usage_over`` (percent of "
                  "limit_bytes used), ``offset`` and ``limit`` (1000). ``total`` counts every "
                  "user that matches."),
        Operation("POST", "/api/users/remove", remove_users,
                  summary="Remove every user of the given statuses", tag=TAG, body=s.UsersRemove,
                  responses={200: (s.Removed, "the names of the users removed"), 400: BAD_BODY,
                             422: INVALID, 503: UNAVAILABLE},
                  description='{"status": ["expired", "limited"]} removes the expired and the '
                  "depleted users in one call, as DELETE /api/users/{key} would each."),
        Operation(
            "POST", "/api/users", create_user, summary="Create a user", tag=TAG, body=s.UserCreate,
            body_optional=True,
            responses={201: (s.User, "the new user"), 400: BAD_BODY,
                       409: (s.Error, "key or name already exists"), 422: INVALID,
                       503: UNAVAILABLE},
            description="Every field is optional: a strong random key (32 characters) and a name "
            "are made up when absent. The key authenticates the tunnel at once (as a forward "
            "token, and as the password of username = name on reverse-mode SOCKS5 ports)."),
        Operation("GET", "/api/users/{key}", get_user, summary="One user", tag=TAG,
                  responses={200: (s.User, ""), 404: NOT_FOUND}),
        Operation(
            "DELETE", "/api/users/{key}", delete_user, summary="Delete a user", tag=TAG,
            responses={200: (s.Deleted, ""), 404: NOT_FOUND, 503: UNAVAILABLE},
            description="The key stops working at once: open connections and sessions are closed."),
        Operation(
            "PUT", "/api/users/{key}/limit", set_limit, summary="Set or clear the traffic limit",
            tag=TAG, body=s.UserLimit,
            responses={200: (s.User, ""), 400: BAD_BODY, 404: NOT_FOUND, 422: INVALID,
                       503: UNAVAILABLE},
            description="Bytes up and down together; null: no limit. A limit at or below what the "
            "user has used closes their open connections at once."),
        Operation(
            "PUT", "/api/users/{key}/expiry", set_expiry, summary="Set or clear the expiry", tag=TAG,
            body=s.UserExpiry,
            responses={200: (s.User, ""), 400: BAD_BODY, 404: NOT_FOUND, 422: INVALID,
                       503: UNAVAILABLE},
            description="An RFC 3339 time with a zone, or null. A time in the past closes the "
            "user's connections and sessions at once."),
        Operation(
            "PATCH", "/api/users/{key}", patch_user,
            summary="Enable or disable a user (and rename, re-limit)", tag=TAG, body=s.UserPatch,
            responses={200: (s.User, ""), 400: BAD_BODY, 404: NOT_FOUND,
                       409: (s.Error, "name already exists"), 422: INVALID, 503: UNAVAILABLE},
            description='{"status": "disabled"} closes the user\'s connections and sessions at '
            'once and refuses new ones; {"status": "active"} lets them in again.'),
        Operation(
            "POST", "/api/users/{key}/reset", reset_user, summary="Zero the traffic counters",
            tag=TAG, responses={200: (s.User, ""), 404: NOT_FOUND, 503: UNAVAILABLE},
            description="A user cut off by the limit can connect again at once."),
        Operation(
            "POST", "/api/users/{key}/rotate", rotate_user, summary="Give the user a new key",
            tag=TAG,
            responses={200: (s.User, "the user, with the new key"), 404: NOT_FOUND,
                       503: UNAVAILABLE},
            description="The old key stops working at once: connections and sessions made with "
            "it are closed."),
    ]
