"""Subscribe, stats, events, health, metrics, and the front page. (``/api/openapi.json``
is declared by openapi.py, which documents this table.)"""

from __future__ import annotations

from .._version import __version__
from . import schemas as s
from .operations import Call, Operation, Reply

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def front_page(call: Call):
    return Reply(f"trisocks {__version__} is running\n", content_type="text/plain; charset=utf-8")


async def subscribe(call: Call):
    sub = call.plane.subscription(call.params["key"], call.client, call.host)
    headers = call.plane.subscription_headers(call.params["key"])
    accept = call.headers.get("accept", "")
    if "text/plain" in accept and "application/json" not in accept:
        return Reply(sub.share_link + "\n", content_type="text/plain; charset=utf-8",
                     headers=headers)
    return Reply(sub, headers=headers)


async def reload(call: Call):
    result = await call.plane.reload()
    return Reply(result, status=200 if result.success else 400)


async def stats(call: Call):
    return call.plane.stats()


async def events(call: Call):
    return call.plane.query_events(call.query)


async def healthz(call: Call):
    health = await call.plane.health()
    return Reply(health, status=503 if health.status == "error" else 200)


async def cluster(call: Call):
    return call.plane.cluster()


async def metrics(call: Call):
    return Reply(call.plane.metrics_text(), content_type=METRICS_TYPE)


def operations() -> list[Operation]:
    return [
        Operation("GET", "/", front_page, summary="Says the server runs", tag="observability",
                  auth="public", responses={200: (None, "trisocks <version> is running")},
                  content_types={200: "text/plain"}, hidden=True),
        Operation(
            "GET", "/api/subscribe/{key}", subscribe, summary="A user's client configuration",
            tag="subscribe", auth="user",
            responses={200: (s.Subscription, ("JSON by default; the share link "
                             "trisocks://KEY@HOST:PORT with Accept: text/plain")),
                       403: (s.Error, "the user is disabled or expired"),
                       404: (s.Error, "unknown key"), 429: (s.Error, "too many unknown keys")},
            content_types={200: "application/json, text/plain"},
            description="Authenticated by the user's key itself (no API key), from any address: "
            "this is what users fetch. ``trisocks client --subscribe URL`` uses it."),
        Operation(
            "POST", "/api/reload", reload, summary="Re-read the configuration file",
            tag="operations",
            responses={200: (s.ReloadResult, "what changed live, and what needs a restart"),
                       400: (s.ReloadResult, "the file was refused: nothing changed (error says "
                                             "why) / no --config file")},
            description="As SIGHUP: the --config file is read and checked whole; tokens, rules, "
            "token policies, webhooks and the log level change without dropping the tunnels the "
            "change does not concern (docs/operations.md)."),
        Operation(
            "GET", "/api/stats", stats, summary="Live traffic figures", tag="observability",
            responses={200: (s.Stats, "totals, per token and per user")},
            description="Bytes each way (open connections included), open channels, WebSocket "
            "clients and the rates over the last second."),
        Operation(
            "GET", "/api/events", events, summary="What happened", tag="observability",
            query=s.EventsQuery,
            responses={200: (s.Events, "the most recent matching events, oldest first"),
                       422: (s.ValidationError, "a bad query parameter")},
            description="Authentications, token and user changes, quota hits, expiries, providers "
            "joining and leaving, API key failures. Filters: limit, since, until (RFC 3339), "
            "token, user (name or key), type."),
        Operation("GET", "/healthz", healthz, summary="Health: database and listener",
                  tag="observability", auth="public",
                  responses={200: (s.Health, "all checks pass, or degraded: a node of a cluster "
                                   "that cannot reach the shared store serves what it knows"),
                             503: (s.Health, "a check failed")}),
        Operation(
            "GET", "/api/cluster", cluster, summary="The nodes of the cluster",
            tag="observability", responses={200: (s.Cluster, "the nodes alive, this one first")},
            description="With a shared store (--workers, --store redis://): every node alive, "
            "its sessions, channels and providers per reverse token, from its last heartbeat "
            "(docs/scale-out.md). A lone server lists no nodes."),
        Operation("GET", "/metrics", metrics, summary="Prometheus metrics", tag="observability",
                  responses={200: (None, "Prometheus text format 0.0.4")},
                  content_types={200: METRICS_TYPE}),
    ]
