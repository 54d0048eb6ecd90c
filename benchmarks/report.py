"""Results: medians, the goals check, the JSON file, the Markdown table and the chart.

The chart needs matplotlib, which lives in the benchmark's own venv
(``benchmarks/.work/venv-bench``); the runner calls this file as a script with that
venv's Python:  python report.py chart RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REFERENCE = "trisocks-forward"

# key, column title, format, higher is better
COLUMNS = [
    ("down", "down MB/s", "{:.0f}", True),
    ("up", "up MB/s", "{:.0f}", True),
    ("down_par", "{n}x down MB/s", "{:.0f}", True),
    ("up_par", "{n}x up MB/s", "{:.0f}", True),
    ("rps", "req/s", "{:.0f}", True),
    ("p50_ms", "p50 ms", "{:.1f}", False),
    ("p99_ms", "p99 ms", "{:.1f}", False),
    ("errors", "errors", "{:.0f}", False),
    ("rss_after_bulk_mb", "RSS after bulk MB", "{:.1f}", False),
    ("bytes_per_idle_channel", "B/idle channel", "{:.0f}", False),
    ("cpu_s_per_gib", "CPU s/GiB", "{:.2f}", False),
    ("cpu_ms_per_kreq", "CPU ms/1k req", "{:.0f}", False),
]
# what the chart shows, as ratios to the reference
CHART_KEYS = ["down", "up", "down_par", "up_par", "rps", "p99_ms", "rss_after_bulk_mb",
              "bytes_per_idle_channel", "cpu_s_per_gib", "cpu_ms_per_kreq"]


def _median(values: list) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summarize(system_result: dict) -> dict:
    """Median figures of one system from its raw repetitions."""
    groups = system_result.get("groups", {})
    bulk = groups.get("bulk", {}).get("reps", [])
    rate = groups.get("rate", {}).get("reps", [])
    idle = groups.get("idle", {}).get("reps", [])
    fig: dict = {}
    for key in ("down", "up", "down_par", "up_par", "cpu_s_per_gib"):
        fig[key] = _median([r.get(key) for r in bulk])
    rss = _median([r.get("rss_after") for r in bulk])
    fig["rss_after_bulk_mb"] = rss / 1e6 if rss is not None else None
    for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_kreq"):
        fig[key] = _median([r.get(key) for r in rate])
    fig["bytes_per_idle_channel"] = _median([r.get("bytes_per_channel") for r in idle])
    fig["bulk_errors"] = sum(len(r.get("errors", [])) for r in bulk)
    fig["rate_errors"] = sum(r.get("errors") or 0 for r in rate)
    fig["idle_errors"] = sum(r.get("errors") or 0 for r in idle)
    group_failures = sum(1 for g in groups.values() if g.get("error"))
    fig["errors"] = fig["bulk_errors"] + fig["rate_errors"] + fig["idle_errors"] + group_failures
    return fig


# ---- goals --------------------------------------------------------------------------

def _goal(name: str, value, bound, ok_fn, detail: str) -> dict:
    if value is None or bound is None:
        return {"goal": name, "status": "MISSING", "detail": detail + " (figure missing)"}
    return {"goal": name, "status": "PASS" if ok_fn(value, bound) else "FAIL", "detail": detail}


def _ratio_goal(name, figs, key, other, factor, op=">="):
    a = figs.get(REFERENCE, {}).get(key)
    b = figs.get(other, {}).get(key)
    bound = b * factor if b is not None else None
    ratio = f"{a / b:.2f}x" if a is not None and b else "n/a"
    detail = f"{REFERENCE} {_fmt(a)} vs {other} {_fmt(b)} = {ratio} (need {op} {factor}x)"
    return _goal(name, a, bound, lambda v, lim: v >= lim, detail)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def goals(figs: dict) -> list[dict]:
    """The performance issue's goals, each computed from figures of the same run."""
    f = figs.get(REFERENCE, {})
    out = []
    for key, label in (("down", "bulk down"), ("up", "bulk up")):
        out.append(_ratio_goal(f"{label} >= 4x pywssocks", figs, key, "pywssocks", 4.0))
        out.append(_ratio_goal(f"{label} >= 0.75x socat", figs, key, "socat", 0.75))
    out.append(_ratio_goal("req/s >= 0.9x trio-relay", figs, "rps", "trio-relay", 0.9))
    out.append(_ratio_goal("req/s >= 1.8x linksocks", figs, "rps", "linksocks", 1.8))
    p99 = f.get("p99_ms")
    out.append(_goal("p99 <= 60 ms", p99, 60.0, lambda v, lim: v <= lim,
                     f"p99 {_fmt(p99)} ms"))
    errs = f.get("errors") if f else None
    out.append(_goal("zero errors", errs, 0, lambda v, lim: v <= lim,
                     f"{errs} errors (bulk {f.get('bulk_errors')}, rate {f.get('rate_errors')}, "
                     f"idle {f.get('idle_errors')})" if f else "no figures"))
    rss = f.get("rss_after_bulk_mb")
    out.append(_goal("RSS server+client <= 96 MB after bulk", rss, 96.0,
                     lambda v, lim: v <= lim, f"RSS {_fmt(rss)} MB"))
    per = f.get("bytes_per_idle_channel")
    out.append(_goal("<= 16 KiB per idle channel", per, 16384.0, lambda v, lim: v <= lim,
                     f"{_fmt(per)} bytes per channel"))
    rev = figs.get("trisocks-reverse", {})
    for key, label in (("down", "bulk down"), ("up", "bulk up"), ("rps", "req/s")):
        a, b = rev.get(key), f.get(key)
        ratio = f"{a / b:.2f}x" if a is not None and b else "n/a"
        out.append(_goal(f"reverse {label} within 15% of forward", a,
                         b * 0.85 if b is not None else None, lambda v, lim: v >= lim,
                         f"reverse {_fmt(a)} vs forward {_fmt(b)} = {ratio} (need >= 0.85x)"))
    # Issue 11, "Cheap": policy on (100 rules, speed limits far above, accounting) costs at
    # most 5% of CPU per GiB and of req/s; CPU per request is the same claim in CPU time,
    # which other work on a shared machine moves less than the wall-clock req/s.
    pol = figs.get("trisocks-policy", {})
    for key, label, factor, higher in (("cpu_s_per_gib", "CPU s/GiB", 1.05, False),
                                       ("rps", "req/s", 0.95, True),
                                       ("cpu_ms_per_kreq", "CPU ms/1k req", 1.05, False)):
        a, b = pol.get(key), f.get(key)
        ratio = f"{a / b:.3f}x" if a is not None and b else "n/a"
        need = f">= {factor}x" if higher else f"<= {factor}x"
        out.append(_goal(f"policy on {label} within 5% of forward", a,
                         b * factor if b is not None else None,
                         (lambda v, lim: v >= lim) if higher else (lambda v, lim: v <= lim),
                         f"policy {_num(a)} vs forward {_num(b)} = {ratio} (need {need})"))
    return out


# ---- Markdown ----------------------------------------------------------------------

def _cell(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def markdown(data: dict, with_goals: bool = True) -> str:
    cfg = data["config"]
    n = cfg["streams"]
    figs = data["figures"]
    names = [s for s in data["systems_order"] if s in figs]
    ref = data.get("ratio_reference")
    titles = [t.format(n=n) for _, t, _, _ in COLUMNS]
    lines = [f"# trisocks benchmark, {data['machine']['date']}", ""]
    lines.append(f"`{data['machine']['command']}`")
    lines.append("")
    m = data["machine"]
    lines.append(f"Machine: {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, "
                 f"Python {m['python']}. Payload {cfg['size'] / 2**20:.0f} MiB "
                 f"({cfg['payload']}), {n} parallel streams move the same total; "
                 f"{cfg['requests']} x 1 KiB requests at concurrency {cfg['concurrency']}, "
                 f"new connection each; {cfg['idle_channels']} idle channels. "
                 f"Each figure is the median of {cfg['repeat']} repetitions; errors are summed. "
                 "MB = 10^6 bytes.")
    lines.append("")
    lines.append("| system | " + " | ".join(titles) + " |")
    lines.append("|---" * (len(titles) + 1) + "|")
    for name in names:
        f = figs[name]
        lines.append(f"| {name} | " + " | ".join(_cell(f.get(k), fmt) for k, _, fmt, _ in COLUMNS)
                     + " |")
    if ref:
        lines += ["", (f"Ratios to {ref} (value / {ref}; above 1 is better for throughput "
                       "and req/s, worse for latency, memory and CPU):"), ""]
        lines.append("| system | " + " | ".join(titles) + " |")
        lines.append("|---" * (len(titles) + 1) + "|")
        base = figs[ref]
        for name in names:
            f = figs[name]
            cells = []
            for k, _, _, _ in COLUMNS:
                a, b = f.get(k), base.get(k)
                cells.append("-" if a is None or not b or k == "errors" else f"{a / b:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ref and ref != REFERENCE:
        why = ("produced no figures in this run" if REFERENCE in data["systems_order"]
               else "was not part of this run")
        lines += ["", f"({REFERENCE} {why}; ratios use {ref}.)"]
    notes = [(name, r) for name, r in data["systems"].items() if r.get("status") != "ok"]
    if notes:
        lines += ["", "Not measured or incomplete:", ""]
        for name, r in notes:
            lines.append(f"- **{name}**: {r['status']}: {r.get('reason', '')}".rstrip())
    extra = [f"- {name}: {r['info']}" for name, r in data["systems"].items() if r.get("info")]
    if extra:
        lines += ["", "Settings:", ""] + extra
    if with_goals and data.get("goals"):
        lines += ["", "Goals (trisocks-forward, from the same run):", ""]
        lines += ["| goal | result | figures |", "|---|---|---|"]
        for g in data["goals"]:
            lines.append(f"| {g['goal']} | {g['status']} | {g['detail']} |")
    lines.append("")
    return "\n".join(lines)


def ratio_reference(figs: dict, order: list[str]) -> str | None:
    def has(name):
        return any(figs.get(name, {}).get(k) for k in ("down", "rps"))
    if has(REFERENCE):
        return REFERENCE
    return next((n for n in order if has(n)), None)


# ---- files ------------------------------------------------------------------------

def write_all(data: dict, out_dir: Path, stem: str, chart_python: Path | None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    paths["md"].write_text(markdown(data))
    shutil.copyfile(paths["md"], out_dir / "latest.md")
    written = {"json": paths["json"], "md": paths["md"]}
    if chart_python and chart_python.exists():
        proc = subprocess.run([str(chart_python), str(Path(__file__).resolve()), "chart",
                               str(paths["json"]), str(paths["png"])],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode == 0 and paths["png"].exists():
            shutil.copyfile(paths["png"], out_dir / "latest.png")
            written["png"] = paths["png"]
        else:
            written["chart_error"] = (proc.stderr or proc.stdout).strip()[-500:]
    else:
        written["chart_error"] = "matplotlib venv not available; no chart"
    return written


def chart(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    figs = data["figures"]
    ref = data.get("ratio_reference")
    n = data["config"]["streams"]
    titles = {k: t.format(n=n) for k, t, _, _ in COLUMNS}
    names = [s for s in data["systems_order"] if s in figs and s != ref]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [5, 4]})
    panels = [("higher is better", [k for k in CHART_KEYS if k in
                                    ("down", "up", "down_par", "up_par", "rps")]),
              ("lower is better", [k for k in CHART_KEYS if k in
                                   ("p99_ms", "rss_after_bulk_mb", "bytes_per_idle_channel",
                                    "cpu_s_per_gib", "cpu_ms_per_kreq")])]
    cmap = plt.get_cmap("tab10")
    for ax, (label, keys) in zip(axes, panels, strict=True):
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            vals = []
            for k in keys:
                a, b = figs[name].get(k), figs[ref].get(k) if ref else None
                vals.append(a / b if a is not None and b else 0.0)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, vals, width, label=name, color=cmap(i % 10))
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([titles[k] for k in keys], rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{label} (ratio to {ref}, log scale; 1 = {ref})")
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(names)), fontsize=9,
               frameon=False)
    cfg = data["config"]
    fig.suptitle(f"trisocks benchmark {data['machine']['date'][:10]} ({data['profile']}: "
                 f"{cfg['size'] / 2**20:.0f} MiB, {cfg['requests']} requests, median of "
                 f"{cfg['repeat']}): each system / {ref}; no bar = no figure")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "chart":
        chart(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
