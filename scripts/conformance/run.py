#!/usr/bin/env python3
"""pywssocks' own CLI tests with trisocks in its place (issue 17 item 6).

    python scripts/conformance/run.py [--report FILE] [--only COMBO ...] [--keep]

Downloads the pinned pywssocks sdist (PyPI ships its tests) into a temporary folder and runs
its tests/test_cli.py (with --cli-features, so all 15 run) once per combination:

    baseline    pywssocks server, pywssocks client (must pass, or a failure means nothing)
    t-server    trisocks server,  pywssocks client
    t-client    pywssocks server, trisocks client
    trisocks    trisocks on both ends

The tests call the ``pywssocks`` command; a shim of ours (pywssocks_shim.py) is put first on
PATH under that name and runs pywssocks or trisocks for each role. No test is edited. The
peers' code comes from their package at test time and is never copied here. A markdown table
per combination is printed and written to --report (default: conformance-report.md).
A failed test is run once more on its own; if it passes then it counts, and is listed as
flaky with its first failure (--no-retry turns this off). Exit status: 0 when every
combination passes every test the baseline passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PYWSSOCKS = "pywssocks==1.5.1"
HERE = Path(__file__).resolve().parent
COMBOS = {  # name: (server, client)
    "baseline": ("pywssocks", "pywssocks"),
    "t-server": ("trisocks", "pywssocks"),
    "t-client": ("pywssocks", "trisocks"),
    "trisocks": ("trisocks", "trisocks"),
}
TIMEOUT = 600
SOCKS_REFUSED = re.compile(r"Error connecting to SOCKS5 proxy (\S+) due to: ([^\n]*)")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True)


def fetch_tests(work: Path) -> Path:
    """The sdist's tests folder, unpacked in ``work``."""
    pip("download", "--no-deps", "--no-binary", ":all:", PYWSSOCKS, "-d", str(work))
    sdist = next(work.glob("pywssocks-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    root = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("pywssocks-"))
    # the installed pywssocks must be the one tested, not the sdist's copy beside the tests
    shutil.rmtree(root / "pywssocks")
    return root


def test_deps(work: Path) -> str | None:
    """requests[socks] for the tests, in a folder of its own (the venv stays as it is)."""
    try:
        import requests  # noqa: F401
        import socks  # noqa: F401
        return None
    except ImportError:
        target = work / "deps"
        pip("install", "--target", str(target), "requests[socks]")
        return str(target)


def shim_dir(work: Path) -> Path:
    bin_dir = work / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pywssocks"
    shim.write_text(f"#!{sys.executable}\nimport runpy\n"
                    f"runpy.run_path({str(HERE / 'pywssocks_shim.py')!r}, run_name='__main__')\n")
    shim.chmod(0o755)
    return bin_dir


def pytest(tests: list[str], xml: Path, log: Path, root: Path, env: dict) -> None:
    with open(log, "ab") as fh:
        subprocess.run([sys.executable, "-m", "pytest", *tests, "--cli-features",
                        "-p", "no:cacheprovider", "-p", "no:trio", "-o", "log_cli=false",
                        "-q", f"--junitxml={xml}"],
                       cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=TIMEOUT)


def run_combo(name: str, root: Path, bin_dir: Path, deps: str | None, out: Path,
              retry: bool = True) -> dict:
    server, client = COMBOS[name]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRISOCKS_") and k.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(CONFORMANCE_SERVER=server, CONFORMANCE_CLIENT=client,
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    if deps:
        env["PYTHONPATH"] = deps
    xml = out / f"{name}.xml"
    log = out / f"{name}.log"
    trace = out / f"{name}.trace"
    env["CONFORMANCE_TRACE"] = str(trace)
    started = time.monotonic()
    pytest(["tests/test_cli.py"], xml, log, root, env)
    cases = parse_junit(xml)
    failed = [t for t, (o, _) in cases.items() if o in ("failed", "error")]
    if failed and retry:
        # once more, alone: a test that then passes is reported as flaky with its first failure
        again = out / f"{name}-retry.xml"
        pytest([f"tests/test_cli.py::{t}" for t in failed], again, log, root, env)
        for t, (o, _) in parse_junit(again).items():
            if o == "passed":
                cases[t] = ("flaky", cases[t][1])
    started_roles = trace.read_text().split("\n") if trace.exists() else []
    return {"seconds": time.monotonic() - started, "cases": cases, "log": log,
            "trisocks": sum(1 for line in started_roles if line.endswith(" trisocks"))}


def parse_junit(xml: Path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome, first line of why)."""
    cases = {}
    for case in ET.parse(xml).iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                why = (node.get("message") or "").splitlines()[0][:140] if node.get("message") else ""
                cause = SOCKS_REFUSED.search(case.findtext("system-err", "") + (node.text or ""))
                if cause:  # the SOCKS5 port was not open yet when the test used it
                    why += f" [SOCKS5 proxy {cause[1]}: {cause[2].strip()}]"
                break
        cases[case.get("name")] = (outcome, why)
    return cases


def report(results: dict[str, dict]) -> tuple[str, bool]:
    names = sorted({t for r in results.values() for t in r["cases"]})
    base = results.get("baseline", {}).get("cases", {})
    lines = ["# pywssocks 1.5.1 tests/test_cli.py against trisocks", "",
             "| combination (server / client) | passed | flaky | failed | skipped | time | trisocks runs |",
             "|---|---|---|---|---|---|---|"]
    ok = True
    for combo, r in results.items():
        counts = {k: sum(1 for o, _ in r["cases"].values() if o == k)
                  for k in ("passed", "flaky", "failed", "error", "skipped")}
        lines.append(f"| {combo} ({' / '.join(COMBOS[combo])}) | {counts['passed']} | {counts['flaky']} | "
                     f"{counts['failed'] + counts['error']} | {counts['skipped']} | "
                     f"{r['seconds']:.0f} s | {r['trisocks']} |")
        if "trisocks" in COMBOS[combo] and r["trisocks"] == 0:
            ok = False  # the shim never ran trisocks: the passes would prove nothing
    lines += ["", "| test | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for t in names:
        cells = []
        for combo, r in results.items():
            outcome = r["cases"].get(t, ("missing", ""))[0]
            cells.append(outcome)
            if combo != "baseline" and base.get(t, ("",))[0] in ("passed", "flaky") \
                    and outcome not in ("passed", "flaky"):
                ok = False
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    failures = [(combo, t, why) for combo, r in results.items()
                for t, (o, why) in r["cases"].items() if o in ("failed", "error", "flaky")]
    if failures:
        lines += ["", "Failures (flaky: failed, then passed when run again alone):", ""]
        lines += [f"- {combo} `{t}` ({r_outcome(results, combo, t)}): {why}"
                  for combo, t, why in failures]
    if base and any(o not in ("passed", "flaky") for o, _ in base.values()):
        lines += ["", "The baseline itself does not pass everything: those tests say nothing."]
    return "\n".join(lines) + "\n", ok


def r_outcome(results: dict, combo: str, test: str) -> str:
    return results[combo]["cases"][test][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default="conformance-report.md")
    ap.add_argument("--only", nargs="*", choices=list(COMBOS), default=list(COMBOS))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument("--no-retry", action="store_true",
                    help="do not run a failed test again (by default one that passes the second "
                    "time counts, and is listed as flaky)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trisocks-conformance-"))
    try:
        root = fetch_tests(work)
        deps = test_deps(work)
        bin_dir = shim_dir(work)
        results = {}
        for name in args.only:
            results[name] = run_combo(name, root, bin_dir, deps, work, not args.no_retry)
            passed = sum(1 for o, _ in results[name]["cases"].values() if o in ("passed", "flaky"))
            print(f"{name}: {passed}/{len(results[name]['cases'])} passed in "
                  f"{results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
        text, ok = report(results)
        Path(args.report).write_text(text)
        print(text)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
