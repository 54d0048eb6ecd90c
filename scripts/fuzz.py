"""The attack suite, long form (make fuzz; FUZZ_SECONDS=..., default 600).

    .venv/bin/python scripts/fuzz.py --seconds 600 [--known] [--parsers-share 0.15]

Starts the processes of tests/support/attack.py (forward server with the API, client, reverse
server, provider), keeps another user's 100 MiB downloads running through the client and the
reverse port (paced to about a minute each, one after another), and sends random Hypothesis
inputs (no fixed seed) to every listener in turn, in batches, until the time is up. Then
coverage-guided atheris runs on the sans-IO parsers for ``--parsers-share`` of the time.

Prints the inputs tried per listener, the duration, RSS and fds of every process (first and
maximum), the downloads, and exits 1 when a process exited, a download was damaged, RSS passed
the bound, a log holds a traceback, the API answered 500, or a parser raised an undocumented
error. ``--without-known`` leaves out the input classes of issue 9's rows (attack.KNOWN_CLASSES),
for a tree where one of them is open again.
Logs and parser crash inputs: .fuzz/<time>/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import attack  # noqa: E402
from tests.support.payload import PayloadServer  # noqa: E402
from tests.support.procs import ProcessFactory, kill_all_live  # noqa: E402

PARSERS = ROOT / "tests" / "fuzz" / "parsers.py"


def run_parsers(seconds: float, out: Path) -> list[str]:
    problems = []
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: parsers skipped (pip install atheris)")
        return problems
    for target in ("decoder", "protocol", "socks5"):
        share = seconds * (0.5 if target == "decoder" else 0.25)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(PARSERS), f"-max_total_time={max(1, int(share))}",
             f"-artifact_prefix={out}/", "-print_final_stats=1"],
            env=dict(os.environ, FUZZ_TARGET=target), capture_output=True, text=True,
            timeout=share + 120)
        text = proc.stdout + proc.stderr
        runs = next((line.split()[1] for line in text.splitlines() if line.startswith("Done ")), "?")
        cov = next((line.split("cov:")[1].split()[0] for line in reversed(text.splitlines())
                    if "cov:" in line), "?")
        print(f"  parser {target:<9} {runs:>9} inputs in {time.monotonic() - t0:4.0f} s, "
              f"coverage {cov} edges, exit {proc.returncode}")
        if proc.returncode != 0:
            problems.append(f"parser {target}: exit {proc.returncode}\n{text[-4000:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--without-known", dest="known", action="store_false",
                    help="leave out the input classes of issue 9's rows (attack.KNOWN_CLASSES)")
    ap.add_argument("--parsers-share", type=float, default=0.15)
    ap.add_argument("--batch", type=int, default=25, help="inputs per listener before the next one")
    args = ap.parse_args(argv)
    out = ROOT / ".fuzz" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    parser_seconds = args.seconds * args.parsers_share
    attack_seconds = args.seconds - parser_seconds
    factory = ProcessFactory(out / "logs")
    payload = PayloadServer("127.0.0.1").start()
    stack = None
    problems: list[str] = []
    try:
        stack = attack.start_stack(factory, out, payload)
        pace = min(60.0, attack_seconds)
        transfers = [
            attack.Transfer(payload, stack.client.socks, seconds=pace, name="forward-100MiB",
                            proxy_user=f"{attack.SOCKS_USER}:{attack.SOCKS_PASS}"),
            attack.Transfer(payload, f"{attack.HOST}:{stack.reverse_socks}", seconds=pace, seed=8,
                            name="reverse-100MiB")]
        monitor = attack.Monitor(stack)
        monitor.start()
        tally = attack.Tally()
        t0 = time.monotonic()
        deadline = t0 + attack_seconds
        for t in transfers:
            t.start()
        print(f"fuzz: {attack_seconds:.0f} s against the processes, then {parser_seconds:.0f} s on "
              f"the parsers; {'with' if args.known else 'without'} the input classes of issue 9's rows; "
              f"logs in {out / 'logs'}", flush=True)
        i = 0
        next_print = t0 + 30
        while time.monotonic() < deadline:
            listener = attack.LISTENERS[i % len(attack.LISTENERS)]
            try:
                attack.run_campaign(stack, tally, listener, known=args.known, max_examples=args.batch,
                                    derandomize=False, deadline=deadline)
            except (attack.ProcessDied, attack.ServerError) as exc:
                problems.append(str(exc))
                break
            i += 1
            if time.monotonic() > next_print:
                next_print += 30
                print(f"  {time.monotonic() - t0:5.0f} s: {sum(tally.tried.values())} inputs", flush=True)
        for t in transfers:
            t.stop()
        for t in transfers:
            t.join(pace * 3 + 120)
        monitor.stop()
        seconds = time.monotonic() - t0
        report = attack.summary(stack, tally, monitor, seconds, transfers)
        print(report, flush=True)
        problems += attack.verdict(stack, transfers, monitor)
        problems += run_parsers(parser_seconds, out)
        (out / "summary.txt").write_text(report + "\n\n" + "\n\n".join(problems) + "\n")
    finally:
        if stack is not None:
            stack.udp_echo.close()
        factory.close()
        payload.stop()
        kill_all_live()
    if problems:
        print("\nFAIL:\n" + "\n\n".join(p[:4000] for p in problems))
        return 1
    print(f"\nPASS (exits: 0); summary in {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
