"""The soak run, short form: scripts/soak.py for 60 s (``make soak`` runs it for 10 minutes).

Mixed load (bulk, request churn, bad input, API writes, client kills and restarts) against
real processes; RSS and fds sampled every 5 s must not grow by more than 5 % after the warm-up,
and no process may exit. The report lands in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
SECONDS = float(os.environ.get("TRISOCKS_SOAK_SECONDS", "60"))


def test_soak_short(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, str(SOAK), "--seconds", str(SECONDS), "--interval", "5",
                           "--out", str(out)], capture_output=True, text=True, timeout=SECONDS + 240)
    text = proc.stdout + proc.stderr
    report_file = out / "soak.json"
    assert report_file.exists(), text[-6000:]
    report = json.loads(report_file.read_text())
    assert proc.returncode == 0 and report["ok"], text[-6000:]
    assert report["exits"] == 0
    # the load really ran: every kind of it, and the samples cover the run
    counts = report["counts"]
    for what in ("bulk_transfers", "short_requests", "bad_inputs", "api_writes", "client_restarts"):
        assert counts.get(what, 0) > 0, (what, counts)
    assert len(report["samples"]) >= SECONDS / 5 - 1
    assert (out / "soak.svg").read_text().startswith("<svg")
    assert "Verdict: PASS" in (out / "soak.md").read_text()
