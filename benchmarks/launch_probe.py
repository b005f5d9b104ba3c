"""Host cost of one cached Triton launch by thread and by pointer count (issue 12, target 3), on the GPU that runs it.

    python benchmarks/launch_probe.py [--calls 300]

Why: on an H200 (2026-11-30) the Triton backwards cost 51 to 700 us per call more host time than twice this CPU's
emulation of their host path, while the Triton forwards cost exactly twice it
(``benchmarks/bench_triton_launchers.py``).
The backward differs in two ways: the autograd engine runs a CUDA tensor's backward on its device thread, and its
launches pass more pointers (22 to a band launch), each of which Triton's C launcher resolves with
``cuPointerGetAttribute``. This probe times the same cached launch (``triton_kernels._launch.cached``) of a kernel that
touches 16 floats, with 1 pointer and with 24, on the calling thread and inside an autograd backward (on a GPU: the
engine's device thread), and a plain torch op (``add_``) beside them for the threads' own cost. Four rows with one
differing column say which of the two it is.

Without a GPU the same plumbing runs with Triton's launch path emulated (``tests/triton_emulation.py``): a CI test;
no figure of such a run is a GPU figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longattn.triton_kernels._launch import cached  # noqa: E402

_BLOCK = 16


@triton.jit
def _one_pointer(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) + 1.0)


@triton.jit
def _many_pointers(X, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13, P14, P15, P16, P17, P18, P19, P20, P21,
                   P22, P23, BLOCK: tl.constexpr):
    """24 pointer arguments, as many as a band launch passes; only X is read and written."""
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) + 1.0)


def _launchers(x: torch.Tensor) -> dict:
    """name -> a callable making one launch (or one torch op) on ``x`` (16 float32)."""
    return {
        "launch, 1 pointer": lambda: cached(_one_pointer)[(1,)](x, BLOCK=_BLOCK),
        "launch, 24 pointers": lambda: cached(_many_pointers)[(1,)](x, *([x] * 23), BLOCK=_BLOCK),
        "torch add_": lambda: x.add_(1.0),
    }


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


class _InBackward(torch.autograd.Function):
    """Runs ``fn`` ``calls`` times inside its backward (timed there), so on a GPU on the autograd engine's device
    thread; ``result`` receives the microseconds per call."""

    @staticmethod
    def forward(ctx, t, fn, calls, result):
        ctx.fn, ctx.calls, ctx.result = fn, calls, result
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.result.append(_per_call_us(ctx.fn, ctx.calls))
        return grad, None, None, None


def probe(device: torch.device, calls: int = 300) -> list[str]:
    """One line per launch kind: microseconds per call on the calling thread and in an autograd backward."""
    x = torch.zeros(_BLOCK, device=device)
    lines = []
    for name, fn in _launchers(x).items():
        fn()  # the first launch compiles
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        main = _per_call_us(fn, calls)
        leaf = torch.zeros(1, device=device, requires_grad=True)
        inside: list[float] = []
        _InBackward.apply(leaf, fn, calls, inside).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lines.append(f"{name:<22} calling thread {main:8.2f} us   in autograd backward {inside[0]:8.2f} us")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch probe: needs a CUDA GPU (the CI test runs its plumbing with Triton's launch path emulated)")
        return 0
    print("\n".join(probe(torch.device("cuda"), args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
