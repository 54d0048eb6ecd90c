"""The quart-trio application: the HTTP layer over the plane's services.

Each endpoint is declared once as an :class:`~.operations.Operation` (registry.py has
the table); that declaration becomes the Quart route, drives validation and error
answers, and is what ``/api/openapi.json`` is generated from, so the schema cannot drift
from the code. The services raise domain errors (errors.py); :func:`domain_error` is the
one place that turns them into status codes and bodies.

Who may call what:

``public``  anyone (``/``, ``/healthz``, ``/api/openapi.json``)
``user``    anyone holding a user's access key, which is in the path (``/api/subscribe``)
``key``     the management API key, from a loopback address unless --api-allow-remote; or
            the dashboard's session cookie, with X-CSRF-Token for changes (ui_session.py)

Failed keys (API or user) count against the caller's address (:func:`caller_address`);
past the limit it gets 429 with ``Retry-After`` (keys.FailureLimiter). Each failure is
logged as a warning with that address, and a lock-out once when it starts.

A handler that raises something unexpected answers 500 for that request only; the error
is logged with its traceback and counted in ``trisocks_internal_errors_total`` (guard).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .._version import __version__
from ..net import guard
from . import schemas
from .access import Access
from .dates import RANGE, in_range
from .errors import Conflict, DomainError, Invalid, InvalidField, NotFound, Refused, Unavailable
from .keys import presented_keys
from .operations import Call, Operation, Reply
from .registry import operations
from .routes_ui import install_ui
from .ui_session import COOKIE, SessionRefused

MAX_BODY = 1 << 20
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_FIELD_RE = re.compile(r"at `\$\.([^`\[]+)|field `([^`]+)`")


class ApiError(Exception):
    """Answer ``{"success": false, "error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.field = field

    def body(self):
        if self.status == 422:
            return schemas.ValidationError(error=self.message, field=self.field)
        return schemas.Error(error=self.message)


# what each domain error answers; the most specific class first
_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidField, 422), (Invalid, 400), (NotFound, 404), (Conflict, 409), (Refused, 403),
    (Unavailable, 503))


def domain_error(exc: DomainError) -> ApiError:
    """The HTTP answer to a service's refusal."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return ApiError(status, exc.message, field=getattr(exc, "field", None))
    return ApiError(400, exc.message)


# -- encoding --------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj) + b"\n", status=status, content_type="application/json",
                    headers=headers or {})


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


def _validation_field(message: str) -> str | None:
    m = _FIELD_RE.search(message)
    if not m:
        return None
    return m.group(1) or m.group(2)


def decode_body(op: Operation, data: bytes):
    if not data.strip():
        if op.body_optional:
            data = b"{}"
        else:
            raise ApiError(400, op.body_error)
    try:
        return check_dates(msgspec.json.decode(data, type=op.body))
    except msgspec.ValidationError as exc:
        message = str(exc)
        if op.body_error != "invalid request body" and "Expected `object`" in message:
            raise ApiError(400, op.body_error) from None
        raise ApiError(422, message, field=_validation_field(message)) from None
    except msgspec.DecodeError:
        raise ApiError(400, op.body_error) from None


def decode_query(op: Operation, args) -> object:
    known = set(op.query.__struct_encode_fields__)  # the names in the URL ("from", not "from_")
    raw = {k: v for k, v in args.items() if k in known}
    try:
        return check_dates(msgspec.convert(raw, op.query, strict=False))
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise ApiError(422, message, field=_validation_field(message)) from None


def check_dates(obj):
    """422 for a date outside the range every date must be in (msgspec's Meta has no
    bounds for datetimes); the message reads like msgspec's own."""
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, datetime) and not in_range(value):
            raise ApiError(422, f"Expected a date-time {RANGE} - at `$.{name}`", field=name)
    return obj


# -- who is calling ----------------------------------------------------------------------------------


def client_host() -> str:
    """The transport peer's address (IPv4-mapped IPv6 as IPv4, without an IPv6 zone)."""
    client = request.scope.get("client")
    host = str(client[0]).split("%")[0] if client else ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)  # else every IPv4 client of a dual-stack port is one /64
    return str(addr)


def caller_address(access: Access) -> str:
    """The address failed keys are counted against and logged with: the peer, or what the
    ``resolve_client`` hook makes of it (--trusted-proxy: a forwarded address)."""
    peer = client_host()
    resolve = access.resolve_client
    return resolve(peer, request.headers) if resolve is not None else peer


def is_local_request() -> bool:
    """From a loopback address, and not relayed by a proxy on this machine."""
    if any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    try:
        return ipaddress.ip_address(client_host()).is_loopback
    except ValueError:
        return False


async def check_api_key(access: Access) -> None:
    """Raise ApiError 403/429/401 unless the caller may use the management API."""
    if not access.allow_remote and not is_local_request():
        raise ApiError(403, "remote management disabled")
    address = check_rate(access)
    presented = presented_keys(request.headers)
    if not presented and access.ui_sessions is not None and COOKIE in request.cookies:
        try:  # the dashboard's session cookie (ui_session.py): no key, and CSRF checked
            access.ui_sessions.authorize(request.cookies[COOKIE], request.method, request.headers)
        except SessionRefused as exc:
            raise ApiError(exc.status, exc.message) from None
        return
    for candidate in presented:
        if await access.api_key.verify(candidate):
            access.limiter.succeeded(address)
            return
    access.note_api_auth_failure(address)  # counts it against the address, and logs it
    raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": 'Bearer realm="trisocks"'})


def check_rate(access: Access) -> str:
    """The caller's address, or ApiError 429 while it is locked out."""
    address = caller_address(access)
    wait = access.limiter.retry_after(address)
    if wait:
        access.note_rate_limited(address)
        raise ApiError(429, "too many failed attempts; retry later",
                       headers={"Retry-After": str(wait)})
    return address


# -- the app ---------------------------------------------------------------------------------------------


def _quart_path(path: str) -> str:
    def conv(m):
        name = m.group(1)
        return f"<path:{name}>" if name == "token" else f"<{name}>"

    return re.sub(r"\{(\w+)\}", conv, path)


def _wrap(plane, op: Operation):
    access: Access = plane.access

    async def view(**params):
        try:
            if op.auth == "key":
                await check_api_key(access)
            elif op.auth == "user":
                check_rate(access)
            body = None
            if op.body is not None:
                body = decode_body(op, await request.get_data(cache=False))
            query = decode_query(op, request.args) if op.query is not None else None
            call = Call(plane, body, query, params, request.headers, caller_address(access),
                        request.scheme, request.headers.get("host", ""))
            result = await op.handler(call)
        except ApiError as exc:
            return error_response(exc)
        except DomainError as exc:
            return error_response(domain_error(exc))
        except HTTPException:
            raise
        except Exception as exc:
            # the path template, not the path: the path may hold a token or a user's key
            guard.report(f"API request {op.method} {op.path}", exc)
            return json_response(schemas.Error(error="internal error"), 500)
        if isinstance(result, Response):
            return result
        if not isinstance(result, Reply):
            result = Reply(result)
        if isinstance(result.body, (str, bytes)):
            data = result.body.encode() if isinstance(result.body, str) else result.body
            return Response(data, status=result.status, content_type=result.content_type,
                            headers=result.headers)
        return json_response(result.body, result.status, result.headers)

    view.__name__ = f"{op.operation_id}_{op.method.lower()}"
    return view


def create_app(plane) -> QuartTrio:
    """The app over a Management (its ``access`` and services; see plane.py)."""
    app = QuartTrio("trisocks.management")
    # Quart's own report names the request path, which may hold a token or a user's key
    app.log_exception = lambda exc_info: guard.report("API request", exc_info[1])
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, BODY_TIMEOUT=30, RESPONSE_TIMEOUT=60,
                      PROVIDE_AUTOMATIC_OPTIONS=True)
    for op in operations():
        app.add_url_rule(_quart_path(op.path), view_func=_wrap(plane, op), methods=[op.method],
                         strict_slashes=False if op.path == "/" else None)

    # the dashboard, /ui/ (routes_ui.py; not in the OpenAPI document), with the API's own checks
    install_ui(app, plane, local=is_local_request, caller=caller_address)

    @app.after_request
    async def server_header(response):
        response.headers["Server"] = f"trisocks/{__version__}"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        status = exc.code or 500
        message = {404: "not found", 405: "method not allowed", 413: "request body too large"}.get(
            status, (exc.name or "error").lower())
        headers = {}
        allow = exc.get_headers() if status == 405 else []
        for name, value in allow:
            if name.lower() == "allow":
                headers["Allow"] = value
        return json_response(schemas.Error(error=message), status, headers)

    @app.errorhandler(Exception)
    async def crash(exc: Exception):
        guard.report("API request", exc)
        return json_response(schemas.Error(error="internal error"), 500)

    return app
