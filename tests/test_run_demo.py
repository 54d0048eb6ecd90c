"""`make run` (scripts/run_demo.py) as a newcomer meets it: the commands it prints work when
pasted. Runs the demo with its own ports and state directory, then pastes its curl lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from .support.curl import curl
from .support.procs import free_port

ROOT = Path(__file__).resolve().parents[1]


def start_demo(procs, tmp_path):
    """scripts/run_demo.py (what `make run` runs) on free ports with its own state directory,
    once it has printed its lines; returns the process and that directory."""
    ws, socks = free_port(), free_port()
    while ws + 1 == socks:
        socks = free_port()
    state = tmp_path / "state"
    demo = procs.start([sys.executable, str(ROOT / "scripts" / "run_demo.py"), "--ws-port", str(ws),
                        "--socks-port", str(socks), "--state", str(state)], name="make-run")
    demo.wait_for_log("Press Ctrl-C to stop", timeout=60)
    return demo, state


def test_make_run_prints_commands_that_work(procs, tmp_path):
    demo, state = start_demo(procs, tmp_path)
    out = demo.stdout()
    # the first thing to paste: a page fetched through the tunnel
    m = re.search(r"curl --socks5-hostname (\S+) (http://127\.0\.0\.1:\d+/)", out)
    assert m, out
    page = curl(m.group(2), socks=m.group(1), timeout=20).check()
    assert "came through the tunnel" in page.text()
    # the API line, with the key from the state directory as `$(cat .run/api-key)` would give it
    m = re.search(r'curl -H "X-API-Key: \$\(cat \.run/api-key\)" (http://\S+/api/status)', out)
    assert m, out
    key = (state / "api-key").read_text().strip()
    status = curl(m.group(1), extra=["-H", f"X-API-Key: {key}"], timeout=20).check()
    assert status.json()["tokens"][0]["clients_count"] == 1
    # the dashboard's address, and the key from the state directory logs in to it
    m = re.search(r"dashboard (http://127\.0\.0\.1:\d+/ui/) +\(a browser on this machine; log in "
                  r"with the API key\)", out)
    assert m, out
    login = m.group(1) + "login"
    assert curl(login, timeout=20).check().text().count('name="key"') == 1
    answer = httpx.post(login, data={"key": key}, trust_env=False, timeout=20)
    assert answer.status_code == 303 and "trisocks_session" in answer.cookies, answer.text
    # the API key is never on a command line that other local users can read
    argvs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert key not in argvs
