"""Observability (issue 4, point 5): /api/stats with live figures and rates, /api/events and
its filters, /metrics parsed by prometheus_client's own parser, /healthz."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio
from prometheus_client.parser import text_string_to_metric_families

from trisocks.tunnel.tokens import digest

from .api_support import MiB, running_api, wait_until
from .inproc import echo_handler, echo_roundtrip, firehose_handler, serve_tcp
from .test_api_users import live_download


async def test_stats_show_live_figures_and_rates():
    async with running_api(tokens=["stats-token-01"], flush_interval=0.2) as api, \
            trio.open_nursery() as nursery:
        hose = await serve_tcp(nursery, firehose_handler())
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="stat-user")
        token_socks = await api.client(nursery, "stats-token-01")
        user_socks = await api.client(nursery, user["key"])
        assert await echo_roundtrip(token_socks, echo, b"t" * 300_000)
        live = await live_download(nursery, user_socks, hose)

        async def rate_seen():
            received = live.received  # what had arrived before the figures were taken
            stats = (await api.get("/api/stats")).json()
            (u,) = stats["users"]
            return (stats, received) if u["rate_down"] > 1 * MiB else None

        stats, received = await wait_until(rate_seen, "a download rate in /api/stats")
        (u,) = stats["users"]
        assert u["name"] == "stat-user" and u["channels"] == 1 and u["clients"] == 1
        assert u["bytes_down"] >= received > 0
        (t,) = stats["tokens"]
        assert t == {"token": "stats-token-01", "type": "forward", "bytes_up": 300_000,
                     "bytes_down": 300_000, "rate_up": t["rate_up"], "rate_down": t["rate_down"],
                     "channels": 0, "clients": 1, "total_connections": 1}
        totals = stats["totals"]
        assert totals["clients"] == 2 and totals["channels"] == 1
        assert totals["bytes_down"] == t["bytes_down"] + u["bytes_down"]
        assert stats["uptime_seconds"] > 0
        nursery.cancel_scope.cancel()


async def test_events_and_their_filters():
    async with running_api(tokens=["ev-token-0001"]) as api, trio.open_nursery() as nursery:
        t0 = datetime.now(UTC)
        user = await api.create_user(name="ev-user")
        await api.client(nursery, user["key"])
        await api.client(nursery, "ev-token-0001")
        await api.post("/api/token", json={"type": "reverse", "token": "ev-rev-0001"})
        await api.client(nursery, "ev-rev-0001", reverse=True)
        await api.client(nursery, "no-such-token")
        await wait_until(lambda: api.refusals, "the bad token to be refused")
        await api.patch(f"/api/users/{user['key']}", json={"status": "disabled"})
        await api.delete("/api/token/ev-rev-0001")
        # the user's client and the provider try again and are refused: then all is quiet
        await wait_until(lambda: len(api.refusals) == 3, "every client to be refused")
        assert api.plane.events.query(type="provider_left")

        async def events(**params):
            r = await api.get("/api/events", params=params)
            assert r.status_code == 200, r.text
            return r.json()["events"]

        everything = await events(limit=1000)
        types = [e["type"] for e in everything]
        for expected in ("user_created", "auth_success", "token_added", "provider_joined",
                         "auth_failure", "user_updated", "session_closed", "token_removed",
                         "provider_left"):
            assert expected in types, (expected, types)
        ids = [e["id"] for e in everything]
        assert ids == sorted(ids)
        by_user = await events(user="ev-user")
        assert by_user and all(e["user"] == "ev-user" for e in by_user)
        assert await events(user=user["key"]) == by_user  # a key works as well as the name
        assert [e["type"] for e in by_user][:2] == ["user_created", "auth_success"]
        by_token = await events(token="ev-rev-0001")
        assert {e["type"] for e in by_token} >= {"token_added", "provider_joined", "provider_left"}
        assert all(e["token"] == "ev-rev-0001" for e in by_token)
        last_two = await events(limit=2)
        assert last_two == everything[-2:]
        failures = await events(type="auth_failure")
        assert failures and all(e["type"] == "auth_failure" and e["peer"] for e in failures)
        assert await events(since=(t0 - timedelta(days=1)).isoformat()) == everything[-100:]
        assert await events(until=(t0 - timedelta(seconds=1)).isoformat()) == []
        assert await events(since=(datetime.now(UTC) + timedelta(seconds=5)).isoformat()) == []
        for bad in ({"limit": "0"}, {"limit": "lots"}, {"since": "yesterday"}):
            r = await api.get("/api/events", params=bad)
            assert r.status_code == 422 and r.json()["field"] == next(iter(bad)), r.text
        nursery.cancel_scope.cancel()


async def test_per_owner_series_are_off_by_default_and_capped_when_on():
    for cap, shown in ((0, 0), (2, 2)):
        async with running_api(tokens=["cap-token-0001"], metrics_per_owner=cap) as api:
            for i in range(3):
                await api.create_user(name=f"u{i}")
            text = (await api.get("/metrics")).text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            users = {dict(labels)["user"] for name, labels in samples
                     if name == "trisocks_user_channels"}
            assert len(users) == shown
            assert samples[("trisocks_metrics_owners_omitted", (("owner", "user"),))] == 3 - shown
            assert samples[("trisocks_users", ())] == 3


async def test_metrics_parse_with_the_prometheus_parser():
    async with running_api(tokens=["metrics-token-1"], metrics_per_owner=10) as api, \
            trio.open_nursery() as nursery:
        echo = await serve_tcp(nursery, echo_handler)
        user = await api.create_user(name="metrics.user+1@example", limit_bytes=10 * MiB)
        socks = await api.client(nursery, user["key"])
        assert await echo_roundtrip(socks, echo, b"m" * 123_456)
        await wait_until(lambda: not api.plane.users[user["key"]].channels, "the channel to finish")
        r = await api.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        name = "metrics.user+1@example"
        assert samples[("trisocks_user_bytes_total", (("direction", "up"), ("user", name)))] == 123_456
        assert samples[("trisocks_user_bytes_total", (("direction", "down"), ("user", name)))] == 123_456
        assert samples[("trisocks_user_limit_bytes", (("user", name),))] == 10 * MiB
        assert samples[("trisocks_users", ())] == 1
        assert samples[("trisocks_tokens", (("kind", "forward"),))] == 1
        tid = digest("metrics-token-1")[:12]
        assert samples[("trisocks_token_bytes_total", (("direction", "up"), ("kind", "forward"),
                                                       ("token_id", tid)))] == 0
        assert samples[("trisocks_bytes_total", (("direction", "down"),))] == 123_456
        assert families["trisocks_bytes"].type == "counter"
        assert families["trisocks_channels"].type == "gauge"
        assert "metrics-token-1" not in r.text  # tokens are secrets: labelled by a digest
        nursery.cancel_scope.cancel()


async def test_the_openapi_document_covers_every_endpoint():
    async with running_api() as api:
        doc = (await api.anon.get("/api/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        paths = doc["paths"]
        expected = {
            ("get", "/api/status"), ("post", "/api/token"), ("delete", "/api/token/{token}"),
            ("delete", "/api/token"), ("get", "/api/server/status"), ("get", "/api/users"),
            ("post", "/api/users"), ("get", "/api/users/{key}"), ("delete", "/api/users/{key}"),
            ("put", "/api/users/{key}/limit"), ("put", "/api/users/{key}/expiry"),
            ("patch", "/api/users/{key}"), ("post", "/api/users/{key}/reset"),
            ("post", "/api/users/{key}/rotate"), ("get", "/api/subscribe/{key}"),
            ("get", "/api/stats"), ("get", "/api/events"), ("get", "/healthz"),
            ("get", "/api/cluster"), ("get", "/metrics"),
            ("get", "/api/openapi.json"), ("get", "/api/tokens/{token}"),
            ("patch", "/api/tokens/{token}"), ("get", "/api/usage"),
            ("get", "/api/users/{key}/usage"), ("post", "/api/users/remove"),
            ("get", "/api/webhooks"), ("post", "/api/webhooks"), ("delete", "/api/webhooks/{name}"),
            ("post", "/api/webhooks/{name}/test"),
            ("post", "/api/reload"),
        }
        assert {(m, p) for p, ops in paths.items() for m in ops} == expected
        schemas = doc["components"]["schemas"]
        assert schemas["UserCreate"]["additionalProperties"] is False
        assert set(schemas["User"]["required"]) >= {"key", "name", "bytes_up", "bytes_down",
                                                    "limit_bytes", "expires_at", "status"}
        create = paths["/api/users"]["post"]
        assert create["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/UserCreate"}
        assert set(create["responses"]) >= {"201", "401", "403", "409", "422", "429"}
        # the answers really match the schema the document gives
        user = await api.create_user(name="schema-check")
        assert set(user) == set(schemas["User"]["properties"])
