"""pytest-benchmark suite for longattn's ops (``pytest benchmarks/bench_ops.py``).

- ``test_cpu_*``: small CPU shapes, torch backend, forward and forward+backward of every op (CI: well
  under a minute; no timing is asserted, pytest-benchmark only records).
- ``test_gpu_*`` (marker ``gpu``): DESIGN.md section 5's standard shapes (B=1, H=12, D=64,
  S in {4096, 16384, 65536}, bf16) for every backend; skipped with the reason without a GPU, and a backend
  that cannot run is skipped with its own reason. GPU calls are synchronised inside the timed function.

The inputs and calls are the ones ``longattn bench`` times (``longattn.bench.cases`` / ``impls``).
"""

from __future__ import annotations

import pytest
import torch

from longattn.bench import impls
from longattn.bench.cases import OPS, Settings, build_case, leaves

CPU_SHAPE = Settings(batch=1, heads=2, head_dim=32, window=32, globals=1, block_size=16)
CPU_SEQLEN = 256
GPU_SEQLENS = (4096, 16384, 65536)


def _fn(op, S, settings, backend, which):
    case = build_case(op, S, settings)
    try:
        forward = impls.make(f"longattn:{backend}", case, grad=which != "fwd")
    except impls.Unavailable as exc:
        pytest.skip(f"backend {backend}: {exc}")
    if which == "fwd":
        inputs = leaves(case, requires_grad=False)

        def run():
            with torch.no_grad():
                return forward(inputs)
    else:
        inputs = leaves(case, requires_grad=True)
        wrt = [inputs[n] for n in case.grad_names]

        def run():
            out = forward(inputs)
            return torch.autograd.grad(out, wrt, torch.ones_like(out))
    if case.device.type != "cuda":
        return run

    def synced():
        result = run()
        torch.cuda.synchronize()
        return result

    return synced


@pytest.mark.parametrize("which", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", OPS)
def test_cpu_ops(benchmark, op, which):
    benchmark.group = f"cpu {op} S={CPU_SEQLEN}"
    fn = _fn(op, CPU_SEQLEN, CPU_SHAPE, "torch", which)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("S", GPU_SEQLENS)
@pytest.mark.parametrize("op", OPS)
def test_gpu_standard_shapes(benchmark, op, S, backend, which):
    if not torch.cuda.is_available():  # asked here, at run time, never at import
        pytest.skip("no CUDA GPU visible")
    settings = Settings(batch=1, heads=12, head_dim=64, window=None, globals=1, block_size=16,
                        dtype=torch.bfloat16, device="cuda")
    benchmark.group = f"gpu {op} S={S} {which}"
    fn = _fn(op, S, settings, backend, which)
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=3)
