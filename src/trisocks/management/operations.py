"""What an endpoint is: :class:`Operation` (method, path, who may call it, the Struct its
body decodes into, the Structs it answers with), what its handler gets (:class:`Call`)
and may answer (:class:`Reply`).

The routes_*.py modules each return their operations from ``operations()``; registry.py
puts the table together, and both the app (app.py) and ``/api/openapi.json``
(openapi.py) are built from it, so the schema cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Reply:
    body: object  # a Struct (JSON), or str/bytes with content_type
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    """What a handler gets: the plane, the decoded body and query, path parameters, and
    facts about the caller."""

    plane: object
    body: object
    query: object
    params: dict[str, str]
    headers: object
    client: str
    scheme: str
    host: str


Handler = Callable[[Call], Awaitable[object]]


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI style: /api/users/{key}
    handler: Handler
    summary: str
    tag: str
    auth: str = "key"  # public | user | key
    body: type | None = None
    body_optional: bool = False  # an empty body means {}
    body_error: str = "invalid request body"  # the 400 message for malformed JSON
    query: type | None = None
    responses: dict[int, tuple[type | None, str]] = field(default_factory=dict)
    content_types: dict[int, str] = field(default_factory=dict)  # non-JSON answers
    description: str = ""
    operation_id: str = ""  # the handler's name when empty
    hidden: bool = False  # served, but not in the OpenAPI document

    def __post_init__(self) -> None:
        if not self.operation_id:
            self.operation_id = self.handler.__name__
