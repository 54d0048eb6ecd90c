"""Helpers for the management API tests: a server with the API on, in this process (a real
listener on 127.0.0.1, real HTTP through httpx), or as a ``trisocks server`` subprocess.

In-process::

    async with running_api(tokens=["t"]) as api:
        r = await api.get("/api/status")
        socks_port = await api.client(nursery, "t")   # a real trisocks client, in process
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from trisocks.management import ApiKey, Management, MemoryStore
from trisocks.policy.rules import RuleSet
from trisocks.tunnel.client import Client, ClientConfig
from trisocks.tunnel.server import Server, ServerConfig
from trisocks.wire.errors import AuthError

from .support.peers import HOST, Peer
from .support.procs import ProcessFactory
from .support.tools import clean_env, trisocks_cmd

KEY = "test-api-key-0123456789abcdef"
MiB = 1 << 20


@dataclass
class Api:
    plane: Management
    server: Server
    port: int
    key: str
    http: httpx.AsyncClient | None = None  # sends the API key
    anon: httpx.AsyncClient | None = None  # sends none
    clients: list = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        return await self.http.request(method, path, **kw)

    async def get(self, path: str, **kw) -> httpx.Response:
        return await self.http.get(path, **kw)

    async def post(self, path: str, json=None, **kw) -> httpx.Response:
        return await self.http.post(path, json=json, **kw)

    async def put(self, path: str, json=None, **kw) -> httpx.Response:
        return await self.http.put(path, json=json, **kw)

    async def patch(self, path: str, json=None, **kw) -> httpx.Response:
        return await self.http.patch(path, json=json, **kw)

    async def delete(self, path: str, **kw) -> httpx.Response:
        return await self.http.delete(path, **kw)

    async def user(self, key: str) -> dict:
        r = await self.get(f"/api/users/{key}")
        assert r.status_code == 200, r.text
        return r.json()

    async def create_user(self, **body) -> dict:
        r = await self.post("/api/users", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    async def client(self, nursery, token: str, **cfg) -> int | None:
        """Start a trisocks client (in this process) with ``token``; returns its SOCKS5 port
        (None for a provider). A refused token ends it: ``refusals`` records why."""
        cfg.setdefault("url", self.ws_url)
        config = ClientConfig(token=token, socks_host=HOST, socks_port=0, **cfg)
        client = Client(config)
        self.clients.append(client)

        async def run(*, task_status=trio.TASK_STATUS_IGNORED):
            started = []

            class Status:
                def started(self, value=None):
                    started.append(value)
                    task_status.started(value)

            try:
                await client.run(task_status=Status())
            except* AuthError as group:
                self.refusals.extend(str(exc) for exc in _leaves(group))
            if not started:
                task_status.started(None)  # refused before it was ever ready

        return await nursery.start(run)


def _leaves(group: BaseException):
    if isinstance(group, BaseExceptionGroup):
        for inner in group.exceptions:
            yield from _leaves(inner)
    else:
        yield group


LOCAL_TARGETS = RuleSet.parse(["deny own", "allow loopback"])


@asynccontextmanager
async def running_api(*, store=None, key: str = KEY, tokens: Sequence[str] = (),
                      server_cfg: dict | None = None, **opts):
    """A server with the management plane on, in a nursery of its own; yields an :class:`Api`."""
    plane = Management(store if store is not None else MemoryStore(), api_key=ApiKey(key), **opts)
    for token in tokens:
        plane.tokens.add_forward(token)
    # users may reach the test's local targets (as `--deny own --allow loopback` would let
    # them); the tests of the defaults give rules of their own
    cfg = {"rules": LOCAL_TARGETS, **(server_cfg or {})}
    server = plane.create_server(ServerConfig(ws_host=HOST, ws_port=0, **cfg))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(plane.run)
        api = Api(plane, server, port, key)
        async with httpx.AsyncClient(base_url=api.url, headers={"X-API-Key": key},
                                     timeout=30.0, trust_env=False) as http, \
                httpx.AsyncClient(base_url=api.url, timeout=30.0, trust_env=False) as anon:
            api.http, api.anon = http, anon
            yield api
        nursery.cancel_scope.cancel()


async def wait_until(predicate, what: str, timeout: float = 10.0, interval: float = 0.01):
    """Poll an observable condition (sync or async predicate) until it holds, or fail."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- subprocesses ------------------------------------------------------------------------------

_READY = re.compile(r"(?<!proxy )listening on 127\.0\.0\.1:(\d+)")


def start_api_server(procs: ProcessFactory, *, db, key: str = KEY, tokens: Sequence[str] = (),
                     extra: Sequence[str] = (), debug: bool = False, env: dict | None = None,
                     key_in_env: bool = False, name: str = "api-server",
                     local_targets: bool = True) -> Peer:
    """``trisocks server`` with the API on and ``--db db``; ready when its port accepts.
    With ``local_targets`` users may reach the test's targets on loopback (never the
    server's own listeners), as ``--deny own --allow loopback`` lets them."""
    argv = [*trisocks_cmd(), "server", "-H", HOST, "-P", "0", "--db", str(db)]
    if local_targets:
        argv += ["--deny", "own", "--allow", "loopback"]
    environment = clean_env() if env is None else dict(env)
    if key_in_env:
        environment["TRISOCKS_API_KEY"] = key
    else:
        argv += ["-k", key]
    for token in tokens:
        argv += ["-t", token]
    if debug:
        argv.append("-dd")
    argv += list(extra)
    proc = procs.start(argv, name=name, env=environment)
    match = proc.wait_for_log(_READY, 30.0)
    port = int(match.group(1))
    proc.wait_for_log("management plane on", 30.0)
    proc.wait_for_port(port, HOST)
    return Peer("trisocks-server", port, proc)


def http(method: str, url: str, *, key: str | None = KEY, **kw) -> httpx.Response:
    """One synchronous HTTP request (for tests that drive subprocesses)."""
    headers = dict(kw.pop("headers", {}))
    if key is not None:
        headers.setdefault("X-API-Key", key)
    with httpx.Client(timeout=30.0, trust_env=False) as c:
        return c.request(method, url, headers=headers, **kw)
