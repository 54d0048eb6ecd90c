"""Webhooks: events posted as signed JSON to URLs the operator chose (docs/api.md).

From the API (kept in the store; in a cluster each node posts the events it sees) or the
configuration file (``replace_from_config``). :meth:`WebhookService.hear` hears every event
(events.py): it queues it for each webhook that wants it and returns, with no await and no
I/O, so whoever adds an event (the data path included) never waits. A task per webhook
posts its queue in order, signed, retrying with a backoff that doubles from 1 s to 5
minutes; an event is given up after ``max_attempts`` or ``max_age``, a full queue drops its
oldest. A ``user_updated`` that disables, enables or expires a user is followed by
``user_disabled``, ``user_enabled`` or ``user_expired``: receivers need not parse its detail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import ssl
import time
from collections import deque
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

import h11
import msgspec
import trio
from msgspec import Meta, Struct

from .._version import __version__
from ..net import guard
from ..tunnel.tokens import digest
from ..wire.names import check_host
from .dates import rfc3339
from .errors import Conflict, InvalidField, NotFound, Refused
from .events import TYPES
from .lifecycle import DISABLED, EXPIRED, status_of
from .rows import WebhookRecord
from .state import PlaneState
from .store import EventRecord

log = logging.getLogger("trisocks.management.webhooks")

# what a webhook gets when it names no events
WEBHOOK_EVENTS = ("quota_warning", "quota_exceeded", "user_expired", "user_disabled",
                  "user_enabled", "user_reset", "user_activated", "provider_joined",
                  "provider_left", "server_started", "server_stopping")
MAX_QUEUE, MAX_AGE = 1000, 3600.0  # events per webhook; seconds before one is given up
MAX_ATTEMPTS = 12  # 1+2+4+...+256+300+300 s: about 18 minutes of trying
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
TIMEOUT = 10.0  # one attempt: connect, send, and the answer's head
STOP_DRAIN = 3.0  # at shutdown: seconds to post what is still queued (server_stopping...)
# the events after which a user's status may have changed (see WebhookService._follow)
_USER_EVENTS = frozenset({"user_created", "user_updated", "user_reset", "user_expired",
                          "user_activated", "user_rotated", "quota_exceeded", "user_deleted"})

HookUrl = Annotated[str, Meta(pattern=r"^[hH][tT][tT][pP][sS]?://\S+$", max_length=2048,
                              description="http:// or https:// URL the events are posted to")]
Secret = Annotated[str, Meta(min_length=16, max_length=1024, description=(
    "key of the HMAC-SHA256 signature, at least 16 characters; never shown again"))]
HookName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{0,64}$", description=(
    "unique label, up to 64 characters of A-Z a-z 0-9 . _ -; generated when empty"))]
EventType = Literal[TYPES]


class Webhook(Struct, forbid_unknown_fields=True, kw_only=True):
    """A webhook as the API (POST /api/webhooks) and the configuration file give it."""

    url: HookUrl
    secret: Secret
    events: Annotated[list[EventType], Meta(min_length=1, description=(
        "event types to post; absent or null: every webhook event"))] | None = None
    name: HookName = ""


class WebhookView(Struct, kw_only=True):
    """A webhook as the API shows it: the secret redacted, and its delivery counters."""

    name: str
    url: str  # a password in the URL is not shown
    secret: str  # "***(N chars, sha256 <8 hex>)"
    events: list[str] | None
    origin: Literal["api", "config"]
    created_at: datetime
    queued: int  # waiting, the one being posted included
    delivered: int
    failed: int  # failed attempts (each retry counts)
    dropped: int  # the queue was full: the oldest event went
    expired: int  # given up after max_attempts attempts or max_age seconds
    last_delivery: datetime | None
    last_error: str | None


class WebhookList(Struct, kw_only=True):
    webhooks: list[WebhookView]  # in the order they were added


class WebhookDeleted(Struct, kw_only=True):
    success: bool = True
    name: str


class WebhookTest(Struct, kw_only=True):
    """A test event was queued; ``id`` is the id its POST carries."""
    success: bool = True
    name: str
    id: int


class Payload(Struct, kw_only=True, omit_defaults=False):
    id: int
    type: str
    time: datetime
    user: str | None
    token: str | None
    detail: str | None


_encode = msgspec.json.Encoder().encode


def checked(hook: Webhook) -> Webhook:
    """``hook`` if it can be used, else InvalidField naming the field (a Struct made in Python
    skips the constraints that decoding applies)."""
    try:
        parts = urlsplit(hook.url)
        parts.port  # noqa: B018  (a port out of range raises)
        check_host(parts.hostname or "")  # BadHostName is a ValueError
    except ValueError:
        parts = None
    if parts is None or not hook.url.isprintable() or any(c.isspace() for c in hook.url) or \
            parts.scheme.lower() not in ("http", "https"):
        raise InvalidField("url must be an http:// or https:// URL with a host", field="url")
    if len(hook.secret) < 16:
        raise InvalidField("secret must have at least 16 characters", field="secret")
    if hook.events is not None:
        unknown = [e for e in hook.events if e not in TYPES]
        if unknown or not hook.events:
            raise InvalidField(f"unknown event type {unknown[0]!r}" if unknown else
                               "events must name at least one event type", field="events")
    if len(hook.name) > 64 or not all(c.isascii() and (c.isalnum() or c in "._-")
                                      for c in hook.name):
        raise InvalidField("name: up to 64 characters of A-Z a-z 0-9 . _ -", field="name")
    return hook


def shown_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def redacted(secret: str) -> str:
    return f"***({len(secret)} chars, sha256 {hashlib.sha256(secret.encode()).hexdigest()[:8]})"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


async def post(url: str, body: bytes, headers: list[tuple[str, str]], *, timeout: float,
               ssl_context: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``url`` (h11 on a trio socket, TLS for https); the answer's status.
    Raises OSError, trio.TooSlowError or h11.ProtocolError."""
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [("Host", parts.netloc.rpartition("@")[2]), *headers,
            ("Content-Length", str(len(body))), ("Connection", "close")]
    if parts.username is not None:
        basic = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        head.append(("Authorization", "Basic " + base64.b64encode(basic).decode()))
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or (443 if https else 80))
        try:
            if https:
                stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                        server_hostname=parts.hostname, https_compatible=True)
                await stream.do_handshake()
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(method="POST", target=target, headers=head))
                                  + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                elif isinstance(event, h11.Response):
                    return event.status_code
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed without an answer")
        finally:
            await trio.aclose_forcefully(stream)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    exc = exc.__cause__ or exc  # a TLS failure comes as BrokenResourceError from SSLError
    return str(exc) or type(exc).__name__


class _Item:
    __slots__ = ("attempts", "body", "born", "id", "type")

    def __init__(self, id: int, type: str, body: bytes) -> None:
        self.id, self.type, self.body, self.born, self.attempts = id, type, body, time.monotonic(), 0


class _Hook:
    """A webhook at work: its settings, queue, counters and delivery task."""

    def __init__(self, config: Webhook, origin: str, created_at: float) -> None:
        self.configure(config)
        self.origin, self.created_at = origin, created_at
        self.queue: deque[_Item] = deque()
        self.current: _Item | None = None  # being posted
        self.delivered = self.failed = self.dropped = self.expired = 0
        self.last_delivery: float | None = None
        self.last_error: str | None = None
        self.wake = trio.Event()
        self.scope = trio.CancelScope()

    def configure(self, config: Webhook) -> None:
        self.config = config
        self.wanted = frozenset(config.events if config.events is not None else WEBHOOK_EVENTS)

    def push(self, item: _Item, limit: int) -> None:
        while len(self.queue) >= limit:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(item)
        self.wake.set()

    def view(self) -> WebhookView:
        c = self.config
        return WebhookView(
            name=c.name, url=shown_url(c.url), secret=redacted(c.secret), events=c.events,
            origin=self.origin, created_at=rfc3339(self.created_at),
            queued=len(self.queue) + (self.current is not None), delivered=self.delivered,
            failed=self.failed, dropped=self.dropped, expired=self.expired,
            last_delivery=rfc3339(self.last_delivery), last_error=self.last_error)


class WebhookService:
    """The webhooks of a plane: their registry, the event hook, and delivery."""

    def __init__(self, state: PlaneState) -> None:
        self.state = state
        self.hooks: dict[str, _Hook] = {}
        self._wanted: frozenset[str] = frozenset()  # every type some webhook wants
        self._status: dict[str, str] = {}  # user id -> status word at its last event
        self._nursery: trio.Nursery | None = None
        self._stopping_noted = False
        # tunables (tests shorten them)
        self.max_queue, self.max_attempts, self.max_age = MAX_QUEUE, MAX_ATTEMPTS, MAX_AGE
        self.backoff_first, self.backoff_max, self.timeout = BACKOFF_FIRST, BACKOFF_MAX, TIMEOUT
        self.ssl_context: ssl.SSLContext | None = None  # None: the system's CAs
        self.stop_drain = STOP_DRAIN
        state.events.listener = self.hear

    # -- the event hook: called by EventLog.add, never awaits ---------------------------------
    def hear(self, rec: EventRecord) -> None:
        if rec.type in _USER_EVENTS:
            self._follow(rec)
        if rec.type not in self._wanted:
            return
        body = None
        for hook in self.hooks.values():
            if rec.type in hook.wanted:
                if body is None:
                    body = self._body(rec.id, rec.type, rec.time, rec.user, rec.token, rec.detail)
                hook.push(_Item(rec.id, rec.type, body), self.max_queue)

    @staticmethod
    def _body(id: int, type: str, when: float, user, token, detail) -> bytes:
        return _encode(Payload(id=id, type=type, time=rfc3339(when), user=user,
                               token=digest(token)[:12] if token else None, detail=detail))

    def _follow(self, rec: EventRecord) -> None:
        """Keep each user's status word; a user_updated that changed it is followed by the
        event that names the change."""
        st = self.state
        user = st.users_by_name.get(rec.user) if rec.user is not None else None
        if user is None:
            if rec.type == "user_deleted":
                alive = {u.id for u in st.users.values()}
                self._status = {k: v for k, v in self._status.items() if k in alive}
            return
        now = status_of(user, st.clock())
        before = self._status.get(user.id)
        self._status[user.id] = now
        if rec.type != "user_updated" or before is None or before == now:
            return
        if now == DISABLED:
            st.events.add("user_disabled", user=user.name, detail=f"was {before}")
        elif before == DISABLED:
            st.events.add("user_enabled", user=user.name, detail=f"now {now}")
        elif now == EXPIRED:
            st.events.add("user_expired", user=user.name, detail="expiry set in the past")

    # -- the plane's start and stop -------------------------------------------------------------
    def server_started(self, detail: str) -> None:
        self.state.events.add("server_started", detail=detail)

    def server_stopping(self, detail: str) -> None:
        if not self._stopping_noted:
            self._stopping_noted = True
            self.state.events.add("server_stopping", detail=detail or None)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled (a task per webhook)."""
        now = self.state.clock()
        for user in self.state.users.values():
            self._status.setdefault(user.id, status_of(user, now))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for hook in self.hooks.values():
                    nursery.start_soon(guard.contained, "webhook delivery", self._deliver, hook)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def drain(self, seconds: float | None = None) -> None:
        """At shutdown, the tasks gone: one attempt for each queued event, for ``seconds``
        (``stop_drain``: 3)."""
        with trio.move_on_after(self.stop_drain if seconds is None else seconds):
            async with trio.open_nursery() as nursery:
                for hook in self.hooks.values():
                    nursery.start_soon(self._drain_one, hook)

    async def _drain_one(self, hook: _Hook) -> None:
        while hook.queue and await self._attempt(hook, hook.queue.popleft()):
            pass

    # -- delivery ---------------------------------------------------------------------------------
    async def _deliver(self, hook: _Hook) -> None:
        with hook.scope:
            backoff = 0.0
            while True:
                if not hook.queue:
                    hook.wake = trio.Event()
                    await hook.wake.wait()
                    continue
                item = hook.queue.popleft()
                if time.monotonic() - item.born >= self.max_age:
                    hook.expired += 1
                    continue
                hook.current = item
                try:
                    ok = await self._attempt(hook, item)
                except BaseException:
                    hook.queue.appendleft(item)  # cancelled: drain() may still post it
                    raise
                finally:
                    hook.current = None
                if ok:
                    backoff = 0.0
                    continue
                item.attempts += 1
                if item.attempts >= self.max_attempts:
                    hook.expired += 1
                elif len(hook.queue) >= self.max_queue:
                    hook.dropped += 1  # the oldest, and the queue is full
                else:
                    hook.queue.appendleft(item)
                backoff = min(self.backoff_max, backoff * 2 if backoff else self.backoff_first)
                await trio.sleep(backoff)

    async def _attempt(self, hook: _Hook, item: _Item) -> bool:
        """One POST of ``item``; counts it and says whether it was delivered."""
        c = hook.config
        stamp = str(int(time.time()))
        headers = [("User-Agent", f"trisocks/{__version__}"), ("Content-Type", "application/json"),
                   ("X-Trisocks-Event", item.type), ("X-Trisocks-Delivery", str(item.id)),
                   ("X-Trisocks-Timestamp", stamp),
                   ("X-Trisocks-Signature", signature(c.secret, stamp, item.body))]
        try:
            status = await post(c.url, item.body, headers, timeout=self.timeout,
                                ssl_context=self.ssl_context)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            error = _describe(exc)
        except Exception as exc:
            guard.report(f"webhook {c.name}", exc)
            error = repr(exc)
        if error is None:
            if hook.last_error is not None:
                log.info("webhook %s: delivering again", c.name)
            hook.delivered, hook.last_delivery, hook.last_error = hook.delivered + 1, time.time(), None
            return True
        if hook.last_error is None:
            log.warning("webhook %s: %s (retrying with backoff)", c.name, error)
        hook.failed, hook.last_error = hook.failed + 1, error
        return False

    # -- the registry -------------------------------------------------------------------------------
    def _install(self, config: Webhook, origin: str, created_at: float) -> _Hook:
        hook = self.hooks[config.name] = _Hook(config, origin, created_at)
        self._rewant()
        if self._nursery is not None:
            self._nursery.start_soon(guard.contained, "webhook delivery", self._deliver, hook)
        return hook

    def _uninstall(self, name: str) -> None:
        self.hooks.pop(name).scope.cancel()
        self._rewant()

    def _rewant(self) -> None:
        self._wanted = frozenset().union(*(h.wanted for h in self.hooks.values()))

    def restore(self, records: list[WebhookRecord], *, follow: bool = False) -> None:
        """Install stored webhooks; ``follow``: drop those another node's API removed."""
        gone = {n for n, h in self.hooks.items() if h.origin == "api"} - {r.name for r in records}
        for name in gone if follow else ():
            self._uninstall(name)
        for rec in records:
            try:
                config = checked(Webhook(url=rec.url, secret=rec.secret, events=rec.events, name=rec.name))
            except InvalidField as exc:
                log.warning("stored webhook %r not restored: %s", rec.name, exc.message)
                continue
            if rec.name not in self.hooks:
                self._install(config, "api", rec.created_at)

    def list(self) -> WebhookList:
        return WebhookList(webhooks=[hook.view() for hook in self.hooks.values()])

    async def add(self, hook: Webhook, *, origin: str = "api") -> WebhookView:
        checked(hook)
        st = self.state
        async with st.lock:
            name = hook.name or f"webhook-{secrets.token_hex(4)}"
            if name in self.hooks:
                raise Conflict(f"webhook {name} already exists")
            config = msgspec.structs.replace(hook, name=name)
            now = time.time()
            if origin == "api":
                await st.persist(st.store.put_webhook(WebhookRecord(
                    name=name, url=config.url, secret=config.secret, events=config.events,
                    created_at=now)))
            live = self._install(config, origin, now)
        log.info("webhook %s added (%s): %s", name, origin, shown_url(config.url))
        return live.view()

    async def remove(self, name: str, *, origin: str = "api") -> WebhookDeleted:
        st = self.state
        async with st.lock:
            hook = self.hooks.get(name)
            if hook is None:
                raise NotFound("webhook not found")
            if hook.origin != origin:
                where = "configuration file" if hook.origin == "config" else "API"
                raise Refused(f"webhook {name} comes from the {where}: remove it there")
            if origin == "api":
                await st.persist(st.store.delete_webhook(name))
            self._uninstall(name)
        log.info("webhook %s removed", name)
        return WebhookDeleted(name=name)

    async def replace_from_config(self, hooks: list[Webhook]) -> None:
        """Make the webhooks of origin "config" exactly ``hooks`` (those of the API stay).
        A webhook kept by name keeps its queue and counters; nothing changes on an error."""
        wanted: dict[str, Webhook] = {}
        for hook in hooks:
            checked(hook)
            name, n = hook.name or "config-" + digest(hook.url)[:8], 2
            if hook.name and name in wanted:
                raise InvalidField(f"webhook name {name} is given twice", field="name")
            while name in wanted:  # the same URL twice, unnamed
                name, n = f"config-{digest(hook.url)[:8]}-{n}", n + 1
            wanted[name] = msgspec.structs.replace(hook, name=name)
        async with self.state.lock:
            for name in wanted:
                if name in self.hooks and self.hooks[name].origin != "config":
                    raise Conflict(f"webhook name {name} is taken by one added through the API")
            for name in [n for n, h in self.hooks.items() if h.origin == "config" and n not in wanted]:
                self._uninstall(name)
            for name, config in wanted.items():
                live = self.hooks.get(name)
                if live is None:
                    self._install(config, "config", time.time())
                elif live.config != config:
                    live.configure(config)
            self._rewant()

    def test(self, name: str) -> WebhookTest:
        """Queue a ``test`` event for one webhook (whatever its events)."""
        hook = self.hooks.get(name)
        if hook is None:
            raise NotFound("webhook not found")
        ident = self.state.events.reserve_id()
        body = self._body(ident, "test", time.time(), None, None, f"test of webhook {name}")
        hook.push(_Item(ident, "test", body), self.max_queue)
        return WebhookTest(name=name, id=ident)
