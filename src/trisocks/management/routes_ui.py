"""The dashboard: ``/ui/``, served by the API's app on the API's port, under the API's access
rule (loopback only unless --api-allow-remote).

The pages are static files shipped in the package (``management/ui/``: HTML, CSS and
JavaScript modules, no build step, nothing fetched from elsewhere); their JavaScript calls the
real API (``/api/...``) with the session cookie of ui_session.py instead of the key. Here:

``GET  /ui/``                       the app (or a redirect to the login page)
``GET  /ui/login``, ``POST /ui/login``  the login form; the key is checked as the API checks
                                    it, failures count against the address as the API's do
``GET  /ui/session``                the session's CSRF token and expiry, for the page
``POST /ui/logout``                 ends the session (X-CSRF-Token)
``GET  /ui/users/{key}/link``       a user's subscription link; ``.../qr.svg`` its QR code
``GET  /ui/static/{name}``          the files

These routes are not operations (registry.py): they are not in ``/api/openapi.json``.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable
from importlib.resources import files

import msgspec
import segno
from quart import Response, request

from .._version import __version__
from .access import Access
from .dates import rfc3339
from .errors import Refused
from .events import TYPES as EVENT_TYPES
from .subscribe import _usable_host
from .ui_session import COOKIE, Session, SessionRefused, Sessions

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MESSAGES = {"expired": "Your session has ended. Log in again.", "logout": "You have logged out."}
_KEY = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_encoder = msgspec.json.Encoder()


def load_assets() -> dict[str, bytes]:
    """Every file of management/ui/ by name (read once: they are small)."""
    root = files("trisocks.management") / "ui"
    found = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = entry.read_bytes()
    return found


def _json(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj) + b"\n", status=status, content_type="application/json",
                    headers=headers or {})


def _error(exc: SessionRefused, headers: dict[str, str] | None = None) -> Response:
    return _json({"success": False, "error": exc.message}, exc.status, headers)


def _secure() -> bool:
    """Whether the browser reached us over TLS (here, or at a proxy that says so)."""
    return request.scheme == "https" or \
        request.headers.get("x-forwarded-proto", "").lower() == "https"


class Dashboard:
    def __init__(self, plane, sessions: Sessions, *, local: Callable[[], bool],
                 caller: Callable[[Access], str]) -> None:
        self.plane = plane
        self.access: Access = plane.access
        self.sessions = sessions
        self.local = local
        self.caller = caller
        self.assets = load_assets()

    # -- checks -----------------------------------------------------------------------------
    def gate(self) -> None:
        if not self.access.allow_remote and not self.local():
            raise SessionRefused(403, "remote management disabled")

    def session(self) -> Session:
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            raise SessionRefused(401, "not logged in")
        return self.sessions.check(cookie)

    def page(self, name: str, status: int = 200, message: str = "",
             headers: dict[str, str] | None = None) -> Response:
        body = self.assets[name].decode()
        note = f'<p class="note" role="alert">{html.escape(message)}</p>' if message else ""
        body = body.replace("{{message}}", note).replace("{{version}}", html.escape(__version__))
        return Response(body, status=status, content_type=CONTENT_TYPES[".html"],
                        headers=headers or {})

    # -- views --------------------------------------------------------------------------------
    async def index(self):
        try:
            self.gate()
        except SessionRefused as exc:
            return Response(exc.message + "\n", status=exc.status, content_type="text/plain")
        if COOKIE not in request.cookies:
            return Response("", status=303, headers={"Location": "/ui/login"})
        try:
            self.session()
        except SessionRefused:
            return Response("", status=303, headers={"Location": "/ui/login?m=expired"})
        return self.page("index.html")

    async def login_form(self):
        try:
            self.gate()
        except SessionRefused as exc:
            return Response(exc.message + "\n", status=exc.status, content_type="text/plain")
        return self.page("login.html", message=MESSAGES.get(request.args.get("m", ""), ""))

    async def login(self):
        try:
            self.gate()
        except SessionRefused as exc:
            return Response(exc.message + "\n", status=exc.status, content_type="text/plain")
        access = self.access
        address = self.caller(access)
        wait = access.limiter.retry_after(address)
        if wait:
            access.note_rate_limited(address)
            return self.page("login.html", 429, f"Too many failed attempts: retry in {wait} s.",
                             {"Retry-After": str(wait)})
        form = await request.form
        key = form.get("key", "")
        if not key or len(key) > 4096 or not await access.api_key.verify(key):
            access.note_api_auth_failure(address)  # counted and logged as the API's failures
            return self.page("login.html", 401, "Wrong API key.")
        del key, form  # the key is not kept anywhere, here or in the browser
        access.limiter.succeeded(address)
        value, _ = self.sessions.issue()
        return Response("", status=303, headers={
            "Location": "/ui/", "Set-Cookie": self.sessions.cookie_header(value, secure=_secure())})

    async def session_info(self):
        try:
            self.gate()
            session = self.session()
        except SessionRefused as exc:
            return _error(exc)
        return _json({"csrf_token": session.csrf, "expires_at": rfc3339(session.expires),
                      "version": __version__, "event_types": sorted(EVENT_TYPES)})

    async def logout(self):
        clear = {"Set-Cookie": self.sessions.clear_header(secure=_secure())}
        try:
            self.gate()
            session = self.sessions.authorize(request.cookies.get(COOKIE) or "", request.method,
                                              request.headers)
        except SessionRefused as exc:
            return _error(exc, clear if exc.status == 401 else None)
        self.sessions.revoke(session)
        return _json({"success": True}, headers=clear)

    def _user_key(self, key: str) -> str:
        self.gate()
        self.session()
        if not _KEY.fullmatch(key) or key not in self.plane.users:
            raise SessionRefused(404, "user not found")
        return key

    def subscription_url(self, key: str) -> str:
        """The URL of the user's subscription (GET /api/subscribe/KEY) as clients reach it."""
        subs = self.plane.subscriptions
        host = request.headers.get("host", "")
        if subs.public_url or not subs.api_bound:
            base = subs.tunnel_url(host)  # ws(s)://host[:port]: the API answers there too
        else:  # --api-bind: the API's own listener, as this request reached it
            base = f"{request.scheme}://{_usable_host(host) or f'127.0.0.1:{self.plane.api_port}'}"
        scheme, _, rest = base.partition("://")
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        return f"{scheme}://{rest.rstrip('/')}/api/subscribe/{key}"

    async def user_link(self, key: str):
        try:
            key = self._user_key(key)
        except SessionRefused as exc:
            return _error(exc)
        try:
            share = self.plane.subscription(key, self.caller(self.access),
                                            request.headers.get("host", "")).share_link
        except Refused:
            share = None  # disabled or expired: the link answers 403 until that changes
        return _json({"url": self.subscription_url(key), "share_link": share,
                      "qr": f"/ui/users/{key}/qr.svg"})

    async def user_qr(self, key: str):
        try:
            key = self._user_key(key)
        except SessionRefused as exc:
            return _error(exc)
        out = io.BytesIO()
        segno.make(self.subscription_url(key), error="m").save(
            out, kind="svg", scale=5, border=4, dark="#000", light="#fff", xmldecl=False)
        return Response(out.getvalue(), content_type=CONTENT_TYPES[".svg"])

    async def static(self, name: str):
        try:
            self.gate()
        except SessionRefused as exc:
            return Response(exc.message + "\n", status=exc.status, content_type="text/plain")
        data = self.assets.get(name)
        if data is None or name.endswith(".html"):
            return _json({"success": False, "error": "not found"}, 404)
        suffix = "." + name.rpartition(".")[2]
        return Response(data, content_type=CONTENT_TYPES[suffix],
                        headers={"Cache-Control": "no-cache"})


def install_ui(app, plane, *, local: Callable[[], bool], caller: Callable[[Access], str]) -> None:
    """Add the dashboard's routes to ``app``; its session cookie becomes a credential of the
    API (Access.ui_sessions). ``local`` and ``caller`` are the API's own checks (app.py)."""
    sessions = Sessions(lambda: plane.state.cluster_secret)
    plane.access.ui_sessions = sessions
    ui = Dashboard(plane, sessions, local=local, caller=caller)
    app.add_url_rule("/ui/", "ui_index", ui.index, methods=["GET"])
    app.add_url_rule("/ui/login", "ui_login_form", ui.login_form, methods=["GET"])
    app.add_url_rule("/ui/login", "ui_login", ui.login, methods=["POST"])
    app.add_url_rule("/ui/session", "ui_session", ui.session_info, methods=["GET"])
    app.add_url_rule("/ui/logout", "ui_logout", ui.logout, methods=["POST"])
    app.add_url_rule("/ui/users/<key>/link", "ui_user_link", ui.user_link, methods=["GET"])
    app.add_url_rule("/ui/users/<key>/qr.svg", "ui_user_qr", ui.user_qr, methods=["GET"])
    app.add_url_rule("/ui/static/<name>", "ui_static", ui.static, methods=["GET"])

    @app.after_request
    async def ui_headers(response):
        if request.path == "/ui" or request.path.startswith("/ui/"):
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response
