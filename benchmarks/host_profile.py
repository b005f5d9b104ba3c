"""Where a call's host time goes (issue 12, target 3), by Python's profiler, on the machine that runs the kernels.

    python benchmarks/host_profile.py [--seqlen 512] [--op local,longformer,tglobal,aggregate]
                                      [--backend triton,cuda] [--calls 200] [--top 25] [--out host-profile.txt]

For each op, backend and pass (``fwd``, ``fwdbwd``), ``--calls`` calls at a tiny length (their kernels take
microseconds, so the host is the bottleneck) run under ``cProfile`` after a warm-up, with one device
synchronisation at the end; the report lists the host microseconds per call and the ``--top`` functions by their
own time. Why: on an H200 (2026-11-30) Triton calls cost 5-6x the host time that ``bench_triton_launchers.py``'s
emulation of Triton's host steps measures on a CPU machine, and only a profile taken there says where it goes.
Without a GPU the same plumbing runs the torch backend (a CI test); no figure of such a run is a GPU figure.

Each row also has a per-call breakdown (``Breakdown``, timed without the profiler, after it): the host microseconds
spent in longattn's op implementations on the calling thread and on other threads, in the Triton launches (longattn's
launch cache) and the rest (autograd, the public API, torch's dispatch), and how often per call the launch cache
missed (``first``: a key's first launch, through Triton's ``JITFunction.run``) or Triton's own launch path ran
(``jit.run``). The other-thread column matters on a GPU: the autograd engine runs a CUDA tensor's backward on its
device thread, which a ``cProfile.Profile`` enabled in the calling thread does not see before Python 3.12; here every
op implementation that runs off the calling thread is also profiled by a profiler of its own thread (from 3.12
cProfile is process-wide and that profiler is not needed: its enable fails and is skipped).

On a GPU with the Triton backend the summary ends with ``benchmarks/launch_probe.py``'s lines: one cached launch
timed on the calling thread and inside an autograd backward, with 1 and 24 pointers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
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


class Breakdown:
    """Host time of a run of calls split by where it is spent, across threads (module docstring).

    ``install()`` wraps ``longattn._ops._call`` (every op implementation a public op runs, forward and backward),
    ``CachedLaunch.launch`` / ``_first_launch`` (``triton_kernels._launch``) and Triton's ``JITFunction.run``;
    ``uninstall()`` restores them. The wrappers add ~1 us per wrapped call, part of the figures."""

    def __init__(self, profile_other_threads: bool = False):
        self.main = threading.get_ident()
        self.profile_other_threads = profile_other_threads
        self.profilers: dict[int, cProfile.Profile] = {}  # thread id -> its profiler (threads other than main)
        self.depth: dict[int, int] = {}  # nested op calls on a thread count once
        self.reset()
        self._restore = []

    def reset(self):
        self.seconds = {"ops_main": 0.0, "ops_other": 0.0, "launch": 0.0}
        self.counts = {"launch": 0, "first": 0, "jit.run": 0}

    def _op_call(self, call):
        def timed(op, *args):
            thread = threading.get_ident()
            depth = self.depth.get(thread, 0)
            if depth:
                return call(op, *args)
            profiler = None
            if thread != self.main and self.profile_other_threads:
                profiler = self.profilers.setdefault(thread, cProfile.Profile())
                try:
                    profiler.enable()
                except ValueError:  # Python >= 3.12: the calling thread's profiler already sees every thread
                    profiler = None
            self.depth[thread] = 1
            start = time.perf_counter()
            try:
                return call(op, *args)
            finally:
                self.seconds["ops_main" if thread == self.main else "ops_other"] += time.perf_counter() - start
                self.depth[thread] = 0
                if profiler is not None:
                    profiler.disable()

        return timed

    def _timed(self, fn, seconds: str | None, count: str):
        def wrapper(*args, **kwargs):
            self.counts[count] += 1
            if seconds is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[seconds] += time.perf_counter() - start

        return wrapper

    def _patch(self, owner, name, replacement):
        self._restore.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def install(self) -> Breakdown:
        from longattn import _ops

        self._patch(_ops, "_call", self._op_call(_ops._call))
        try:
            from longattn.triton_kernels import _launch
            from triton.runtime.jit import JITFunction
        except ImportError:  # no Triton: nothing of it to count
            return self
        self._patch(_launch.CachedLaunch, "launch", self._timed(_launch.CachedLaunch.launch, "launch", "launch"))
        self._patch(_launch.CachedLaunch, "_first_launch", self._timed(_launch.CachedLaunch._first_launch, None,
                                                                       "first"))
        self._patch(JITFunction, "run", self._timed(JITFunction.run, None, "jit.run"))
        return self

    def uninstall(self):
        while self._restore:
            owner, name, original = self._restore.pop()
            setattr(owner, name, original)

    def line(self, calls: int, wall_seconds: float) -> str:
        """The per-call figures of ``calls`` calls that took ``wall_seconds`` on the calling thread."""
        us = {k: v / calls * 1e6 for k, v in self.seconds.items()}
        rest = wall_seconds / calls * 1e6 - us["ops_main"]
        per = {k: v / calls for k, v in self.counts.items()}
        return (f"ops {us['ops_main']:.1f} us (other threads {us['ops_other']:.1f}), of which Triton launches "
                f"{us['launch']:.1f} us ({per['launch']:.2g} a call, missed {per['first']:.2g}, jit.run "
                f"{per['jit.run']:.2g}); outside the ops on the calling thread {rest:.1f} us")


def profile_calls(fn, calls: int, device: torch.device, top: int) -> tuple[float, str, str]:
    """(host microseconds per call, the profile's ``top`` functions by own time, the ``Breakdown`` line) of
    ``calls`` calls of ``fn``: profiled, then timed again with the breakdown's wrappers alone."""
    fn()
    timing.synchronize(device)
    breakdown = Breakdown(profile_other_threads=True).install()
    try:
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        per_call_us = (time.perf_counter() - start) / calls * 1e6  # before the sync: the host's time alone
        timing.synchronize(device)
        stats = pstats.Stats(profiler, stream=(text := io.StringIO()))
        for other in breakdown.profilers.values():
            if other.getstats():
                stats.add(other)
        breakdown.profile_other_threads = False
        breakdown.reset()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        line = breakdown.line(calls, time.perf_counter() - start)
        timing.synchronize(device)
    finally:
        breakdown.uninstall()
    stats.sort_stats("tottime").print_stats(top)
    return per_call_us, text.getvalue(), line


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
                    us, text, line = profile_calls(_pass_fn(forward, case, which), n, device, top)
                except Exception as exc:  # one failing row must not cost the others
                    summary.append(f"{op:<11}{backend:<7}{which:<7} error: {type(exc).__name__}: {exc}")
                    continue
                summary.append(f"{op:<11}{backend:<7}{which:<7}{us:9.1f} us per call (profiled, {n} calls)\n"
                               f"{'':25}{line}")
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
    settings = script_settings(on_gpu, args)
    report = run(ops, backends, args.seqlen, args.calls, args.top, settings)
    if on_gpu and "triton" in backends:  # the same launch by thread and pointer count (benchmarks/launch_probe.py)
        from benchmarks.launch_probe import probe

        summary, sections = report.split("\n\n", 1)
        report = "\n".join([summary, "launch probe (one cached launch, us per call):",
                             *probe(torch.device(settings.device))]) + "\n\n" + sections
    print(report.split("\n\n", 1)[0])
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
