"""Webhooks: URLs that get events as signed JSON (webhooks.py)."""

from __future__ import annotations

from . import schemas as s
from .operations import Call, Operation, Reply
from .webhooks import Webhook, WebhookDeleted, WebhookList, WebhookTest, WebhookView

TAG = "webhooks"
NOT_FOUND = (s.Error, "webhook not found")
UNAVAILABLE = (s.Error, "database unavailable")


async def list_webhooks(call: Call):
    return call.plane.webhooks.list()


async def add_webhook(call: Call):
    return Reply(await call.plane.webhooks.add(call.body), status=201)


async def delete_webhook(call: Call):
    return await call.plane.webhooks.remove(call.params["name"])


async def test_webhook(call: Call):
    return Reply(call.plane.webhooks.test(call.params["name"]), status=202)


def operations() -> list[Operation]:
    return [
        Operation(
            "GET", "/api/webhooks", list_webhooks, summary="Every webhook, with its counters",
            tag=TAG, responses={200: (WebhookList, "")},
            description="Secrets are never shown (a redacted form with a digest is). ``origin`` "
            "is ``api`` or ``config`` (the configuration file). Counters: ``queued``, "
            "``delivered``, ``failed`` (attempts), ``dropped`` (the queue was full), ``expired`` "
            "(given up after every retry)."),
        Operation(
            "POST", "/api/webhooks", add_webhook, summary="Add a webhook", tag=TAG, body=Webhook,
            responses={201: (WebhookView, "added"), 400: (s.Error, "invalid request body"),
                       409: (s.Error, "webhook already exists"),
                       422: (s.ValidationError, "a field of the wrong type, out of range or unknown"),
                       503: UNAVAILABLE},
            description="Events are posted as JSON with ``X-Trisocks-Timestamp`` and "
            "``X-Trisocks-Signature: sha256=<HMAC-SHA256(secret, timestamp + '.' + body)>``; "
            "kept in the store. See docs/api.md for the event types."),
        Operation(
            "DELETE", "/api/webhooks/{name}", delete_webhook, summary="Remove a webhook", tag=TAG,
            responses={200: (WebhookDeleted, "removed (its queue is dropped)"), 404: NOT_FOUND,
                       403: (s.Error, "the webhook comes from the configuration file"),
                       503: UNAVAILABLE}),
        Operation(
            "POST", "/api/webhooks/{name}/test", test_webhook, summary="Queue a test event",
            tag=TAG, responses={202: (WebhookTest, "queued"), 404: NOT_FOUND},
            description="A ``test`` event goes to this webhook only, whatever its ``events``."),
    ]
