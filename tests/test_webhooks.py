"""Webhooks (issue 12 item 5): events posted as signed JSON to a local receiver, each once;
retries with backoff while the receiver is down or failing; a bounded queue with a dropped
counter; and the tunnel's throughput the same with a dead receiver as without one."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import pytest
import trio

from trisocks.management import SQLiteStore
from trisocks.management.errors import Conflict, InvalidField
from trisocks.management.store import WebhookRecord
from trisocks.management.webhooks import Webhook
from trisocks.net import guard

from .api_support import http, running_api, start_api_server, wait_until
from .inproc import echo_handler, echo_roundtrip, serve_tcp

SECRET = "receiver-secret-0123456789"
REV = "wh-reverse-token-0001"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    target: str
    status: int

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        stamp = self.headers["x-trisocks-timestamp"]
        mac = hmac.new(secret.encode(), f"{stamp}.".encode() + self.body, hashlib.sha256)
        return (hmac.compare_digest(self.headers["x-trisocks-signature"], "sha256=" + mac.hexdigest())
                and abs(time.time() - int(stamp)) < 300)


class Receiver:
    """A local HTTP server that records every request and answers 200, or the statuses in
    ``answers`` first; it can be stopped (connections refused) and started on its port again."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.answers: list[int] = []
        self.port = 0
        self.tls = tls
        self._scope: trio.CancelScope | None = None
        self._closed = trio.Event()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook?x=1"

    def delivered(self, type: str | None = None) -> list[dict]:
        return [r.event for r in self.requests
                if 200 <= r.status < 300 and (type is None or r.event["type"] == type)]

    async def _handle(self, stream) -> None:
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        conn = h11.Connection(h11.SERVER)
        head, body = None, bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            status = self.answers.pop(0) if self.answers else 200
            self.requests.append(Received({k.decode().lower(): v.decode() for k, v in head.headers},
                                          bytes(body), head.target.decode(), status))
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                ("Content-Length", "2"), ("Connection", "close")])) + conn.send(h11.Data(data=b"ok"))
                + conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def start(self, nursery) -> None:
        self._scope = trio.CancelScope()
        self._closed = trio.Event()

        async def serve(*, task_status):
            try:
                with self._scope:
                    await trio.serve_tcp(self._handle, self.port, host="127.0.0.1",
                                         task_status=task_status)
            finally:
                self._closed.set()

        listeners = await nursery.start(serve)
        self.port = listeners[0].socket.getsockname()[1]

    async def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        self._scope.cancel()
        await self._closed.wait()


async def hooks_of(api) -> dict[str, dict]:
    r = await api.get("/api/webhooks")
    assert r.status_code == 200, r.text
    return {h["name"]: h for h in r.json()["webhooks"]}


def quick(api, **more) -> None:
    """Retries in tens of milliseconds rather than seconds."""
    hooks = api.plane.webhooks
    hooks.backoff_first, hooks.backoff_max, hooks.stop_drain = 0.05, 0.2, 1.0
    for name, value in more.items():
        setattr(hooks, name, value)


async def test_each_listed_event_arrives_once_signed(tmp_path):
    db = tmp_path / "hooks.db"
    receiver = Receiver()
    now = [time.time()]
    async with trio.open_nursery() as outer:
        await receiver.start(outer)
        async with running_api(store=SQLiteStore(db)) as api, trio.open_nursery() as nursery:
            st = api.plane.state
            st.clock = lambda: now[0]
            r = await api.post("/api/webhooks", json={"url": receiver.url, "secret": SECRET,
                                                      "name": "panel"})
            assert r.status_code == 201, r.text
            shown = r.json()
            assert SECRET not in r.text and shown["secret"].startswith("***(26 chars")
            assert (shown["origin"], shown["events"], shown["delivered"]) == ("api", None, 0)

            async def arrived(*types):
                await wait_until(lambda: all(receiver.delivered(t) for t in types),
                                 f"{types} at the receiver")

            echo = await serve_tcp(nursery, echo_handler)
            carol = await api.create_user(name="carol", limit_bytes=100_000)
            socks = await api.client(nursery, carol["key"])
            assert await echo_roundtrip(socks, echo, b"c" * 41_000)  # 82 000 of 100 000 bytes
            await arrived("quota_warning")
            assert not receiver.delivered("quota_exceeded")
            await echo_roundtrip(socks, echo, b"c" * 20_000)  # past the limit: cut
            await arrived("quota_exceeded")
            assert (await api.post(f"/api/users/{carol['key']}/reset")).status_code == 200
            await arrived("user_reset")
            for status in ("disabled", "active"):
                r = await api.patch(f"/api/users/{carol['key']}", json={"status": status})
                assert r.status_code == 200, r.text
            await arrived("user_disabled", "user_enabled")
            r = await api.put(f"/api/users/{carol['key']}/expiry",
                              json={"expires_at": iso(now[0] + 3600)})
            assert r.status_code == 200, r.text
            now[0] += 3601
            st.wake_enforcer()
            await arrived("user_expired")

            dora = await api.create_user(name="dora", status="on_hold", on_hold_duration=86400)
            assert await echo_roundtrip(await api.client(nursery, dora["key"]), echo, b"first")
            await arrived("user_activated")

            assert (await api.post("/api/token", json={"type": "reverse", "token": REV})).is_success
            await api.client(nursery, REV, reverse=True)
            await arrived("provider_joined")
            assert (await api.delete(f"/api/token/{REV}")).status_code == 200
            await arrived("provider_left")
            nursery.cancel_scope.cancel()
        # the plane stopped: server_stopping was posted on the way out
        await arrived("server_stopping")

        async with running_api(store=SQLiteStore(db)) as api:  # the webhook was kept
            hooks = await hooks_of(api)
            assert list(hooks) == ["panel"] and hooks["panel"]["origin"] == "api"
            await arrived("server_started")
        outer.cancel_scope.cancel()

    listed = ("quota_warning", "quota_exceeded", "user_reset", "user_disabled", "user_enabled",
              "user_expired", "user_activated", "provider_joined", "provider_left",
              "server_started", "server_stopping")
    events = receiver.delivered()
    counts = Counter(e["type"] for e in events)
    # once each; server_stopping once per run; nothing else (user_created... are not listed)
    assert counts == {**dict.fromkeys(listed, 1), "server_stopping": 2}, counts
    assert len({e["id"] for e in events}) == len(events)
    for req in receiver.requests:
        assert req.signed_with(SECRET)
        assert not req.signed_with("another-secret-0123456789")
        assert req.target == "/hook?x=1"
        assert req.headers["content-type"] == "application/json"
        assert req.headers["user-agent"].startswith("trisocks/")
        assert req.headers["x-trisocks-event"] == req.event["type"]
        assert set(req.event) == {"id", "type", "time", "user", "token", "detail"}
        assert REV.encode() not in req.body and carol["key"].encode() not in req.body
    by_type = {e["type"]: e for e in events}
    assert by_type["quota_warning"]["user"] == "carol"
    assert by_type["user_activated"]["user"] == "dora"
    assert by_type["provider_joined"]["token"] == hashlib.sha256(REV.encode()).hexdigest()[:12]
    assert datetime.fromisoformat(by_type["user_reset"]["time"]).tzinfo is not None


async def test_failed_answers_and_a_dead_receiver_are_retried():
    receiver = Receiver()
    async with trio.open_nursery() as outer:
        await receiver.start(outer)
        async with running_api() as api:
            quick(api)
            receiver.answers = [500, 503]
            r = await api.post("/api/webhooks", json={"url": receiver.url, "secret": SECRET,
                                                      "events": ["user_reset"]})
            name = r.json()["name"]
            r = await api.post(f"/api/webhooks/{name}/test")
            assert r.status_code == 202, r.text
            first = r.json()["id"]
            await wait_until(lambda: receiver.delivered(), "the test event after two failures")
            assert [(q.status, q.event["id"]) for q in receiver.requests] == [
                (500, first), (503, first), (200, first)]
            hook = (await hooks_of(api))[name]
            assert (hook["delivered"], hook["failed"], hook["queued"]) == (1, 2, 0)

            await receiver.stop()  # down: connections refused
            ids = [(await api.post(f"/api/webhooks/{name}/test")).json()["id"] for _ in range(3)]

            async def retried():
                hook = (await hooks_of(api))[name]
                return hook["failed"] >= 2 + 4 and hook
            hook = await wait_until(retried, "retries while the receiver is down")
            assert hook["queued"] == 3 and hook["last_error"]
            await receiver.start(outer)  # back, on the same port
            await wait_until(lambda: len(receiver.delivered()) == 4, "the queue delivered")
            assert [e["id"] for e in receiver.delivered()] == [first, *ids]  # in order, once
            hook = (await hooks_of(api))[name]
            assert (hook["delivered"], hook["queued"], hook["last_error"]) == (4, 0, None)
            assert all(q.signed_with(SECRET) for q in receiver.requests)
        outer.cancel_scope.cancel()


async def test_the_queue_stays_bounded_and_counts_what_it_drops():
    receiver = Receiver()
    async with trio.open_nursery() as outer:
        await receiver.start(outer)
        await receiver.stop()
        async with running_api() as api:
            quick(api, max_queue=20)
            r = await api.post("/api/webhooks", json={"url": receiver.url, "secret": SECRET,
                                                      "name": "flooded"})
            assert r.status_code == 201
            for _ in range(5):
                assert (await api.post("/api/webhooks/flooded/test")).status_code == 202
            last = None
            for _ in range(2000):  # events the data path and the API would add
                last = api.plane.events.add("user_reset", user="nobody", detail="flood").id
            hook = (await hooks_of(api))["flooded"]
            assert hook["queued"] <= 21
            assert hook["queued"] + hook["dropped"] + hook["expired"] == 2005
            assert hook["dropped"] >= 2005 - 21
            live = api.plane.webhooks.hooks["flooded"]
            assert len(live.queue) <= 20
            await receiver.start(outer)
            await wait_until(lambda: receiver.delivered() and receiver.delivered()[-1]["id"] == last,
                             "the newest events delivered")
            got = [e["id"] for e in receiver.delivered()]
            assert len(got) <= 21 and got == sorted(got)
        outer.cancel_scope.cancel()


async def test_throughput_is_the_same_with_a_dead_receiver():
    """The event hook is a plain call (no await): it appends and returns; delivery runs in
    tasks of its own. A transfer while a webhook's receiver is dead (and events keep coming)
    is as fast as one without webhooks, within generous noise."""
    receiver = Receiver()
    payload = b"t" * (32 << 20)
    async with trio.open_nursery() as outer:
        await receiver.start(outer)
        await receiver.stop()
        async with running_api(tokens=["wh-bulk-token-01"]) as api, trio.open_nursery() as nursery:
            quick(api, backoff_first=0.01, backoff_max=0.05)
            hooks = api.plane.webhooks
            assert not inspect.iscoroutinefunction(hooks.hear)
            echo = await serve_tcp(nursery, echo_handler)
            socks = await api.client(nursery, "wh-bulk-token-01")

            async def churn():  # events all along: each one queued for the dead receiver
                while True:
                    api.plane.events.add("user_reset", user="nobody")
                    await trio.sleep(0.001)

            nursery.start_soon(churn)

            async def transfer() -> float:
                t0 = time.perf_counter()
                assert await echo_roundtrip(socks, echo, payload)
                return time.perf_counter() - t0

            await transfer()  # warm up
            base, down, failed = [], [], 0
            for _ in range(3):
                base.append(await transfer())
                await hooks.add(Webhook(url=receiver.url, secret=SECRET, name="dead"))
                down.append(await transfer())
                failed += hooks.hooks["dead"].failed
                await hooks.remove("dead")
            assert hooks.hooks == {}
            assert failed >= 3  # the dead receiver was tried again and again meanwhile
            assert min(down) <= min(base) * 1.5 + 0.1, (base, down)
            # the hook costs microseconds: 20 000 events with a webhook listening
            await hooks.add(Webhook(url=receiver.url, secret=SECRET, name="dead"))
            t0 = time.perf_counter()
            for _ in range(20_000):
                api.plane.events.add("user_reset", user="nobody")
            assert time.perf_counter() - t0 < 2.0
            assert len(hooks.hooks["dead"].queue) <= hooks.max_queue
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_https_receiver():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    receiver = Receiver(tls=server_ctx)
    async with trio.open_nursery() as outer:
        await receiver.start(outer)
        async with running_api() as api:
            quick(api)
            api.plane.webhooks.ssl_context = client_ctx
            r = await api.post("/api/webhooks", json={"url": receiver.url, "secret": SECRET,
                                                      "name": "tls"})
            assert r.status_code == 201
            await api.post("/api/webhooks/tls/test")
            await wait_until(lambda: receiver.delivered("test"), "the test event over TLS")
            assert receiver.requests[0].signed_with(SECRET)
            # an untrusted certificate is a failure, retried
            api.plane.webhooks.ssl_context = None
            await api.post("/api/webhooks/tls/test")
            await wait_until(lambda: api.plane.webhooks.hooks["tls"].failed, "a refused certificate")
            assert "CERTIFICATE" in api.plane.webhooks.hooks["tls"].last_error.upper()
        outer.cancel_scope.cancel()


async def test_the_api_checks_names_fields_and_origins():
    async with running_api() as api:
        good = {"url": "http://127.0.0.1:9/x", "secret": SECRET}
        for body, field in (({**good, "url": "ftp://example.com/"}, "url"),
                            ({**good, "url": "http://"}, "url"),
                            ({**good, "secret": "short"}, "secret"),
                            ({**good, "events": ["nope"]}, "events"),
                            ({**good, "events": []}, "events"),
                            ({**good, "name": "a/b"}, "name"),
                            ({**good, "colour": "red"}, "colour")):
            r = await api.post("/api/webhooks", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        r = await api.post("/api/webhooks", json={**good, "url": "http://[::1"})
        assert r.status_code == 422 and r.json()["field"] == "url", r.text
        r = await api.post("/api/webhooks", json={**good, "name": "one",
                                                  "url": "http://user:pw-secret@127.0.0.1:9/"})
        assert r.status_code == 201 and "pw-secret" not in r.text
        assert (await api.post("/api/webhooks", json={**good, "name": "one"})).status_code == 409
        generated = (await api.post("/api/webhooks", json=good)).json()["name"]
        assert generated.startswith("webhook-")
        assert (await api.post("/api/webhooks/nobody/test")).status_code == 404
        assert (await api.delete("/api/webhooks/nobody")).status_code == 404
        assert (await api.anon.get("/api/webhooks")).status_code == 401

        # the configuration file's webhooks: replaced as a set, the API's left alone
        hooks = api.plane.webhooks
        await hooks.replace_from_config([
            Webhook(url="http://127.0.0.1:9/a", secret=SECRET, name="file-a"),
            Webhook(url="http://127.0.0.1:9/b", secret=SECRET, events=["user_reset"])])
        listed = await hooks_of(api)
        assert {n: h["origin"] for n, h in listed.items()} == {
            "one": "api", generated: "api", "file-a": "config",
            "config-" + hashlib.sha256(b"http://127.0.0.1:9/b").hexdigest()[:8]: "config"}
        r = await api.delete("/api/webhooks/file-a")
        assert r.status_code == 403, r.text
        kept = hooks.hooks["file-a"]
        kept.delivered = 7
        await hooks.replace_from_config([
            Webhook(url="http://127.0.0.1:9/a2", secret="a-new-secret-0123456789", name="file-a")])
        assert hooks.hooks["file-a"] is kept and kept.delivered == 7
        assert kept.config.url == "http://127.0.0.1:9/a2"
        assert {n for n, h in hooks.hooks.items() if h.origin == "config"} == {"file-a"}
        with pytest.raises(Conflict):
            await hooks.replace_from_config([Webhook(url="http://127.0.0.1:9/", secret=SECRET,
                                                     name="one")])
        with pytest.raises(InvalidField) as bad:
            await hooks.replace_from_config([Webhook(url="http://127.0.0.1:9/", secret="x")])
        assert bad.value.field == "secret"
        assert set(hooks.hooks) == {"one", generated, "file-a"}  # nothing changed
        await hooks.replace_from_config([])
        assert set(hooks.hooks) == {"one", generated}
        assert (await api.delete("/api/webhooks/one")).status_code == 200
        assert set(await hooks_of(api)) == {generated}


async def test_status_changes_are_events_of_their_own():
    async with running_api() as api:
        erin = await api.create_user(name="erin")

        async def types():
            r = await api.get("/api/events", params={"user": "erin"})
            return [e["type"] for e in r.json()["events"]]

        for status in ("disabled", "disabled", "active", "active"):
            await api.patch(f"/api/users/{erin['key']}", json={"status": status})
        await api.put(f"/api/users/{erin['key']}/expiry", json={"expires_at": iso(time.time() - 5)})
        api.plane.state.wake_enforcer()
        await api.get("/healthz")
        assert await types() == [
            "user_created", "user_updated", "user_disabled", "user_updated", "user_updated",
            "user_enabled", "user_updated", "user_updated", "user_expired"]


async def test_a_broken_listener_never_fails_whoever_adds_an_event():
    async with running_api() as api:
        def broken(rec):
            raise RuntimeError("listener bug")

        api.plane.events.listener = broken
        before = guard.Stats.internal_errors
        assert api.plane.events.add("user_reset", user="x").type == "user_reset"
        assert guard.Stats.internal_errors == before + 1  # logged and counted
        guard.Stats.internal_errors = before


class ThreadedReceiver:
    """A receiver in a thread of its own, for tests that drive server processes."""

    def __init__(self) -> None:
        got = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append(Received({k.lower(): v for k, v in self.headers.items()}, body,
                                    self.path, 204))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self) -> list[str]:
        return [r.event["type"] for r in self.requests]


def test_a_server_process_posts_its_start_and_its_stop(procs, tmp_path):
    receiver = ThreadedReceiver()
    try:
        db = tmp_path / "proc.db"
        server = start_api_server(procs, db=db)
        r = http("POST", f"{server.http_url}/api/webhooks", json={
            "url": receiver.url, "secret": SECRET, "events": ["server_started", "server_stopping"]})
        assert r.status_code == 201, r.text
        server.proc.terminate()  # SIGTERM: the stop begins, and is posted before the exit
        assert receiver.types() == ["server_stopping"]
        assert receiver.requests[0].event["detail"] == "on SIGTERM"
        again = start_api_server(procs, db=db, name="api-server-again")  # the webhook was kept
        deadline = time.monotonic() + 10
        while len(receiver.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.types() == ["server_stopping", "server_started"]
        assert receiver.requests[1].event["detail"].startswith("listening on 127.0.0.1:")
        assert all(q.signed_with(SECRET) for q in receiver.requests)
        again.proc.terminate()
    finally:
        receiver.server.shutdown()


async def test_the_store_keeps_webhooks(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    await store.put_webhook(WebhookRecord(name="a", url="http://h/", secret=SECRET, created_at=5.0))
    await store.put_webhook(WebhookRecord(name="b", url="http://h/", secret=SECRET,
                                          events=["user_reset"], created_at=6.0))
    await store.put_webhook(WebhookRecord(name="a", url="http://h2/", secret=SECRET, created_at=5.0))
    await store.delete_webhook("b")
    await store.close()
    snap = await store.open()
    await store.close()
    assert snap.webhooks == [WebhookRecord(name="a", url="http://h2/", secret=SECRET, created_at=5.0)]
