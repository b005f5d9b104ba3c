"""Host cost of a Triton-backend call with its kernels stubbed out (issue 12, target 3: <= 40 us forward, <= 80 us
forward+backward per call).

``pytest benchmarks/bench_triton_launchers.py`` (pytest-benchmark records; nothing is asserted).

``bench_host_overhead.py`` times longattn's path down to the backend call, with a null backend. This file times the
whole Triton route on tiny CPU tensors: the public op, its custom ops, the Triton backend's launchers (grids, tile
plans, argument lists, the fused Longformer's roles) and their output allocations, with every ``@triton.jit``
kernel's launch replaced by a no-op (``JITFunction.__getitem__``), and the backend made available on CPU.

``launch``: ``stub`` leaves Triton out; ``bind`` also runs what Triton's ``JITFunction.run`` does on the host before
its C launcher, for an sm_90 target: the generated binder (each argument's specialisation), the compile-cache key and
the check of the globals the kernel reads. Only the C launcher (and the driver) is left out, which needs a GPU: on
one, ``longattn bench``'s host-overhead column is the complete figure.

Measured (this project's 2-core CPU, pytest-benchmark minimum, us, forward / forward+backward, 2026-11-30):

=================  ==============  ==============  ======================================
op                 stub            bind            bind, kernels reading no constexpr global
=================  ==============  ==============  ======================================
local              24.6 / 128      59.0 / 251      57.4 / 240
tglobal            26.3 / 169      61.3 / 344      58.9 / 329
longformer         58.5 / 251      118 / 488       115 / 471
block_aggregate    15.9 / 70.7     27.4 / 109      28.1 / 108
=================  ==============  ==============  ======================================

Triton's binding is ~30 us per launch of a band kernel (97 to 121 parameters: a native specialisation call each,
and the bound-argument dict and list), more than all of longattn's own host work. The last column is after
``LOG2E`` and the dropout ``FLAG`` became literals (Triton compares every ``tl.constexpr`` global a kernel reads with
its compiled value at each launch, ~0.5 us each; ``bias_grad.SIDE_SPAN`` is the one left).
"""

from __future__ import annotations

import pytest
import torch
import triton

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


def _binding_launch():
    """``JITFunction.__getitem__`` replaced by Triton's host-side launch steps (``JITFunction.run`` up to its C
    launcher) for an sm_90 target, on CPU tensors: binder, cache key, used-globals check; no compile, no launch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            if self not in binders:
                self.cache_key  # noqa: B018 (as a first compile would: records the globals the kernel reads)
                binders[self] = {}, jit.create_function_from_signature(self.signature, self.params, backend)
            key_cache, binder = binders[self]
            bound_args, specialization, options = binder(*args, **kwargs)
            jit.compute_cache_key(key_cache, specialization, options)
            absent = object()
            for (name, _), (val, globals_dict) in self.used_global_vals.items():
                if globals_dict.get(name, absent) != val:
                    raise RuntimeError(f"global {name} changed")
            return tuple(bound_args.values())

        return launch

    return getitem


@pytest.fixture(params=["stub", "bind"])
def stubbed_triton(request, monkeypatch):
    """The Triton backend on CPU with no-op kernel launches (``stub``), or with Triton's binding steps (``bind``)."""
    if request.param == "stub":
        getitem = lambda self, grid: lambda *a, **k: None  # noqa: E731
    else:
        try:
            getitem = _binding_launch()
        except (ImportError, AttributeError) as exc:  # Triton internals of another version
            pytest.skip(f"Triton's launch internals differ from 3.8's: {exc}")
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "__getitem__", getitem)
    monkeypatch.setattr(triton_backend, "unavailable_reasons", lambda device: [])
    return request.param


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
