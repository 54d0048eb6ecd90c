"""The benchmark harness must not rot: a smoke run on a tiny payload, every step a number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run(tmp_path):
    require_tool("nginx")
    require_tool("curl")
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke: OK" in result.stdout
    data = json.loads(next(out.glob("*.json")).read_text())
    text = json.dumps(data)
    assert "trisocks-forward" in text
    tables = list(out.glob("*.md"))
    assert tables and "| trisocks-forward |" in tables[0].read_text()
