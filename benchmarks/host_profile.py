"""Where a call's host time goes (issue 12, target 3), by Python's profiler, on the machine that runs the kernels.

    python benchmarks/host_profile.py [--seqlen 512] [--op local,longformer,tglobal,aggregate]
                                      [--backend triton,cuda] [--calls 200] [--top 25] [--out host-profile.txt]

For each op, backend and pass (``fwd``, ``fwdbwd``), ``--calls`` calls at a tiny length (their kernels take
microseconds, so the host is the bottleneck) run under ``cProfile`` after a warm-up, with one device
synchronisation at the end; the report lists the host microseconds per call and the ``--top`` functions by their
own time. Why: on an H200 (2026-11-30) Triton calls cost 5-6x the host time that ``bench_triton_launchers.py``'s
emulation of Triton's host steps measures on a CPU machine, and only a profile taken there says where it goes.
Without a GPU the same plumbing runs the torch backend (a CI test); no figure of such a run is a GPU figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longattn.bench import impls, timing  # noqa: E402
from longattn.bench.cases import (  # noqa: E402
    Settings,
    add_script_arguments,
    build_case,
    script_choices,
    script_settings,
)
from longattn.bench.runner import _pass_fn  # noqa: E402


def profile_calls(fn, calls: int, device: torch.device, top: int) -> tuple[float, str]:
    """(host microseconds per call, the profile's ``top`` functions by own time) of ``calls`` calls of ``fn``."""
    fn()
    timing.synchronize(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    per_call_us = (time.perf_counter() - start) / calls * 1e6  # before the sync: the host's time alone
    timing.synchronize(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return per_call_us, text.getvalue()


def run(ops, backends, seqlen: int, calls: int, top: int, settings: Settings) -> str:
    device = torch.device(settings.device)
    sections, summary = [], []
    for op in ops:
        case = build_case(op, seqlen, settings)
        for backend in backends:
            try:
                forward = impls.make(f"longattn:{backend}", case, grad=True)
            except impls.Unavailable as exc:
                summary.append(f"{op:<11}{backend:<7} unavailable: {exc}")
                continue
            for which in ("fwd", "fwdbwd"):
                n = calls if which == "fwd" else max(1, calls // 2)
                try:
                    us, text = profile_calls(_pass_fn(forward, case, which), n, device, top)
                except Exception as exc:  # one failing row must not cost the others
                    summary.append(f"{op:<11}{backend:<7}{which:<7} error: {type(exc).__name__}: {exc}")
                    continue
                summary.append(f"{op:<11}{backend:<7}{which:<7}{us:9.1f} us per call (profiled, {n} calls)")
                sections.append(f"==== {op} {backend} {which}: {us:.1f} us per call under cProfile ====\n{text}")
    head = (f"host profile: S={seqlen}, B={settings.batch}, H={settings.heads}, D={settings.head_dim}, "
            f"{settings.dtype}, device {settings.device}; times include cProfile's own overhead (compare rows, not "
            "absolute figures)\n")
    return head + "\n".join(summary) + "\n\n" + "\n".join(sections)


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_script_arguments(p, on_gpu, 512, 64)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="write the report here (it is printed too)")
    args = p.parse_args(argv)
    ops, backends = script_choices(p, args)
    if args.calls < 1 or args.top < 1:
        p.error("--calls and --top: positive integers")
    settings = script_settings(on_gpu)
    report = run(ops, backends, args.seqlen, args.calls, args.top, settings)
    print(report.split("\n\n", 1)[0])
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
