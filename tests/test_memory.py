"""Memory at the floor (issue 12, target 6), torch backend on CPU.

For every attention op, the peak of live bytes during forward + backward (inputs included, the output
gradient excluded) must stay within 1.2x the bytes of q, k, v, o, dq, dk, dv: beyond its outputs and the
gradients it returns, an op may hold only O(chunk) working memory, never another (B, S, H, D) buffer
(e.g. float32 padded dK/dV accumulators). Measured with ``torch.profiler(profile_memory=True)``, whose
allocation events are summed in time order. The shape keeps a chunk's scores small next to S (the bound
is about per-token memory; chunk-sized buffers are a constant).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import longattn

B, S, H, D, W = 1, 2048, 2, 32, 16
BOUND = 1.2


def _peak_extra_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes while ``fn`` runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _calls(q, k, v):
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[:, S - 100 :] = False
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, [0, S // 2, S - 101]] = True
    qb, bm = longattn.tglobal_block_ids(pad, 16)
    G = S // 16
    sk, sv = (torch.randn(B, G, H, D, requires_grad=True) for _ in range(2))
    return {
        "local": (lambda: longattn.local_attention(q, k, v, W, key_padding_mask=pad, backend="torch"), ()),
        "longformer": (lambda: longattn.longformer_attention(q, k, v, W, glob, key_padding_mask=pad, max_globals=4,
                                                             backend="torch"), ()),
        "tglobal": (lambda: longattn.tglobal_attention(q, k, v, sk, sv, W, qb, key_padding_mask=pad, side_mask=bm,
                                                       backend="torch"), (sk, sv)),
    }


@pytest.mark.parametrize("name", ["local", "longformer", "tglobal"])
def test_forward_backward_peak_within_bound(name):
    q, k, v = (torch.randn(B, S, H, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D)
    call, extra_leaves = _calls(q, k, v)[name]
    tensor_bytes = q.numel() * q.element_size()

    def fwd_bwd():
        out = call()
        grads = torch.autograd.grad(out, [q, k, v, *extra_leaves], dout)
        del out, grads

    fwd_bwd()  # warm-up: one-time allocations (e.g. cached geometry) stay out of the measurement
    peak = 3 * tensor_bytes + _peak_extra_bytes(fwd_bwd)  # q, k, v live throughout
    budget = BOUND * 7 * tensor_bytes  # q, k, v, o, dq, dk, dv
    extra_side = sum(x.numel() * x.element_size() for x in extra_leaves) * 2  # side keys and their grads
    assert peak <= budget + extra_side, f"{name}: peak {peak / tensor_bytes:.2f}x one (B, S, H, D) tensor, " \
                                        f"budget {budget / tensor_bytes:.2f}x"
