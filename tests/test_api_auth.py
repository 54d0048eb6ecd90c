"""Who may use the management API (issue 4, point 1): the key (plaintext or hashed; X-API-Key
or Bearer), remote addresses, the failure limit (429), the routes that need no key, and
the key never showing up in logs."""

from __future__ import annotations

import hashlib

import bcrypt
import pytest
import trio

from trisocks.management.keys import ApiKey, FailureLimiter, hash_key

from .api_support import KEY, http, running_api, start_api_server

REMOTE = ("203.0.113.7", 40000)  # TEST-NET-3: an address that is certainly not loopback


async def asgi_get(app, path: str, *, client=REMOTE, headers=(), method: str = "GET"):
    """One request straight into the ASGI app, as if from ``client``: (status, headers, body)."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"tunnel.example")] + [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": client, "server": ("192.0.2.1", 8765), "extensions": {},
    }
    sent = []
    request_done = False

    async def receive():
        nonlocal request_done
        if not request_done:
            request_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def test_no_key_a_wrong_key_and_the_two_ways_to_give_the_right_one():
    # 11 failures from one address here; a success no longer clears them (issue 9 row 12)
    async with running_api(limiter=FailureLimiter(max_failures=100)) as api:
        denied = {"success": False, "error": "invalid API key"}
        r = await api.anon.get("/api/users")
        assert (r.status_code, r.json()) == (401, denied)
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await api.anon.get("/api/users", headers={"X-API-Key": KEY + "x"})
        assert (r.status_code, r.json()) == (401, denied)
        r = await api.anon.get("/api/users", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await api.anon.get("/api/users", headers={"X-API-Key": KEY})).status_code == 200
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert (await api.anon.get("/api/users", headers=bearer)).status_code == 200
        assert (await api.anon.get("/metrics", headers={"Authorization": f"bearer {KEY}"})).status_code == 200
        # what needs no key
        r = await api.anon.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert (await api.anon.get("/api/openapi.json")).status_code == 200
        r = await api.anon.get("/")
        assert r.text == f"trisocks {api.plane.server_status().version} is running\n"
        # everything else does
        for method, path in (("GET", "/api/status"), ("GET", "/api/stats"), ("GET", "/api/events"),
                             ("GET", "/metrics"), ("POST", "/api/users"), ("GET", "/api/server/status"),
                             ("POST", "/api/token"), ("DELETE", "/api/token/x")):
            assert (await api.anon.request(method, path)).status_code == 401, path


@pytest.mark.parametrize("scheme", ["sha256", "pbkdf2", "scrypt", "bcrypt"])
async def test_a_hashed_key_in_the_configuration(scheme):
    secret = "the-operators-secret-key"
    configured = {
        "sha256": hash_key(secret, "sha256"),
        # cheap parameters: the format is under test here, not the cost
        "pbkdf2": f"pbkdf2:sha256:1000:{'ab' * 16}:"
                  f"{hashlib.pbkdf2_hmac('sha256', secret.encode(), bytes.fromhex('ab' * 16), 1000).hex()}",
        "scrypt": f"scrypt:1024:8:1:{'cd' * 16}:" + hashlib.scrypt(
            secret.encode(), salt=bytes.fromhex("cd" * 16), n=1024, r=8, p=1, dklen=32).hex(),
        "bcrypt": bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode(),
    }[scheme]
    async with running_api(key=configured) as api:
        assert secret not in configured
        for _ in range(2):  # the second time from the remembered digest
            r = await api.anon.get("/api/status", headers={"X-API-Key": secret})
            assert r.status_code == 200
        assert (await api.anon.get("/api/status", headers={"X-API-Key": configured})).status_code == 401
        assert (await api.anon.get("/api/status", headers={"X-API-Key": secret[:-1]})).status_code == 401


def test_key_formats_are_checked_when_configured():
    for bad in ("", "sha256:abc", "sha256:" + "z" * 64, "pbkdf2:sha256:10:aa:bb", "pbkdf2:md5:1000:aa:bb",
                "scrypt:1000:8:1:aa:bb", "scrypt:1024:8:1:zz:bb", "$2b$12$short",
                "$2b$99$" + "a" * 53, "$2x$12$" + "a" * 53):
        with pytest.raises(ValueError):
            ApiKey(bad)
    for scheme in ("sha256", "pbkdf2", "scrypt", "bcrypt"):
        key = ApiKey(hash_key("k" * 20, scheme))
        assert key.verify_slow("k" * 20) and not key.verify_slow("k" * 19)
        assert "k" * 20 not in repr(key)
    # bcrypt reads 72 bytes at most: a longer candidate is refused, not truncated into a match
    key = ApiKey(bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(rounds=4)).decode())
    assert key.verify_slow("x" * 72) and not key.verify_slow("x" * 73)


async def test_remote_addresses_are_refused_unless_allowed():
    async with running_api() as api:
        app = api.plane.app
        status, _, body = await asgi_get(app, "/api/status", headers=[("X-API-Key", KEY)])
        assert (status, body) == (403, b'{"success":false,"error":"remote management disabled"}\n')
        # refused before the key is even looked at: no failure is counted for the address
        assert api.plane.limiter.retry_after(REMOTE[0]) == 0
        status, _, _ = await asgi_get(app, "/metrics", headers=[("Authorization", f"Bearer {KEY}")])
        assert status == 403
        # a loopback peer relaying for someone else (a proxy on this machine) is remote too
        status, _, _ = await asgi_get(app, "/api/status", client=("127.0.0.1", 5000),
                                      headers=[("X-API-Key", KEY), ("X-Forwarded-For", "198.51.100.2")])
        assert status == 403
        status, _, _ = await asgi_get(app, "/api/status", client=("::ffff:127.0.0.1", 5000),
                                      headers=[("X-API-Key", KEY)])
        assert status == 200
        # health and subscriptions are for everyone
        status, _, body = await asgi_get(app, "/healthz")
        assert status == 200
        user = await api.create_user(name="remote-user")
        status, _, body = await asgi_get(app, f"/api/subscribe/{user['key']}")
        assert status == 200 and user["key"].encode() in body

    async with running_api(allow_remote=True) as api:
        app = api.plane.app
        assert (await asgi_get(app, "/api/status", headers=[("X-API-Key", KEY)]))[0] == 200
        assert (await asgi_get(app, "/api/status", headers=[("X-API-Key", "nope")]))[0] == 401


async def test_a_burst_of_wrong_keys_gets_429_with_retry_after():
    async with running_api() as api:
        codes = [(await api.anon.get("/api/status", headers={"X-API-Key": f"guess-{i}"})).status_code
                 for i in range(10)]
        assert codes == [401] * 10
        r = await api.anon.get("/api/status", headers={"X-API-Key": "guess-10"})
        assert r.status_code == 429
        assert r.json() == {"success": False, "error": "too many failed attempts; retry later"}
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # locked out means locked out, right key or not...
        assert (await api.anon.get("/api/status", headers={"X-API-Key": KEY})).status_code == 429
        # ...for that address only
        status, _, _ = await asgi_get(api.plane.app, "/api/status", client=("127.0.0.2", 1),
                                      headers=[("X-API-Key", KEY)])
        assert status == 200
        # guessing users' keys counts the same way
        status, headers, _ = await asgi_get(api.plane.app, "/api/subscribe/guess", client=("127.0.0.1", 2))
        assert status == 429 and int(headers["retry-after"]) >= 1
        types = [e.type for e in api.plane.events.query(limit=100)]
        assert types.count("api_auth_failure") == 10 and "api_rate_limited" in types


def test_the_failure_limit_forgets_after_its_window():
    now = [1000.0]
    limiter = FailureLimiter(max_failures=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.failed("a")
    assert limiter.retry_after("a") == 60
    now[0] += 59.5
    assert limiter.retry_after("a") == 1
    now[0] += 1
    assert limiter.retry_after("a") == 0
    limiter.failed("b")
    limiter.succeeded("b")
    assert limiter.retry_after("b") == 0
    small = FailureLimiter(max_failures=1, window=60, max_addresses=2, clock=lambda: now[0])
    for addr in ("x", "y", "z"):
        small.failed(addr)
    assert small.retry_after("x") == 0 and small.retry_after("z") == 60  # bounded memory


@pytest.mark.parametrize("key_in_env", [False, True], ids=["flag", "environment"])
def test_the_key_never_appears_in_the_logs(procs, tmp_path, key_in_env):
    key = "never-log-this-key-7f3a9c2e1b"
    server = start_api_server(procs, db=tmp_path / "t.db", key=key, tokens=["cli-token-abcdef"],
                              debug=True, key_in_env=key_in_env)
    base = server.http_url
    assert http("GET", f"{base}/api/status", key=key).status_code == 200
    for wrong in (key[:-1], key + "0", "x"):
        assert http("GET", f"{base}/api/status", key=wrong).status_code == 401
    user = http("POST", f"{base}/api/users", key=key, json={"name": "logged"}).json()
    token = http("POST", f"{base}/api/token", key=key, json={"type": "forward"}).json()["token"]
    assert http("GET", f"{base}/api/subscribe/{user['key']}", key=None).status_code == 200
    assert http("GET", f"{base}/api/users/{user['key']}", key=key).status_code == 200
    assert http("PUT", f"{base}/api/users/{user['key']}/limit", key=key,
                content=b'{"limit_bytes": "x"}').status_code == 422
    assert http("DELETE", f"{base}/api/token/{token}", key=key).status_code == 200
    server.proc.terminate()
    logs = server.output()
    assert "management plane on" in logs and "user logged created" in logs  # it did log
    for secret in (key, key[:-1], user["key"], token, hashlib.sha256(key.encode()).hexdigest()):
        assert secret not in logs, f"a secret is in the logs:\n{logs}"


def test_help_does_not_show_a_key_from_the_environment():
    import subprocess

    from .support.tools import clean_env, trisocks_cmd

    out = subprocess.run([*trisocks_cmd(), "server", "--help"], capture_output=True, text=True,
                         timeout=30, env=clean_env({"TRISOCKS_API_KEY": "env-secret-4b1d"}),
                         check=False)
    assert out.returncode == 0 and "--api-key" in out.stdout
    assert "env-secret-4b1d" not in out.stdout + out.stderr
