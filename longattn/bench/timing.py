"""Timing and peak memory of one callable, on GPU (CUDA events) or CPU (``time.perf_counter`` blocks).

- GPU: warm-up calls, then each call timed with its own pair of CUDA events; the median is reported.
- CPU: one warm-up call (compiles, caches), then blocks of calls timed with ``time.perf_counter`` (each
  block long enough for the clock's resolution not to matter) until ``min_run_time`` has passed; the
  median per-call time of the blocks is reported, with every intra-op thread torch has. (Not
  ``torch.utils.benchmark``: importing it imports ``torch.utils.cpp_extension``, which logs "No CUDA runtime
  is found, using CUDA_HOME=..." on a machine without a GPU; the bench prints no such noise.)
- Peak memory is the peak of bytes allocated *during* the call above what was allocated before it (the
  inputs and anything saved from an earlier forward are not counted). GPU: ``max_memory_allocated``.
  CPU: the torch profiler's record of every CPU-allocator allocation and free during one extra call,
  summed in time order (allocations made outside torch's allocator, e.g. by oneDNN scratch pads, are
  not seen).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

# Kineto prints start/stop banners on every profile (its log level is read before we could set it).
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
CPU_BLOCK_S = 0.01  # a CPU timing block lasts about this long (many calls of a fast function, one of a slow)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send file descriptor 2 to /dev/null for the profiler's lifetime (its banners are C++ prints);
    Python exceptions still propagate normally."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class Timing:
    median_s: float
    runs: int
    peak_mem_bytes: int | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, min_run_time: float = 0.2, warmup: int = 2,
              memory: bool = False) -> Timing:
    """Median wall time of ``fn()`` (seconds) after ``warmup`` calls; with ``memory``, its peak memory too.

    The memory call comes after the warm-up (so compilation and first-call caches are not counted) and
    doubles as one more warm-up. On CPU, a call slower than ``min_run_time`` is timed once more on its own
    (``runs`` = 1 in the result) rather than in ``blocked_autorange``'s calibration loop, which would run it
    at least twice: the default sweep must stay under 2 minutes on 2 cores.
    """
    device = torch.device(device)
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    synchronize(device)
    warm_s = (time.perf_counter() - start) / max(1, warmup)
    peak = peak_memory(fn, device) if memory else None
    if device.type == "cuda":
        return _time_cuda(fn, device, min_run_time, peak)
    if warm_s >= min_run_time:
        return Timing(median_s=_time_block(fn, 1), runs=1, peak_mem_bytes=peak)
    # Calls per block: enough for a block to last ~CPU_BLOCK_S (perf_counter's resolution is far finer).
    number = max(1, int(CPU_BLOCK_S / max(warm_s, 1e-9)))
    times, deadline = [], time.perf_counter() + min_run_time
    while not times or time.perf_counter() < deadline:
        times.append(_time_block(fn, number))
    return Timing(median_s=statistics.median(times), runs=len(times) * number, peak_mem_bytes=peak)


def _time_block(fn, number: int) -> float:
    """Seconds per call of ``number`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _time_cuda(fn, device, min_run_time: float, peak) -> Timing:
    # One timed call sizes the loop so it lasts about min_run_time, between 5 and 200 calls.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    first = start.elapsed_time(end) / 1e3
    runs = int(min(200, max(5, min_run_time / max(first, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return Timing(median_s=statistics.median(s.elapsed_time(e) for s, e in events) / 1e3, runs=runs,
                  peak_mem_bytes=peak)


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn()`` above those allocated before it; None if it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        return _cpu_peak_memory(fn)
    return None


def _cpu_peak_memory(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a profiler that cannot record memory: say n/a rather than guess
        return None
    cpu = torch._C._autograd.DeviceType.CPU
    current = peak = 0
    for event in sorted(records, key=lambda e: e.start_ns()):
        if event.device_type() == cpu:
            current += event.nbytes()
            peak = max(peak, current)
    return peak
