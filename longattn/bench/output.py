"""What a run writes: the table on stdout, ``--json``, ``--csv`` and ``--plot``, and the run's metadata."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

CSV_FIELDS = ("op", "S", "impl", "kind", "pass", "status", "time_ms", "tflops", "peak_mem_bytes", "host_overhead_ms",
              "vs_best_baseline", "best_baseline", "vs_sdpa_rate", "mean_keys", "fwd_flops", "runs", "call_wall_ms",
              "gpu_ms", "host_overhead_reason", "check", "check_max_err", "attn_calls", "longattn_calls", "delegated",
              "reason")
HOST_OVERHEAD_DEFINITION = ("wall time of one call (GPU idle at its start, synchronised at its end) minus the GPU "
                            "time of one call run back to back (its launches queued behind a GPU sleep, timed with "
                            "CUDA events): what the call costs beyond its kernels")
PASS_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}


def git_commit() -> str | None:
    """``LONGATTN_GIT_COMMIT`` when set (the commit a GPU machine's copy of the tree was sent from: that copy's own
    ``.git``, when it has one, can be the session's stale one, seen 2026-11-30), else the checkout's commit (``+dirty``
    when files differ), else None."""
    explicit = os.environ.get("LONGATTN_GIT_COMMIT") or None
    if explicit:
        return explicit
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(settings: dict) -> dict:
    """Device, versions, git commit, timestamp and every setting of this run (the JSON's header)."""
    from ..info import info_dict

    info = info_dict()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info["device"],
        "device_type": "cuda" if torch.cuda.is_available() and settings.get("device", "cpu") != "cpu" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "versions": {key: info[key] for key in ("longattn", "python", "torch", "torch_cuda", "triton", "transformers")},
        "cuda_extension": info["cuda_extension"],
        "backends": info["backends"],
        "git_commit": git_commit(),
        "settings": settings,
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(records: list[dict], memory_note: str = "") -> str:
    """A readable table of the timed rows, then every implementation that did not run and why."""
    w = max([11, *(len(r["op"]) + 1 for r in records)])  # "model:modernbert" is wider than the ops' names
    head = (f"{'op':<{w}}{'S':>7}  {'implementation':<17}{'pass':<8}{'time ms':>10}{'TFLOP/s':>9}"
            f"{'peak MiB':>10}{'host µs':>9}{'vs best base':>13}{'vs SDPA rate':>13}  check")
    lines = [head, "-" * len(head)]
    host_reasons = {}
    for r in records:
        if r["status"] != "ok":
            continue
        mem, host = r.get("peak_mem_bytes"), r.get("host_overhead_ms")
        if r.get("host_overhead_reason"):
            host_reasons.setdefault(r["host_overhead_reason"], []).append(r["impl"])
        check = r.get("check", "")
        if "check_max_err" in r:
            check = f"{check} (max err {r['check_max_err']:.1e})"
        lines.append(
            f"{r['op']:<{w}}{r['S']:>7}  {r['impl']:<17}{r['pass']:<8}{r['time_ms']:>10.2f}"
            f"{_fmt(r.get('tflops'), '.3f', 'n/a'):>9}{_fmt(None if mem is None else mem / 2**20, '.1f', 'n/a'):>10}"
            f"{_fmt(None if host is None else host * 1e3, '.0f', 'n/a' if r.get('host_overhead_reason') else '-'):>9}"
            f"{_fmt(r.get('vs_best_baseline'), '.2f'):>12}x{_fmt(r.get('vs_sdpa_rate'), '.2f'):>12}x  {check}"
        )
    lines.append("")
    lines.append("vs best base = time of the fastest baseline computing the same function / this time (>1: faster);")
    lines.append("vs SDPA rate = this TFLOP/s / dense no-mask SDPA's TFLOP/s (useful FLOPs, real mean keys).")
    if memory_note:
        lines.append(memory_note)
    lines.append(f"host µs = host overhead: {HOST_OVERHEAD_DEFINITION}.")
    timed = sum(r["status"] == "ok" for r in records)
    for reason, impls in host_reasons.items():  # the implementations are named when only some lack the figure
        where = "" if len(impls) == timed else f" [{', '.join(dict.fromkeys(impls))}]"
        lines.append(f"host µs n/a: {reason}{where}")
    return "\n".join(lines + not_run_lines(records, w))


def not_run_lines(records: list[dict], width: int = 11, impl_width: int = 17) -> list[str]:
    """The "not run:" section: each (op, implementation, status, reason) that did not run, with where."""
    skipped: dict = {}
    for r in records:
        if r["status"] != "ok":
            skipped.setdefault((r["op"], r["impl"], r["status"], r.get("reason", "")), []).append(
                f"S={r['S']} {r['pass']}")
    if not skipped:
        return []
    lines = ["", "not run:"]
    for (op, impl, status, reason), where in skipped.items():
        lines.append(f"  {op:<{width}}{impl:<{impl_width}}{status}: {reason}  [{', '.join(where)}]")
    return lines


def write_json(path, info: dict, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**info, "results": records}, f, indent=1, default=str)
        f.write("\n")


def write_csv(path, records: list[dict], fields=CSV_FIELDS) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def write_plot(path, records: list[dict], title: str = "") -> None:
    """Time and TFLOP/s vs S (log-log), one line per implementation, one row of panels per op x pass."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    panels = sorted({(r["op"], r["pass"]) for r in ok}, key=lambda p: (p[0], list(PASS_TITLES).index(p[1])))
    # One colour per implementation across all panels, so a line is recognisable without its legend.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {impl: palette[i % len(palette)] for i, impl in enumerate(dict.fromkeys(r["impl"] for r in ok))}
    fig, axes = plt.subplots(max(1, len(panels)), 2, figsize=(11, 3.2 * max(1, len(panels))), squeeze=False)
    for row, (op, which) in enumerate(panels):
        sel = [r for r in ok if r["op"] == op and r["pass"] == which]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["S"], r["time_ms"], r.get("tflops")) for r in sel if r["impl"] == impl)
            style = dict(marker="s" if impl.startswith("longattn") else "o", color=colors[impl], label=impl)
            axes[row, 0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            if all(p[2] is not None for p in pts):
                axes[row, 1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
        for col, ylabel in enumerate(("time (ms)", "useful TFLOP/s")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op} {PASS_TITLES[which]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no timed results", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))  # room for the suptitle
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
