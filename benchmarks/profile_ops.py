"""Which kernels each op launches, how many and for how long (issue 12: targets 2 and 5 on a GPU).

    python benchmarks/profile_ops.py [--seqlen 16384] [--op local,longformer,tglobal,aggregate]
                                     [--backend triton,cuda] [--globals 1,64] [--window W] [--no-bias]
                                     [--json OUT]

For each op, backend and pass (``fwd``: the forward alone; ``bwd``: the backward of a saved forward), a few calls
run under ``torch.profiler`` after a warm-up, and each GPU activity (kernel, memset, memcpy) is listed with its
launches per call and its GPU microseconds per call. The inputs and the calls are ``longattn bench``'s (DESIGN.md's
standard shapes on a GPU: B=1, H=12, D=64, bf16), so the figures sit beside the bench's. Without a GPU the same
plumbing runs at a small CPU shape with the torch backend and lists the aten ops instead (nothing is launched):
that is how it is tested in CI, and no figure of such a run is a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longattn.bench import impls, output, timing  # noqa: E402
from longattn.bench.cases import (  # noqa: E402
    Settings,
    add_script_arguments,
    build_case,
    script_choices,
    script_settings,
)
from longattn.bench.runner import _pass_fn  # noqa: E402

CALLS = 3  # profiled calls per pass (after one warm-up): the per-call figures are their mean


def _activities(prof, on_gpu: bool) -> dict:
    """name -> (events, microseconds): the GPU activities when ``on_gpu``, else the outermost aten ops on the CPU."""
    out = {}
    for event in prof.events():
        if on_gpu:
            if event.device_type != DeviceType.CUDA:
                continue
        elif not event.name.startswith("aten::") or (event.cpu_parent is not None
                                                      and event.cpu_parent.name.startswith("aten::")):
            continue
        count, us = out.get(event.name, (0, 0.0))
        out[event.name] = (count + 1, us + event.time_range.elapsed_us())
    return out


def profile_pass(fn, on_gpu: bool) -> dict:
    """Per-call launches and microseconds of each device activity of ``fn`` (``CALLS`` calls, one warm-up)."""
    fn()
    timing.synchronize(torch.device("cuda" if on_gpu else "cpu"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with timing._quiet_native_stderr(), profile(activities=activities) as prof:
        for _ in range(CALLS):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    rows = [{"name": name, "per_call": count / CALLS, "us_per_call": us / CALLS}
            for name, (count, us) in _activities(prof, on_gpu).items()]
    rows.sort(key=lambda r: -r["us_per_call"])
    return {"launches_per_call": sum(r["per_call"] for r in rows),
            "us_per_call": sum(r["us_per_call"] for r in rows), "activities": rows}


def run(ops, backends, seqlen: int, globals_counts, settings: Settings) -> list[dict]:
    on_gpu = settings.device.startswith("cuda")
    results = []
    for op in ops:
        for G in (globals_counts if op == "longformer" else (settings.globals,)):
            case = build_case(op, seqlen, Settings(**{**settings.__dict__, "globals": G}))
            for backend in backends:
                base = {"op": op, "S": seqlen, "backend": backend, **({"globals": case.globals} if op == "longformer"
                                                                       else {})}
                try:
                    forward = impls.make(f"longattn:{backend}", case, grad=True)
                except impls.Unavailable as exc:
                    results.append({**base, "status": "unavailable", "reason": str(exc)})
                    continue
                for which in ("fwd", "bwd"):
                    rec = {**base, "pass": which}
                    try:
                        rec.update(status="ok", **profile_pass(_pass_fn(forward, case, which), on_gpu))
                    except Exception as exc:  # one failing row must not cost the others
                        rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[:1]}")
                    results.append(rec)
                    print(_line(rec), flush=True)
    return results


def _line(rec: dict) -> str:
    head = f"{rec['op']:<11}{rec.get('globals', ''):>4} {rec['backend']:<7}{rec['pass']:<5}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec.get('reason', '')}"
    top = ", ".join(f"{a['name'][:48]} x{a['per_call']:g} {a['us_per_call']:.0f}us" for a in rec["activities"][:4])
    return f"{head} {rec['launches_per_call']:>5g} launches {rec['us_per_call']:>9.1f} us  | {top}"


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_script_arguments(p, on_gpu, 16384, 256)
    p.add_argument("--globals", default="1,64", help="Longformer global-token counts (comma list)")
    p.add_argument("--json", help="write the run here")
    args = p.parse_args(argv)
    ops, backends = script_choices(p, args)
    settings = script_settings(on_gpu, args)
    counts = tuple(int(g) for g in args.globals.split(",") if g)
    results = run(ops, backends, args.seqlen, counts, settings)
    info = output.run_info({"mode": "profile-ops", "device": settings.device, "seqlens": [args.seqlen],
                            "ops": ops, "globals": list(counts), "window": settings.window, "bias": settings.bias,
                            "heads": settings.heads,
                            "head_dim": settings.head_dim, "dtype": str(settings.dtype), "calls": CALLS})
    run_json = {**info, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(run_json, indent=1, default=str) + "\n")
    return 0 if all(r["status"] != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
