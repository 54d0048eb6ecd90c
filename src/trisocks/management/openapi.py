"""``/api/openapi.json``: OpenAPI 3.1, generated from the operation table and the very Structs
that decode and encode the bodies (msgspec.json.schema_components).

:func:`build` turns a table into the document; :func:`operation` declares the endpoint that
serves one (registry.py hands it the table's document, so this module knows no routes)."""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

from .._version import __version__
from . import schemas
from .operations import Call, Operation, Reply

REF = "#/components/schemas/{name}"

_STATUS_TEXT = {200: "OK", 201: "Created", 400: "Bad request", 401: "Invalid API key",
                403: "Forbidden", 404: "Not found", 409: "Conflict", 422: "Validation failed",
                429: "Too many failed attempts", 503: "Unavailable"}


def _struct_types(ops: list[Operation]) -> list[type]:
    types: list[type] = [schemas.Error, schemas.ValidationError]
    for op in ops:
        for t in (op.body, *(r[0] for r in op.responses.values())):
            if t is not None and t not in types:
                types.append(t)
    return types


def _query_parameters(struct: type, components: dict) -> list[dict]:
    (_schema,), comps = msgspec.json.schema_components([struct], ref_template=REF)
    own = comps[struct.__name__]
    params = []
    for name, prop in own["properties"].items():
        # a query parameter is a string on the wire: keep the value's own type, drop "null"
        any_of = prop.get("anyOf")
        if any_of:
            kept = [p for p in any_of if p.get("type") != "null"]
            prop = kept[0] if len(kept) == 1 else {"anyOf": kept}
        params.append({"name": name, "in": "query", "required": name in own.get("required", ()),
                       "schema": prop})
    return params


def _path_parameters(path: str) -> list[dict]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in re.findall(r"\{(\w+)\}", path)]


def _responses(op: Operation) -> dict:
    out = {}
    responses = dict(op.responses)
    if op.auth == "key":
        responses.setdefault(401, (schemas.Error, "invalid API key"))
        responses.setdefault(403, (schemas.Error, "remote management disabled"))
        responses.setdefault(429, (schemas.Error, "too many failed attempts (Retry-After)"))
    if op.auth == "user":
        responses.setdefault(429, (schemas.Error, "too many failed attempts (Retry-After)"))
    for status, (struct, text) in sorted(responses.items()):
        entry: dict = {"description": text or _STATUS_TEXT.get(status, "")}
        types = op.content_types.get(status)
        if struct is not None:
            content = {"application/json": {"schema": {"$ref": REF.format(name=struct.__name__)}}}
            if types and "text/plain" in types:
                content["text/plain"] = {"schema": {"type": "string"}}
            entry["content"] = content
        elif types:
            entry["content"] = {}
            for t in types.split(","):
                media = t.split(";")[0].strip()
                entry["content"][media] = {"schema": {"type": "object"} if media.endswith("json")
                                           else {"type": "string"}}
        if status == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                "description": "seconds to wait"}}
        out[str(status)] = entry
    return out


TAG_ORDER = ("tokens (LinkSocks-compatible)", "users", "subscribe", "observability")


def build(operations: list[Operation]) -> dict:
    """The OpenAPI document of ``operations`` (hidden ones left out), grouped by tag."""
    ops = sorted((op for op in operations if not op.hidden),
                 key=lambda op: TAG_ORDER.index(op.tag) if op.tag in TAG_ORDER else len(TAG_ORDER))
    _, components = msgspec.json.schema_components(_struct_types(ops), ref_template=REF)
    paths: dict[str, dict] = {}
    for op in ops:
        item: dict = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "responses": _responses(op),
        }
        if op.description:
            item["description"] = op.description
        params = _path_parameters(op.path)
        if op.query is not None:
            params += _query_parameters(op.query, components)
        if params:
            item["parameters"] = params
        if op.body is not None:
            item["requestBody"] = {
                "required": not op.body_optional,
                "content": {"application/json": {"schema": {"$ref": REF.format(name=op.body.__name__)}}},
            }
        item["security"] = [{"apiKey": []}, {"bearer": []}] if op.auth == "key" else []
        paths.setdefault(op.path, {})[op.method.lower()] = item
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trisocks management API",
            "version": __version__,
            "description": "Tokens (LinkSocks-compatible), users with quotas, stats, events, health "
            "and metrics. See docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def operation(document: Callable[[], bytes]) -> Operation:
    """``GET /api/openapi.json``, answering ``document()``."""

    async def openapi(call: Call):
        return Reply(document(), content_type="application/json")

    return Operation("GET", "/api/openapi.json", openapi, summary="This API as OpenAPI 3.1",
                     tag="observability", auth="public",
                     responses={200: (None, "the OpenAPI document")},
                     content_types={200: "application/json"})
