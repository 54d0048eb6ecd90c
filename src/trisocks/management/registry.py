"""The operation table, put together explicitly from the route modules (importing a module
registers nothing), and the OpenAPI document generated from it."""

from __future__ import annotations

import functools

import msgspec

from . import (
    openapi,
    routes_observe,
    routes_policy,
    routes_tokens,
    routes_usage,
    routes_users,
    routes_webhooks,
)
from .operations import Operation


def operations() -> list[Operation]:
    """Every endpoint; within a tag the OpenAPI document keeps this order."""
    return [*routes_observe.operations(), openapi.operation(document),
            *routes_tokens.operations(), *routes_users.operations(),
            *routes_policy.operations(), *routes_usage.operations(),
            *routes_webhooks.operations()]


@functools.cache
def document_dict() -> dict:
    return openapi.build(operations())


@functools.cache
def document() -> bytes:
    return msgspec.json.encode(document_dict())
