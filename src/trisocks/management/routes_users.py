"""Users: access keys with traffic accounting, limits, expiry, status and rotation."""

from __future__ import annotations

from . import schemas as s
from .app import Call, Reply, operation

TAG = "users"
NOT_FOUND = (s.Error, "user not found")
UNAVAILABLE = (s.Error, "database unavailable")
INVALID = (s.ValidationError, "a field of the wrong type, out of range, missing or unknown")


@operation("GET", "/api/server/status", summary="Version, uptime and number of users", tag=TAG,
           responses={200: (s.ServerStatus, "")})
async def server_status(call: Call):
    return call.plane.server_status()


@operation("GET", "/api/users", summary="Every user", tag=TAG,
           responses={200: (s.UserList, "users, oldest first")})
async def list_users(call: Call):
    return call.plane.list_users()


@operation("POST", "/api/users", summary="Create a user", tag=TAG, body=s.UserCreate,
           body_optional=True,
           responses={201: (s.User, "the new user"), 400: (s.Error, "invalid request body"),
                      409: (s.Error, "key or name already exists"), 422: INVALID,
                      503: UNAVAILABLE},
           description="Every field is optional: a strong random key (32 characters) and a name "
           "are made up when absent. The key authenticates the tunnel at once (as a forward "
           "token, and as the password of username = name on reverse-mode SOCKS5 ports).")
async def create_user(call: Call):
    return Reply(await call.plane.create_user(call.body), status=201)


@operation("GET", "/api/users/{key}", summary="One user", tag=TAG,
           responses={200: (s.User, ""), 404: NOT_FOUND})
async def get_user(call: Call):
    return call.plane.get_user(call.params["key"])


@operation("DELETE", "/api/users/{key}", summary="Delete a user", tag=TAG,
           responses={200: (s.Deleted, ""), 404: NOT_FOUND, 503: UNAVAILABLE},
           description="The key stops working at once: open connections and sessions are closed.")
async def delete_user(call: Call):
    return await call.plane.delete_user(call.params["key"])


@operation("PUT", "/api/users/{key}/limit", summary="Set or clear the traffic limit", tag=TAG,
           body=s.UserLimit,
           responses={200: (s.User, ""), 400: (s.Error, "invalid request body"), 404: NOT_FOUND,
                      422: INVALID, 503: UNAVAILABLE},
           description="Bytes up and down together; null: no limit. A limit at or below what the "
           "user has used closes their open connections at once.")
async def set_limit(call: Call):
    return await call.plane.update_user(call.params["key"], limit_bytes=call.body.limit_bytes)


@operation("PUT", "/api/users/{key}/expiry", summary="Set or clear the expiry", tag=TAG,
           body=s.UserExpiry,
           responses={200: (s.User, ""), 400: (s.Error, "invalid request body"), 404: NOT_FOUND,
                      422: INVALID, 503: UNAVAILABLE},
           description="An RFC 3339 time with a zone, or null. A time in the past closes the user's "
           "connections and sessions at once.")
async def set_expiry(call: Call):
    return await call.plane.update_user(call.params["key"], expires_at=call.body.expires_at)


@operation("PATCH", "/api/users/{key}", summary="Enable or disable a user (and rename, re-limit)",
           tag=TAG, body=s.UserPatch,
           responses={200: (s.User, ""), 400: (s.Error, "invalid request body"), 404: NOT_FOUND,
                      409: (s.Error, "name already exists"), 422: INVALID, 503: UNAVAILABLE},
           description='{"status": "disabled"} closes the user\'s connections and sessions at once '
           'and refuses new ones; {"status": "active"} lets them in again.')
async def patch_user(call: Call):
    body = call.body
    changes = {f: getattr(body, f) for f in body.__struct_fields__
               if getattr(body, f) is not s.UNSET}
    return await call.plane.update_user(call.params["key"], **changes)


@operation("POST", "/api/users/{key}/reset", summary="Zero the traffic counters", tag=TAG,
           responses={200: (s.User, ""), 404: NOT_FOUND, 503: UNAVAILABLE},
           description="A user cut off by the limit can connect again at once.")
async def reset_user(call: Call):
    return await call.plane.reset_user(call.params["key"])


@operation("POST", "/api/users/{key}/rotate", summary="Give the user a new key", tag=TAG,
           responses={200: (s.User, "the user, with the new key"), 404: NOT_FOUND,
                      503: UNAVAILABLE},
           description="The old key stops working at once: connections and sessions made with it "
           "are closed.")
async def rotate_user(call: Call):
    return await call.plane.rotate_user(call.params["key"])
