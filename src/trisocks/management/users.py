"""The user API: access keys with traffic accounting, limits, expiry, status and rotation.

An API change that forbids live traffic (disable, limit lowered, expiry in the past,
rotate, delete) closes the user's channels, and sessions where the key no longer works,
at once; the enforcer (loops.py) handles what time does.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter

from .._version import __version__
from ..policy import spec
from ..tunnel.tokens import FORWARD, TokenInfo, generate, refused_name
from . import schemas as s
from .dates import rfc3339
from .errors import Conflict, Invalid, NotFound
from .lifecycle import next_boundary, status_of
from .model import DISABLED, ON_HOLD, REASON_DISABLED, REASON_EXPIRED, UserAccount
from .policies import compiled, live, rules_in_force
from .records import user_record
from .state import PlaneState

log = logging.getLogger("trisocks.management")


def new_user_key() -> str:
    return generate(24)  # 32 characters, 192 bits


class UserService:
    def __init__(self, state: PlaneState) -> None:
        self.state = state

    def _user(self, key: str) -> UserAccount:
        user = self.state.users.get(key)
        if user is None:
            raise NotFound("user not found")
        return user

    def view(self, user: UserAccount, clients: Counter | None = None) -> s.User:
        up, down = user.totals()
        if clients is None:
            clients = self.state.user_clients()
        return s.User(key=user.key, name=user.name, id=user.id, bytes_up=up, bytes_down=down,
                      connections=len(user.channels), total_connections=user.total_connections,
                      clients=clients.get(user.id, 0),
                      limit_bytes=user.limit_bytes, expires_at=rfc3339(user.expires_at),
                      status=status_of(user, self.state.clock()), blocked=user.refuse_reason(),
                      reset_strategy=user.reset_strategy, next_reset=rfc3339(user.next_reset),
                      last_reset=rfc3339(user.last_reset), on_hold_duration=user.on_hold_duration,
                      created_at=rfc3339(user.created_at), last_seen=rfc3339(user.last_seen),
                      policy=user.policy, rules_in_force=rules_in_force(user, self._server_rules()),
                      live=live(user))

    def _server_rules(self):
        server = self.state.server
        return server.destination_rules if server is not None else None

    def server_status(self) -> s.ServerStatus:
        return s.ServerStatus(version=__version__,
                              uptime_seconds=round(time.time() - self.state.started_at, 3),
                              total_users=len(self.state.users), status="running")

    def list(self, q: s.UsersQuery | None = None) -> s.UserList:
        clients = self.state.user_clients()
        chosen = [u for u in self.state.users.values() if q is None or self._matches(u, q)]
        if q is not None:
            page = chosen[q.offset: q.offset + q.limit]
        else:
            page = chosen
        return s.UserList(users=[self.view(u, clients) for u in page], total=len(chosen))

    def _matches(self, user: UserAccount, q: s.UsersQuery) -> bool:
        if q.status is not None and status_of(user, self.state.clock()) != q.status:
            return False
        if q.expiring_before is not None and (
                user.expires_at is None or user.expires_at >= q.expiring_before.timestamp()):
            return False
        # usage_over: a user without a limit has used no share of one
        return q.usage_over is None or (
            user.limit_bytes is not None and user.used * 100 >= q.usage_over * user.limit_bytes)

    async def remove(self, req: s.UsersRemove) -> s.Removed:
        """Delete every user whose status is one of ``req.status`` (expired, depleted...)."""
        now = self.state.clock()
        doomed = [u.key for u in list(self.state.users.values()) if status_of(u, now) in req.status]
        removed = []
        for key in doomed:
            try:
                removed.append(self.state.users[key].name)
                await self.delete(key)
            except NotFound:  # gone meanwhile
                removed.pop()
        return s.Removed(removed=removed)

    def get(self, key: str) -> s.User:
        return self.view(self._user(key))

    async def create(self, req: s.UserCreate) -> s.User:
        st = self.state
        user_id = secrets.token_hex(8)
        key = req.key if req.key is not s.UNSET else new_user_key()
        name = req.name if req.name is not s.UNSET else f"user-{user_id[:8]}"
        reason = refused_name(key, "key")
        if reason is not None:
            raise Invalid(reason)
        async with st.lock:
            if key in st.users or st.tokens.get(key) is not None:
                raise Conflict("key already exists")
            if name in st.users_by_name:
                raise Conflict("name already exists")
            if (req.status == ON_HOLD) != (req.on_hold_duration is not None):
                raise Invalid("status on_hold and on_hold_duration go together")
            now = st.clock()
            user = UserAccount(id=user_id, key=key, name=name, limit_bytes=req.limit_bytes,
                               expires_at=req.expires_at.timestamp() if req.expires_at else None,
                               status=req.status, reset_strategy=req.reset_strategy,
                               next_reset=next_boundary(req.reset_strategy, now, st.tz),
                               on_hold_duration=req.on_hold_duration)
            user.on_quota = st.quota_reached
            if req.policy is not s.UNSET:
                policy = spec.merged(None, req.policy)
                spec.put_in_force(user, policy, compiled(policy))
            await st.persist(st.store.put_user(user_record(user)))
            st.users[key] = user
            st.users_by_name[name] = user
            st.tokens.add(TokenInfo(key, FORWARD, account=user))
            st.wake_enforcer()
        st.events.add("user_created", user=name)
        log.info("API: user %s created", name)
        return self.view(user)

    async def delete(self, key: str) -> s.Deleted:
        st = self.state
        async with st.lock:
            user = self._user(key)
            await st.persist(st.store.delete_user(user.id))
            del st.users[key]
            st.users_by_name.pop(user.name, None)
            st.tokens.remove(key)
            user.status = DISABLED
            user.update_allow()
            st.cut(user, "user deleted", sessions=True)
        st.events.add("user_deleted", user=user.name)
        log.info("API: user %s deleted", user.name)
        return s.Deleted(key=key)

    async def update(self, key: str, **changes) -> s.User:
        """Change status, name, limit_bytes and/or expires_at; cut live traffic they forbid."""
        st = self.state
        async with st.lock:
            user = self._user(key)
            fields = {}
            if "status" in changes:
                fields["status"] = changes["status"]
            if "name" in changes and changes["name"] != user.name:
                if changes["name"] in st.users_by_name:
                    raise Conflict("name already exists")
                fields["name"] = changes["name"]
            if "limit_bytes" in changes:
                fields["limit_bytes"] = changes["limit_bytes"]
            if "reset_strategy" in changes:
                fields["reset_strategy"] = changes["reset_strategy"]
                fields["next_reset"] = next_boundary(changes["reset_strategy"], st.clock(), st.tz)
            if "on_hold_duration" in changes:
                fields["on_hold_duration"] = changes["on_hold_duration"]
            hold = fields.get("on_hold_duration", user.on_hold_duration)
            if fields.get("status", user.status) == ON_HOLD and hold is None:
                raise Invalid("status on_hold needs on_hold_duration")
            if "expires_at" in changes:
                when = changes["expires_at"]
                fields["expires_at"] = when.timestamp() if when is not None else None
            policy = rules = None
            if "policy" in changes:
                policy = spec.merged(user.policy, changes["policy"])
                rules = compiled(policy)
            stored = dict(fields, policy=spec.encode(policy)) if policy is not None else fields
            await st.persist(st.store.put_user(user_record(user, **stored)))
            if policy is not None:
                spec.put_in_force(user, policy, rules)
            if "name" in fields:
                st.users_by_name.pop(user.name, None)
                st.users_by_name[fields["name"]] = user
            for name, value in fields.items():
                setattr(user, name, value)
            user.update_allow()
            if "limit_bytes" in fields:
                user.quota_noted = False  # a new limit: crossing it is news again
            after = user.refuse_reason()
            if after is not None:
                # disabled or expired: the key no longer opens a session either
                st.cut(user, after, sessions=after in (REASON_DISABLED, REASON_EXPIRED))
                if after == REASON_EXPIRED:
                    user.expiry_noted = True
            st.wake_enforcer()
        if "policy" in changes:
            fields["policy"] = spec.encode(changes["policy"])
        detail = ", ".join(f"{k}={v}" for k, v in fields.items())
        st.events.add("user_updated", user=user.name, detail=detail or None)
        log.info("API: user %s updated (%s)", user.name, ", ".join(fields) or "no change")
        return self.view(user)

    async def reset(self, key: str) -> s.User:
        st = self.state
        async with st.lock:
            user = self._user(key)
            now = st.clock()
            await st.persist(st.store.reset_user(user.id))
            # last_reset moves too: the other nodes of a cluster see the reset by it
            await st.persist(st.store.put_user(user_record(user, last_reset=now)))
            user.reset()
            user.flushed = (0, 0, *user.flushed[2:])
            user.last_reset = now
        st.events.add("user_reset", user=user.name)
        log.info("API: user %s counters reset", user.name)
        return self.view(user)

    async def rotate(self, key: str) -> s.User:
        st = self.state
        async with st.lock:
            user = self._user(key)
            new_key = new_user_key()
            await st.persist(st.store.put_user(user_record(user, key=new_key)))
            st.tokens.remove(key)
            del st.users[key]
            st.cut(user, "key rotated", sessions=True)
            user.key = new_key
            st.users[new_key] = user
            st.tokens.add(TokenInfo(new_key, FORWARD, account=user))
        st.events.add("user_rotated", user=user.name)
        log.info("API: user %s has a new key", user.name)
        return self.view(user)
