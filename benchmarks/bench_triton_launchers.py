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

Measured (this project's 2-core CPU, Triton 3.8, pytest-benchmark minimum of two runs, us, forward /
forward+backward, 2026-12-01 at 9b71f5f..a7c62c9's tree, the machine otherwise idle):

=================  ===================  ===================  ===================
op                 stub                 triton               cached
=================  ===================  ===================  ===================
local              22.1 / 107           61.9 / 229           35.7 / 145
tglobal            25.5 / 140           66.0 / 327           39.3 / 198
longformer         59.0 / 196           127 / 455            80.1 / 271
block_aggregate    13.1 / 58.4          30.4 / 107           20.8 / 82.4
=================  ===================  ===================  ===================

The same day's figures of the tree before that work (5723a06), alternated with these, were within 0.5 to 3.6 us of them
(Longformer's stub forward+backward 7.5 us more): the launch cache's repeated-tensor key (``_launch``), the tile
choices in one lookup (``_common.launch_tiles``) and the global rows' cached plan save about that much here. The
earlier table (26-183 us for local) was measured on a loaded machine. Triton's binding is ~30 to 40 us per launch of
a band kernel (97 to 121 parameters), more than all of longattn's own host work; the cache leaves ~9 to 12. What is
left above the ``stub`` column's floor is longattn's launchers (argument lists of ~130 entries) and the autograd
plumbing (``bench_host_overhead.py``). Not in any column: on a GPU Triton keeps empty launch-hook chains that its
launcher calls at every launch, with launch metadata built for them; the cached route skips them (``_launch._live``).
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
