"""The dashboard (issue 14): /ui/ on the API's port.

The HTTP tests check the session machinery with httpx against a real ``trisocks server``:
cookie flags, the cookie standing in for the key on /api/, CSRF, log-out, forged and
tampered cookies, the access rule. The browser tests drive Debian's chromium through its
chromedriver (Selenium, never Selenium Manager): log in, create a user, move real traffic
through a real client with that user's key and watch the page follow, decode the QR code
with zbarimg, disable the user, log out; and they write screenshots of every page at
1280x800 and 390x844 to .screenshots/ (docs/img/ has the ones docs/dashboard.md shows).

Without chromium, chromedriver or zbarimg (``make tools``) the browser tests skip, and fail
when ``CI`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from trisocks.management.ui_session import MAX_REVOKED, SessionRefused, Sessions

from .api_support import KEY, running_api, start_api_server
from .support.curl import curl
from .support.peers import start_trisocks_client
from .support.procs import clean_processes

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / ".screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZES = {"desktop": (1280, 800, False), "phone": (390, 844, True)}
COOKIE = "trisocks_session"
SESSION_SECONDS = 12 * 3600


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    """The module's processes (one server for every test here); no trisocks log may hold a
    traceback, whatever the tests sent it."""
    yield from clean_processes(tmp_path_factory.mktemp("dashboard-logs"))


@pytest.fixture(scope="module")
def server(module_procs, tmp_path_factory):
    db = tmp_path_factory.mktemp("dashboard-db") / "trisocks.db"
    return start_api_server(module_procs, db=db, name="trisocks-server")


def client(**kw) -> httpx.Client:
    return httpx.Client(timeout=30.0, trust_env=False, follow_redirects=False, **kw)


def login(base: str) -> tuple[str, str, httpx.Response]:
    """Log in with httpx: the cookie's value, the session's CSRF token, the login answer."""
    with client() as c:
        r = c.post(f"{base}/ui/login", data={"key": KEY})
        assert r.status_code == 303, r.text
        cookie = r.cookies[COOKIE]
        info = c.get(f"{base}/ui/session")  # the client keeps the cookie
        assert info.status_code == 200, info.text
        return cookie, info.json()["csrf_token"], r


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    return {p.partition("=")[0].lower(): p.partition("=")[2] for p in parts[1:]}


# -- sessions, without a server ---------------------------------------------------------------

def test_sessions_are_signed_expire_and_are_revoked():
    now = [1_000_000.0]
    shared = Sessions(lambda: b"cluster secret", clock=lambda: now[0], max_revoked=3)
    value, session = shared.issue()
    # another worker of the same cluster accepts it; another cluster, or a lone server, does not
    other_worker = Sessions(lambda: b"cluster secret", clock=lambda: now[0])
    assert other_worker.check(value) == session
    for stranger in (Sessions(lambda: b"another secret"), Sessions(lambda: None)):
        with pytest.raises(SessionRefused) as refused:
            stranger.check(value)
        assert refused.value.status == 401
    # any change to the payload breaks the signature (a later expiry, another id)
    version, sid, expires, mac = value.split(".")
    for forged in (f"{version}.{sid}.{int(expires) + 3600}.{mac}", f"{version}.{sid[:-1]}A.{expires}.{mac}",
                   f"{version}.{sid}.{expires}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
                   "", "garbage", "1...", "1.a.b.c", "é" * 50, value + "x" * 300):
        with pytest.raises(SessionRefused):
            shared.check(forged)
    # CSRF: changes need the session's token, reads do not
    assert shared.authorize(value, "GET", {}) == session
    with pytest.raises(SessionRefused) as refused:
        shared.authorize(value, "POST", {"x-csrf-token": "nope"})
    assert refused.value.status == 403
    assert shared.authorize(value, "DELETE", {"x-csrf-token": session.csrf}) == session
    # expiry
    now[0] += shared.lifetime - 1
    shared.check(value)
    now[0] += 1
    with pytest.raises(SessionRefused, match="expired"):
        shared.check(value)
    # revocation, bounded: the oldest-expiring revoked ids go first, expired ones are pruned
    values = []
    for _ in range(4):
        v, s = shared.issue()
        shared.revoke(s)
        values.append(v)
        now[0] += 1
    with pytest.raises(SessionRefused, match="logged out"):
        shared.check(values[-1])
    assert len(shared._revoked) == 3
    assert MAX_REVOKED >= 1000


# -- HTTP: cookies, CSRF, log-out ---------------------------------------------------------------

def test_login_sets_a_strict_http_only_cookie_that_stands_in_for_the_key(server):
    base = server.http_url
    with client() as c:
        r = c.get(f"{base}/ui/")
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        page = c.get(f"{base}/ui/login")
        assert page.status_code == 200 and 'name="key"' in page.text
        for name, value in (("content-security-policy", "default-src 'self'"),
                            ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer"),
                            ("cache-control", "no-store")):
            assert value in page.headers.get(name, ""), (name, page.headers)
        assert "<script>" not in page.text  # no inline script: the policy would block it
        wrong = c.post(f"{base}/ui/login", data={"key": KEY + "x"})
        assert wrong.status_code == 401 and "Wrong API key" in wrong.text
        assert "set-cookie" not in wrong.headers
    cookie, csrf, answer = login(base)
    flags = cookie_attributes(answer.headers["set-cookie"])
    assert "httponly" in flags and flags["samesite"] == "Strict" and flags["path"] == "/"
    assert flags["max-age"] == str(SESSION_SECONDS) and "expires" in flags
    assert "secure" not in flags  # plain HTTP here; under TLS: test_the_cookie_is_secure_under_tls
    assert KEY not in answer.headers["set-cookie"]
    with client(cookies={COOKIE: cookie}) as c:
        assert c.get(f"{base}/ui/").status_code == 200
        assert c.get(f"{base}/api/users").status_code == 200
        # a change without the CSRF token, or with a wrong one: 403, nothing made
        for headers in ({}, {"X-CSRF-Token": csrf[:-2] + "xx"}):
            r = c.post(f"{base}/api/users", json={"name": "csrf-victim"}, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.json()["error"], r.text
        assert c.get(f"{base}/api/users", params={"limit": 1000}).json()["total"] == 0
        r = c.post(f"{base}/api/users", json={"name": "made-by-cookie"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        r = c.delete(f"{base}/api/users/{r.json()['key']}", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200
    # the key in a header needs no CSRF token (a header is never sent by the browser on its own)
    with client(headers={"X-API-Key": KEY}) as c:
        r = c.post(f"{base}/api/token", json={"type": "forward", "token": "dash-fwd-0001"})
        assert r.status_code == 200, r.text
    # the dashboard is not part of the API's schema
    schema = httpx.get(f"{base}/api/openapi.json", trust_env=False).json()
    assert not [p for p in schema["paths"] if p.startswith("/ui")]


def test_forged_tampered_and_odd_cookies_are_refused_cleanly(server):
    base = server.http_url
    cookie, csrf, _ = login(base)
    version, sid, expires, mac = cookie.split(".")
    bad = [f"{version}.{sid}.{int(expires) + 86400}.{mac}", f"{version}.{sid}.{expires}.{mac[::-1]}",
           f"2.{sid}.{expires}.{mac}", "x", "1.x.1.x", "." * 40, "a" * 250, "%00%ff", cookie + "=="]
    for value in bad:
        with client(cookies={COOKIE: value}) as c:
            r = c.get(f"{base}/api/users")
            assert r.status_code == 401 and "log in again" in r.json()["error"], (value, r.text)
            r = c.get(f"{base}/ui/")
            assert (r.status_code, r.headers["location"]) == (303, "/ui/login?m=expired")
    # none of that counted as a failed key: the right one still logs in at once
    login(base)
    with client() as c:
        # unknown files and users; no session
        assert c.get(f"{base}/ui/static/nope.js").status_code == 404
        assert c.get(f"{base}/ui/static/index.html").status_code == 404
        assert c.get(f"{base}/ui/static/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get(f"{base}/ui/users/x/qr.svg").status_code == 401
        # bad input to the login form: a JSON body is no form (a failed key)
        r = c.post(f"{base}/ui/login", json={"key": KEY})
        assert r.status_code == 401
    with client(cookies={COOKIE: cookie}) as c:
        assert c.get(f"{base}/ui/users/no-such-user-0001/qr.svg").status_code == 404
        assert c.get(f"{base}/ui/users/no-such-user-0001/link").status_code == 404
    with client() as c:  # a huge one: 413 (and the server closes the connection)
        r = c.post(f"{base}/ui/login", content=b"key=" + b"k" * (2 << 20),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413


def test_log_out_ends_the_session_for_good(server):
    base = server.http_url
    cookie, csrf, _ = login(base)
    with client(cookies={COOKIE: cookie}) as c:
        r = c.post(f"{base}/ui/logout")  # without the CSRF token: refused, session intact
        assert r.status_code == 403
        assert c.get(f"{base}/ui/session").status_code == 200
        r = c.post(f"{base}/ui/logout", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200
        cleared = cookie_attributes(r.headers["set-cookie"])
        assert r.headers["set-cookie"].startswith(f"{COOKIE}=;") and cleared["max-age"] == "0"
    with client(cookies={COOKIE: cookie}) as c:  # the old cookie, kept by someone
        assert c.get(f"{base}/api/users").status_code == 401
        assert c.get(f"{base}/ui/session").status_code == 401
        assert c.post(f"{base}/api/users", json={}, headers={"X-CSRF-Token": csrf}).status_code == 401


def test_remote_addresses_are_refused(server):
    base = server.http_url
    relayed = {"X-Forwarded-For": "198.51.100.20"}  # a proxy on this machine: remote
    cookie, _, _ = login(base)
    with client(headers=relayed) as c:
        for method, path in (("GET", "/ui/"), ("GET", "/ui/login"), ("POST", "/ui/login"),
                             ("GET", "/ui/static/app.js"), ("GET", "/ui/session")):
            r = c.request(method, f"{base}{path}", data={"key": KEY} if method == "POST" else None)
            assert r.status_code == 403 and "remote management disabled" in r.text, (path, r.text)
    with client(headers=relayed, cookies={COOKIE: cookie}) as c:
        assert c.get(f"{base}/api/users").status_code == 403


async def test_the_cookie_is_secure_under_tls(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with running_api(server_cfg={"tls_cert": str(tmp_path / "s.pem")}) as api:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{api.port}", verify=context,
                                     trust_env=False) as https:
            r = await https.post("/ui/login", data={"key": KEY})
            assert r.status_code == 303
            flags = cookie_attributes(r.headers["set-cookie"])
            assert "secure" in flags and "httponly" in flags and flags["samesite"] == "Strict"
            # a cluster's secret signs the sessions every node accepts: set one, and the
            # per-process sessions end
            assert (await https.get("/ui/session")).status_code == 200  # the cookie, kept
            api.plane.state.cluster_secret = b"s" * 32
            assert (await https.get("/ui/session")).status_code == 401


# -- the browser --------------------------------------------------------------------------------

def need_browser_tools() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if shutil.which("zbarimg") is None:
        missing.append("zbarimg")
    if missing:
        why = (f"the dashboard's browser tests need {', '.join(missing)} "
               "(Debian's chromium, chromium-driver and zbar-tools: `make tools` installs them)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    need_browser_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-gpu", "--window-size=1280,800", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--no-proxy-server"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    SHOTS.mkdir(exist_ok=True)
    try:
        yield driver
        # answers the tests cause on purpose (refusals, an unhealthy server) are logged as
        # failed loads; anything else (a script error) is a bug
        expected = re.compile(r"status of (401|403|409|503)")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                  and not expected.search(e["message"])]
        assert not errors, f"errors in the browser's console: {errors}"
    finally:
        driver.quit()


def wait(driver, condition, what: str, timeout: float = 10.0):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / "failed-wait.png"))
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; at "
                             f"{driver.current_url}") from None


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def viewport(driver, size: str) -> None:
    width, height, mobile = SIZES[size]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def shoot(driver, name: str, toast: bool = False, at: str | None = None) -> None:
    """Screenshots of what is shown now, at both sizes (without the last message unless
    ``toast``; scrolled to the element ``at``, or the top); the phone's page must not be
    wider than the phone."""
    if not toast:
        driver.execute_script("const t = document.getElementById('toast'); if (t) t.hidden = true;")
    for size in SIZES:
        viewport(driver, size)
        if at:
            driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", at)
        else:
            driver.execute_script("window.scrollTo(0, 0)")
        if size == "phone":
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name}: the page is {overflow} px wider than a 390 px phone"
        driver.save_screenshot(str(SHOTS / f"{name}-{size}.png"))
    viewport(driver, "desktop")


def browser_login(driver, base: str, key: str = KEY) -> None:
    driver.get(f"{base}/ui/")
    wait(driver, lambda d: find(d, "#key"), "the login form")
    box = find(driver, "#key")
    box.clear()
    box.send_keys(key)
    find(driver, "button[type=submit]").click()


def open_page(driver, base: str, page: str) -> None:
    """Show ``#page`` of the dashboard, logging in first when the browser has no session."""
    driver.get(f"{base}/ui/#{page}")
    wait(driver, lambda d: find(d, "#key") or text_of(d, "main h1") not in ("", "Loading…"),
         "the dashboard or the login form")
    if find(driver, "#key"):
        browser_login(driver, base)
        wait(driver, lambda d: find(d, "#logout"), "the dashboard after login")
        driver.get(f"{base}/ui/#{page}")
    wait(driver, lambda d: text_of(d, "main h1").lower() == page, f"the {page} page")


def rows(driver, css: str, name: str) -> list[str]:
    """The data-``name`` of every match, read at once (no element can go stale meanwhile)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.dataset[arguments[1]])", css, name)


def text_of(driver, css: str) -> str:
    """The text of the first match ("" when none; the pages redraw every 2 s)."""
    return attr(driver, css, None) or ""


def attr(driver, css: str, name: str | None):
    """An attribute of the first match (its text when ``name`` is None), or None."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        node = find(driver, css)
        if node is None:
            return None
        return node.text if name is None else node.get_attribute(name)
    except StaleElementReferenceException:
        return None


def test_browser_login_refuses_a_wrong_key_and_keeps_no_key(browser, server):
    base = server.http_url
    browser_login(browser, base, KEY + "-wrong")
    wait(browser, lambda d: "Wrong API key" in text_of(d, ".note"), "the wrong key's message")
    assert find(browser, "#logout") is None
    shoot(browser, "login")
    browser_login(browser, base)
    wait(browser, lambda d: text_of(d, "main h1") == "Overview", "the overview after login")
    wait(browser, lambda d: text_of(d, "#card-health .card-value") == "OK", "the health card")
    # the key is nowhere the page's scripts can read it
    seen = browser.execute_script(
        "return [JSON.stringify(localStorage), JSON.stringify(sessionStorage), document.cookie,"
        " document.documentElement.outerHTML, String(window.name)].join('|')")
    assert KEY not in seen and COOKIE not in seen  # HttpOnly: not in document.cookie either
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # keyboard: the first tabs reach the skip link, then the first page link, visibly
    from selenium.webdriver.common.keys import Keys

    find(browser, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("class") == "skip"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    active = browser.switch_to.active_element
    assert active.text == "Overview"
    assert active.value_of_css_property("outline-style") == "solid"


def test_browser_user_traffic_qr_and_disable(browser, server, module_procs, payload_server, tmp_path):
    from selenium.webdriver.support.ui import Select

    base = server.http_url
    open_page(browser, base, "users")
    find(browser, "#new-user").click()
    form = find(browser, "#create-user form")
    form.find_element("name", "name").send_keys("alice")
    form.find_element("name", "limit").send_keys("8")
    Select(form.find_element("name", "unit")).select_by_value("MiB")
    form.find_element("css selector", "button[type=submit]").click()
    wait(browser, lambda d: find(d, 'tr[data-user="alice"]'), "alice in the table")
    wait(browser, lambda d: find(d, "#user-detail h2") and "alice" in text_of(d, "#user-detail h2"),
         "alice's details")
    users = httpx.get(f"{base}/api/users", headers={"X-API-Key": KEY}, trust_env=False).json()["users"]
    alice = next(u for u in users if u["name"] == "alice")
    assert alice["limit_bytes"] == 8 << 20
    # a refused change shows the API's own words
    find(browser, "#new-user").click()
    form.find_element("name", "name").send_keys("alice")
    form.find_element("css selector", "button[type=submit]").click()
    wait(browser, lambda d: re.search(r"Refused \(409\): .*already exists", text_of(d, "#toast")),
         "the refusal of a second alice")
    find(browser, "#new-user").click()  # close the form again

    # real traffic through a real client with alice's key: the bar and the chart follow
    tunnel = start_trisocks_client(module_procs, server.url, alice["key"])
    size = 3 << 20
    curl(payload_server.bytes_url(size), socks=tunnel.socks, timeout=30).check()
    row_bar = 'tr[data-user="alice"] [data-percent]'
    share = 100 * size / (8 << 20)
    wait(browser, lambda d: float(attr(d, row_bar, "data-percent") or 0) >= share,
         "alice's usage bar to show the download")
    wait(browser, lambda d: float(attr(d, "#user-usage-chart svg", "data-total") or 0) >= size,
         "alice's usage chart to show the download")
    wait(browser, lambda d: float(attr(d, "#user-live-chart svg", "data-total") or 0) > 0,
         "alice's throughput chart to show the download")
    wait(browser, lambda d: "1 device" in text_of(d, 'tr[data-user="alice"] td[data-label="Online"]'),
         "alice's client online")
    # the QR code, as the browser shows it, decodes to the subscription link
    qr = find(browser, "#user-qr")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", qr),
         "the QR code to load")
    png = tmp_path / "qr.png"
    png.write_bytes(qr.screenshot_as_png)
    decoded = subprocess.run(["zbarimg", "--quiet", "--raw", str(png)], capture_output=True, text=True,
                             timeout=30)
    link = f"{base}/api/subscribe/{alice['key']}"
    assert decoded.stdout.strip() == link, decoded
    assert text_of(browser, "#user-link") == link
    assert httpx.get(link, trust_env=False).json()["token"] == alice["key"]
    shoot(browser, "user")
    shoot(browser, "user-charts", at="#user-detail .two")

    # disabling alice: her client's next connection fails
    toggle = find(browser, "#user-toggle")
    assert toggle.text == "Disable"
    toggle.click()
    wait(browser, lambda d: text_of(d, 'tr[data-user="alice"] .badge') == "disabled", "alice disabled")
    assert find(browser, "#user-toggle").text == "Enable"
    failed = curl(payload_server.bytes_url(1000), socks=tunnel.socks, timeout=30)
    assert failed.returncode != 0 and failed.http_code in (None, 0), failed
    shoot(browser, "user-disabled", toast=True)


def test_browser_screenshots_of_every_page(browser, server):
    base = server.http_url
    with client(headers={"X-API-Key": KEY}) as c:
        c.post(f"{base}/api/token", json={"type": "reverse", "token": "dash-reverse-01"})
        c.post(f"{base}/api/token", json={"type": "connector", "token": "dash-connector-01",
                                          "reverse_token": "dash-reverse-01"})
        for name, limit, status in (("bob", 10 << 30, "active"), ("carol", None, "disabled"),
                                    ("dave", 1 << 20, "active")):
            c.post(f"{base}/api/users", json={"name": name, "limit_bytes": limit, "status": status,
                                              "expires_at": "2031-01-01T00:00:00Z" if limit else None})
    open_page(browser, base, "overview")
    wait(browser, lambda d: find(d, "#throughput-chart svg"), "the throughput chart")
    wait(browser, lambda d: "dash-reverse-01" in text_of(d, "#providers"), "providers per reverse token")
    shoot(browser, "overview")
    browser.get(f"{base}/ui/#tokens")
    wait(browser, lambda d: find(d, 'tr[data-token="dash-connector-01"]'), "the tokens")
    shoot(browser, "tokens")
    browser.get(f"{base}/ui/#events")
    wait(browser, lambda d: find(d, 'tr[data-type="user_created"]'), "the events")
    shoot(browser, "events")
    # the events' filter
    from selenium.webdriver.support.ui import Select

    Select(find(browser, "#event-type")).select_by_value("token_added")
    wait(browser, lambda d: set(rows(d, "#event-table tbody tr", "type")) == {"token_added"},
         "only token_added events")
    # the users' search
    browser.get(f"{base}/ui/#users")
    wait(browser, lambda d: find(d, 'tr[data-user="carol"]'), "carol in the table")
    shoot(browser, "users")
    find(browser, "#user-search").send_keys("carol")
    wait(browser, lambda d: rows(d, "#user-table tbody tr", "user") == ["carol"], "carol alone in the table")


def test_browser_log_out_and_an_ended_session(browser, server):
    base = server.http_url
    open_page(browser, base, "overview")
    old = browser.get_cookie(COOKIE)["value"]
    find(browser, "#logout").click()
    wait(browser, lambda d: "logged out" in text_of(d, ".note"), "the log-out message")
    with client(cookies={COOKIE: old}) as c:
        assert c.get(f"{base}/api/stats").status_code == 401
        assert c.get(f"{base}/ui/session").status_code == 401
    # a session that ends while the page is open (here: logged out elsewhere) sends the page
    # back to the login form, saying so
    browser_login(browser, base)
    wait(browser, lambda d: text_of(d, "main h1") == "Overview", "the overview")
    value = browser.get_cookie(COOKIE)["value"]
    with client(cookies={COOKIE: value}) as c:
        csrf = c.get(f"{base}/ui/session").json()["csrf_token"]
        assert c.post(f"{base}/ui/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    wait(browser, lambda d: "session has ended" in text_of(d, ".note"), "the ended session's message")
    assert re.search(r"/ui/login\?m=expired$", browser.current_url)


def test_browser_shows_an_unhealthy_server(browser, server, tmp_path):
    """Last: the database goes away under the running server, /healthz fails, the banner says so."""
    base = server.http_url
    open_page(browser, base, "overview")
    assert find(browser, "#health-banner").get_attribute("hidden") is not None
    db = Path(re.search(r"--db (\S+)", " ".join(server.proc.argv)).group(1))
    db.rename(tmp_path / "moved.db")
    try:
        wait(browser, lambda d: find(d, "#health-banner").is_displayed(), "the health banner", 15)
        assert "unhealthy" in text_of(browser, "#health-banner")
        assert text_of(browser, "#card-health .card-value") == "Failing"
        shoot(browser, "unhealthy")
    finally:
        (tmp_path / "moved.db").rename(db)
