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
- Host overhead (GPU only, ``measure_host_overhead``): what one call costs beyond its kernels, as a caller
  running it once sees it. (a) Wall time of one call on the host clock, the GPU idle at its start
  (synchronised before) and synchronised at its end. (b) GPU time of one call with its kernels back to
  back: a ``torch.cuda._sleep`` enqueued first (twice as long as the call took to return in (a)) keeps the
  GPU busy while the host launches the whole call, then CUDA events around the call time its kernels,
  copies and memsets with no launch gaps between them.
  Overhead = median (a) - median (b): validation, dispatch, launch latency, the GPU waiting between
  launches, and the final synchronisation's latency. A call that waits for the GPU (a host sync, a full
  launch queue) would let the GPU catch up during (b) and count launch gaps as GPU time: detected (the
  sleep had ended when the call returned), the sleep lengthened once, then the figure is left empty with
  the reason. Measured after the timing loop, on separate calls: the timed median is untouched. On CPU
  the host runs the kernels: no separate kernel time, the fields are empty and ``reason`` says so.
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


HOST_OVERHEAD_CPU_REASON = ("on CPU the host runs the kernels, so there is no separate kernel time "
                            "(benchmarks/bench_host_overhead.py measures the host path alone)")
HOST_OVERHEAD_SYNC_REASON = ("the call waits for the GPU (a host sync or a full launch queue), so its kernels "
                             "cannot be timed back to back")
HOST_CALLS = (1, 25)  # calls measured for (a) and for (b): at least, at most
SLEEP_COVER = 2.0  # (b)'s sleep lasts this many times the host's part of the call (the time until it returns in (a))
SLEEP_MIN_S = 50e-6
SLEEP_CALIBRATIONS = 3  # sleeps timed to find the sleep rate (the fastest counts)


@dataclass
class HostOverhead:
    """One call's wall time, its GPU time and their difference (see the module docstring); GPU only.

    ``wall_s``: median wall time of one isolated call; ``gpu_s``: median GPU time of one call with its kernels
    back to back; ``reason``: why a figure is missing."""

    wall_s: float | None = None
    gpu_s: float | None = None
    reason: str | None = None

    @property
    def overhead_s(self) -> float | None:
        """Wall minus GPU time (not clamped: a negative value would expose a measurement problem)."""
        return None if self.wall_s is None or self.gpu_s is None else self.wall_s - self.gpu_s

    def fields(self) -> dict:
        """The record fields (milliseconds, like ``time_ms``)."""
        ms = (lambda s: None if s is None else s * 1e3)
        out = {"call_wall_ms": ms(self.wall_s), "gpu_ms": ms(self.gpu_s), "host_overhead_ms": ms(self.overhead_s)}
        if self.reason:
            out["host_overhead_reason"] = self.reason
        return out


@dataclass
class Timing:
    median_s: float
    runs: int
    peak_mem_bytes: int | None = None
    host: HostOverhead | None = None

    def fields(self) -> dict:
        """The fields of a results record this timing fills."""
        out = {"time_ms": self.median_s * 1e3, "runs": self.runs, "peak_mem_bytes": self.peak_mem_bytes}
        return {**out, **self.host.fields()} if self.host is not None else out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, min_run_time: float = 0.2, warmup: int = 2,
              memory: bool = False, host_overhead: bool = False) -> Timing:
    """Median wall time of ``fn()`` (seconds) after ``warmup`` calls; with ``memory``, its peak memory too;
    with ``host_overhead``, ``host`` holds its host overhead (``measure_host_overhead`` on a GPU, measured after
    the timing loop; empty with the reason on CPU).

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
        timed = _time_cuda(fn, device, min_run_time, peak)
        if host_overhead:
            # About a tenth of the timing's budget: many isolated calls of a fast op, one of a slow one.
            timed.host = measure_host_overhead(fn, device, per_call_s=timed.median_s, budget_s=min_run_time / 10)
        return timed
    host = HostOverhead(reason=HOST_OVERHEAD_CPU_REASON) if host_overhead else None
    if warm_s >= min_run_time:
        return Timing(median_s=_time_block(fn, 1), runs=1, peak_mem_bytes=peak, host=host)
    # Calls per block: enough for a block to last ~CPU_BLOCK_S (perf_counter's resolution is far finer).
    number = max(1, int(CPU_BLOCK_S / max(warm_s, 1e-9)))
    times, deadline = [], time.perf_counter() + min_run_time
    while not times or time.perf_counter() < deadline:
        times.append(_time_block(fn, number))
    return Timing(median_s=statistics.median(times), runs=len(times) * number, peak_mem_bytes=peak, host=host)


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


def measure_host_overhead(fn, device: torch.device, *, per_call_s: float, budget_s: float) -> HostOverhead:
    """``fn``'s host overhead on a GPU (see the module docstring). ``per_call_s`` (the timed median) sizes the
    number of calls of (a) and (b) so they last about ``budget_s``. A failure here never costs the row its
    timing: the reason is recorded instead."""
    if device.type != "cuda":
        return HostOverhead(reason=HOST_OVERHEAD_CPU_REASON)
    try:
        return _measure_host_overhead(fn, device, per_call_s, budget_s)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return HostOverhead(reason=f"not measured ({type(exc).__name__}: {text[0] if text else ''})")


def _measure_host_overhead(fn, device, per_call_s: float, budget_s: float) -> HostOverhead:
    low, high = HOST_CALLS
    # One sample of (a) and one of (b) take at most about 4 calls' time: a call; a sleep (<= 2 calls) and a call.
    calls = int(min(high, max(low, budget_s / (4 * max(per_call_s, 1e-9)))))
    returned, walls = zip(*(_isolated_call(fn, device) for _ in range(calls)))
    wall, cover = statistics.median(walls), SLEEP_COVER * statistics.median(returned)
    gpu = []
    for _ in range(calls):
        t = _queued_gpu_time(fn, device, cover)
        if t is None:  # the GPU caught up with the host: once more behind a longer sleep
            t = _queued_gpu_time(fn, device, 4 * cover)
        if t is None:
            return HostOverhead(wall_s=wall, reason=HOST_OVERHEAD_SYNC_REASON)
        gpu.append(t)
    return HostOverhead(wall_s=wall, gpu_s=statistics.median(gpu))


def _isolated_call(fn, device) -> tuple[float, float]:
    """(a): one call started on an idle GPU: seconds until it returned (the host's part, which (b)'s sleep
    must outlast) and until it was synchronised (the wall time)."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    returned = time.perf_counter()
    torch.cuda.synchronize(device)
    return returned - start, time.perf_counter() - start


def _queued_gpu_time(fn, device, cover_s: float) -> float | None:
    """(b): GPU seconds of one call whose launches all queue behind a ``cover_s`` GPU sleep; None if the
    sleep had ended by the time the call returned (the GPU may have idled between its kernels)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(max(cover_s, SLEEP_MIN_S) * _sleep_cycles_per_s(device)))
    start.record()
    fn()
    end.record()
    queued = not start.query()  # the GPU was still asleep: every launch of the call was queued in time
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 if queued else None


_SLEEP_RATE: dict = {}


def _sleep_cycles_per_s(device) -> float:
    """``torch.cuda._sleep`` cycles per second on ``device`` (measured once per process): the fastest of a few
    sleeps, because anything else on the GPU (another process's kernels time-sliced in, as under pytest-xdist) only
    stretches a sleep's elapsed time, and an underestimated rate makes every later sleep too short to cover a call
    (seen on an H200, 2026-11-30: the host-overhead test failed with 4 test processes on the GPU)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SLEEP_RATE:
        cycles = 4_000_000  # about 2 ms at GPU clocks
        rates = []
        for _ in range(SLEEP_CALIBRATIONS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) / 1e3))
        _SLEEP_RATE[key] = max(rates)
    return _SLEEP_RATE[key]


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
