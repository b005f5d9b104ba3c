"""Host cost of a Triton-backend call with its kernels stubbed out (issue 12, target 3: <= 40 us forward, <= 80 us
forward+backward per call).

``pytest benchmarks/bench_triton_launchers.py`` (pytest-benchmark records; nothing is asserted).

``bench_host_overhead.py`` times longattn's path down to the backend call, with a null backend. This file times the
whole Triton route on tiny CPU tensors: the public op, its custom ops, the Triton backend's launchers (grids, tile
plans, argument lists, the fused Longformer's roles) and their output allocations, with every ``@triton.jit``
kernel's launch replaced by a no-op (``JITFunction.__getitem__``), and the backend made available on CPU.

Routes: ``stub`` leaves Triton out; ``triton`` also runs what Triton's ``JITFunction.run`` does on the host before
its C launcher, for an sm_90 target (``tests/triton_emulation.py``: the generated binder, each argument's native
specialisation, the compile-cache key, the check of the globals the kernel reads); ``cached`` launches through
longattn's launch cache (``triton_kernels/_launch.py``), the route the backend takes. Only the C launcher (and the
driver) is left out, which needs a GPU: on one, ``longattn bench``'s host-overhead column is the complete figure.

Measured (this project's 2-core CPU, Triton 3.8, pytest-benchmark minimum, us, forward / forward+backward,
2026-12-01, after the bias-table sums moved to the dK/dV kernels and the narrow side tile; 2026-11-30's figures in
brackets where they differ by more than 5 us):

=================  ===================  ===================  ===================
op                 stub                 triton               cached
=================  ===================  ===================  ===================
local              25.8 / 136           66.6 / 278           37.4 / 183
tglobal            27.5 / 184 (172)     68.0 / 393 (378)     40.4 / 253 (237)
longformer         59.7 / 257           133 / 550            81.8 / 345
block_aggregate    17.1 / 72.6          35.5 / 129           25.0 / 96.8
=================  ===================  ===================  ===================

TGlobal's backward now plans the side pass's partial rows and launches the dK/dV kernels with the bias rows' pointers
(+12 to 16 us). Triton's binding is ~30 to 40 us per launch of a band kernel (97 to 121 parameters), more than all of
longattn's own host work; the cache leaves ~12. What is left above the ``stub`` column's floor is longattn's launchers
(argument lists of ~130 entries) and the autograd plumbing (``bench_host_overhead.py``).
"""

from __future__ import annotations

import pytest
import torch
import triton
from longattn.triton_kernels import _launch
from longattn.triton_kernels._common import interpreting as triton_interpreting

import longattn
from longattn.backends import triton_backend

B, S, H, D, W, BLOCK = 1, 32, 2, 16, 4, 8


def _inputs(requires_grad):
    def t(*shape):
        return torch.randn(*shape).requires_grad_(requires_grad)

    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, 0] = True
    return dict(q=t(B, S, H, D), k=t(B, S, H, D), v=t(B, S, H, D), sk=t(B, S // BLOCK, H, D),
                sv=t(B, S // BLOCK, H, D), rb=t(H, 2 * W + 1), sb=t(H, 2 * (S // BLOCK) + 1), x=t(B, S, 64),
                w=t(64), mask=torch.ones(B, S, dtype=torch.bool), glob=glob,
                qb=torch.zeros(B, S, dtype=torch.int32), bm=torch.ones(B, S // BLOCK, dtype=torch.bool))


CALLS = {
    "local": (lambda t: longattn.local_attention(t["q"], t["k"], t["v"], W, key_padding_mask=t["mask"],
                                                 backend="triton"), ("q", "k", "v")),
    "longformer": (lambda t: longattn.longformer_attention(t["q"], t["k"], t["v"], W, t["glob"],
                                                           key_padding_mask=t["mask"], max_globals=1,
                                                           backend="triton"), ("q", "k", "v")),
    "tglobal": (lambda t: longattn.tglobal_attention(t["q"], t["k"], t["v"], t["sk"], t["sv"], W, t["qb"],
                                                     key_padding_mask=t["mask"], side_mask=t["bm"], rel_bias=t["rb"],
                                                     side_bias=t["sb"], backend="triton"),
                ("q", "k", "v", "sk", "sv", "rb", "sb")),
    "block_aggregate": (lambda t: longattn.block_aggregate(t["x"], t["qb"], S // BLOCK, weight=t["w"],
                                                           backend="triton"), ("x", "w")),
}


@pytest.fixture(params=["stub", "triton", "cached"])
def stubbed_triton(request, monkeypatch):
    """The Triton backend on CPU with no-op kernel launches (``stub``), or with Triton's host-side launch path for an
    sm_90 target emulated up to its C launcher (``tests/triton_emulation.py``): through ``JITFunction.run`` on every
    call (``triton``), or through longattn's cached launches (``cached``, ``triton_kernels/_launch.py``)."""
    if request.param == "stub":
        monkeypatch.setattr(triton.runtime.jit.JITFunction, "__getitem__", lambda self, grid: lambda *a, **k: None)
        monkeypatch.setattr(_launch, "ENABLED", False)
        monkeypatch.setattr(triton_backend, "unavailable_reasons", lambda device: [])
        yield request.param
        return
    if triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1 replaces triton.jit: nothing to launch")
    try:
        from tests.triton_emulation import EmulatedTriton

        emulation = EmulatedTriton(record=False).install()
    except (ImportError, AttributeError) as exc:  # Triton internals of another version
        pytest.skip(f"Triton's launch internals differ from 3.6's and 3.8's: {exc}")
    monkeypatch.setattr(_launch, "ENABLED", request.param == "cached")
    yield request.param
    emulation.uninstall()


@pytest.mark.parametrize("which", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name", list(CALLS))
def test_triton_route(benchmark, stubbed_triton, name, which):
    call, leaves = CALLS[name]
    t = _inputs(which == "fwd_bwd")
    if which == "fwd":
        def run():
            with torch.no_grad():
                return call(t)
    else:
        def run():
            out = call(t)
            return torch.autograd.grad(out, [t[n] for n in leaves], torch.ones_like(out))
    run()  # warm caches outside the timing
    benchmark.group = f"triton-route-{stubbed_triton}-{which}"
    benchmark(run)
