"""pywssocks' own CLI tests with trisocks in every role (issue 17 item 6), as `make conformance`
runs them: about two minutes for the four combinations. Select it with ``-k conformance``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .support.tools import clean_env

RUNNER = Path(__file__).resolve().parent.parent / "scripts" / "conformance" / "run.py"

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_pywssocks_cli_tests_pass_with_trisocks_in_every_role(tmp_path):
    report = tmp_path / "conformance-report.md"
    done = subprocess.run([sys.executable, str(RUNNER), "--report", str(report)], env=clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    text = report.read_text() if report.exists() else ""
    assert done.returncode == 0, f"{text}\n--- stderr ---\n{done.stderr[-4000:]}"
    for combo in ("baseline", "t-server", "t-client", "trisocks"):
        assert f"| {combo} (" in text, text
