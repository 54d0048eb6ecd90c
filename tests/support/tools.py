"""Finding the programs the tests drive, and what to do when one is missing.

A missing tool or peer FAILS the test when the environment variable ``CI`` is set (CI=1 in
CI: a skipped test must never be counted as a pass there) and skips it locally, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent

# Peers: (executable in the virtualenv, Python module it needs, pip requirement)
PEERS = {
    "pywssocks": ("pywssocks", "pywssocks", "pywssocks==1.5.1"),
    "linksocks": ("linksocks", "linksocks", "linksocks==1.8.9"),
}

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(reason: str):
    """Fail under CI, skip otherwise."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Absolute path of the command-line tool ``name`` (e.g. curl) or fail/skip."""
    path = shutil.which(name) or (str(BIN_DIR / name) if (BIN_DIR / name).exists() else None)
    if path is None:
        missing(f"{name} is not installed (needed by this test; e.g. apt-get install {name})")
    return path


def require_peer(name: str) -> str:
    """Absolute path of the CLI of peer ``name`` (pywssocks or linksocks) or fail/skip."""
    exe, module, requirement = PEERS[name]
    path = BIN_DIR / exe
    if not path.exists():
        found = shutil.which(exe)
        if found is None:
            missing(f"peer {name} is not installed (pip install '{requirement}')")
        path = Path(found)
    if importlib.util.find_spec(module) is None:
        missing(f"peer {name}: Python module {module!r} is not importable "
                f"in {sys.executable} (pip install '{requirement}')")
    return str(path)


def trisocks_cmd() -> list[str]:
    """How to run the trisocks CLI of the Python running the tests."""
    exe = BIN_DIR / "trisocks"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "trisocks"]


def clean_env(extra: dict[str, str] | None = None, keep_trisocks: bool = False) -> dict[str, str]:
    """The test process's environment without proxy settings (all traffic stays on loopback and
    must not be sent to a proxy from the environment) and, unless ``keep_trisocks``, without
    TRISOCKS_* settings other than TRISOCKS_REQUIRE_COMPILED (so that flags mean what they say)."""
    env = {}
    for key, value in os.environ.items():
        if key.lower() in _PROXY_VARS:
            continue
        if key.startswith("TRISOCKS_") and key != "TRISOCKS_REQUIRE_COMPILED" and not keep_trisocks:
            continue
        env[key] = value
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env
