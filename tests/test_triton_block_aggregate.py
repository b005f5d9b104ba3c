"""The Triton block aggregation's kernels (issue 12, target 2): correct for any id layout, deterministic, and the
only device work of its forward and backward.

Calls the backend functions directly (``longattn.backends.triton_backend.block_aggregate_forward/backward``), so
ids the public API would never pass (out of range) reach the kernels too. Runs on a CUDA GPU, or on CPU under
``TRITON_INTERPRET=1`` (tiny tiles there, so these small rows cross several scan steps, id tiles and ranking
steps of ``_order_kernel``).
"""

from __future__ import annotations

import pytest
import torch

from longattn.backends import torch_backend
from longattn.backends import triton_backend as tb
from tests import reference
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.conftest import DeviceWork, needs_triton
from tests.tolerance import assert_within_rule

pytestmark = needs_triton
EPS = 1e-6


def _ids(layout, B, S, G, gen):
    """int32 (B, S) block ids of one layout; dropped tokens are -1 or any id outside [0, G)."""
    if layout == "unsorted":  # -1 anywhere
        ids = torch.randint(-1, G, (B, S), generator=gen)
    elif layout == "out-of-range":  # unsorted, and below -1 and >= G as well as -1: all dropped
        ids = torch.randint(-3, G + 3, (B, S), generator=gen)
    elif layout == "empty-blocks":  # only even ids, reversed sequence order: odd blocks get no token
        ids = (2 * torch.randint(0, (G + 1) // 2, (B, S), generator=gen)).sort(dim=1, descending=True).values
        ids[:, ::5] = -1
    elif layout == "longt5":  # sorted runs, padding (-1) at the end of row 1
        ids = (torch.arange(S) * G // S).expand(B, S).clone()
        ids[1, 2 * S // 3 :] = -1
    else:  # "one-block": every token in block 0
        ids = torch.zeros(B, S, dtype=torch.long)
    return ids.to(torch.int32).to(DEVICE).contiguous()


def _case(layout, B=2, S=37, C=24, G=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=gen, dtype=torch.float64)
    weight = 1.0 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, G, C, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), _ids(layout, B, S, G, gen), weight.to(DEVICE), dout.to(DEVICE)


def _run(backend, x, ids, G, weight, dout):
    """-> (out, dx, dweight) of ``backend``'s forward and backward."""
    out, sums, rstd = backend.block_aggregate_forward(x, ids, G, weight, EPS)
    dx, dweight = backend.block_aggregate_backward(dout, x, ids, G, weight, sums, rstd, EPS)
    return out, dx, dweight


# unsorted with -1 anywhere and ids outside [-1, G); no token in odd blocks; no block at all.
LAYOUTS = [("out-of-range", 7), ("empty-blocks", 9), ("unsorted", 0)]


@pytest.mark.parametrize("weighted", [False, True], ids=["sums", "rmsnorm"])
@pytest.mark.parametrize("layout,G", LAYOUTS, ids=[f"{n}-G{g}" for n, g in LAYOUTS])
def test_matches_oracle(layout, G, weighted):
    """Forward, dx and dweight in float32 within the rule of the fp64 oracle (torch backend as the baseline)."""
    x, ids, weight, dout = _case(layout, G=G)
    w = weight if weighted else None
    leaves = [x.requires_grad_(True)] + ([weight.requires_grad_(True)] if weighted else [])
    ref = reference.block_aggregate(x, ids, G, weight=w, eps=EPS)
    ref_grads = torch.autograd.grad(ref, leaves, dout, allow_unused=True)
    f32 = [t.detach().float() for t in (x, weight, dout)]
    args = (f32[0], ids, G, f32[1] if weighted else None, f32[2])
    got, base = _run(tb, *args), _run(torch_backend, *args)
    assert got[0].shape == (2, G, 24) and got[0].dtype == torch.float32
    assert_within_rule("out", got[0], base[0], ref)
    assert_within_rule("dx", got[1], base[1], ref_grads[0], grad=True)
    if weighted:
        assert got[2].shape == (24,) and got[2].dtype == torch.float32
        dweight_ref = ref_grads[1] if ref_grads[1] is not None else torch.zeros_like(weight)  # G = 0: no block
        assert_within_rule("dweight", got[2], base[2], dweight_ref, grad=True)
    else:
        assert got[2].numel() == 0
    dropped = (ids < 0) | (ids >= G)
    assert torch.equal(got[1][dropped], torch.zeros_like(got[1][dropped]))


def test_half_inputs_keep_their_dtypes():
    """fp16 x with an fp32 weight: out and dx in fp16, dweight in fp32 (each in its input's dtype)."""
    x, ids, weight, dout = _case("unsorted", S=20, C=16, G=4)
    out, dx, dweight = _run(tb, x.half(), ids, 4, weight.float(), dout.half())
    assert (out.dtype, dx.dtype, dweight.dtype) == (torch.float16, torch.float16, torch.float32)


@pytest.mark.parametrize("layout", ["unsorted", "out-of-range", "empty-blocks", "longt5", "one-block"])
def test_order_is_the_stable_sort(layout):
    """``_order_kernel``'s bounds and orders are those of a stable argsort of the ids (dropped last) and a
    searchsorted, which the kernel replaced: so the sums, added in that order, are bitwise unchanged."""
    B, S, G = 2, 45, 9
    ids = _ids(layout, B, S, G, torch.Generator().manual_seed(3))
    key = torch.where((ids >= 0) & (ids < G), ids.long(), G)
    order = torch.argsort(key, dim=1, stable=True)
    bounds = torch.searchsorted(torch.gather(key, 1, order), torch.arange(G + 1, device=DEVICE).expand(B, G + 1)
                                .contiguous())
    from longattn.triton_kernels import block_aggregate

    got_order, got_bounds = block_aggregate._order(ids, G, ids.device)
    assert got_bounds.dtype == torch.int32 and torch.equal(got_bounds.long(), bounds)
    for b in range(B):  # slots past bounds[b, G] (the dropped tokens) are never read
        kept = int(bounds[b, G])
        assert torch.equal(got_order[b, :kept].long(), order[b, :kept])


def test_deterministic():
    x, ids, weight, dout = _case("unsorted", S=24, C=20, G=6, seed=1)
    args = (x.float(), ids, 6, weight.float(), dout.float())
    for a, b in zip(_run(tb, *args), _run(tb, *args)):
        assert torch.equal(a, b)


def _count_device_work(fn, launches):
    """-> (torch glue ops, kernels launched) while ``fn()`` runs (``launches``: the ``triton_launches`` fixture)."""
    launches.clear()
    with DeviceWork() as log:
        fn()
    return log.glue, list(launches)


@pytest.mark.parametrize("weighted", [False, True], ids=["sums", "rmsnorm"])
def test_only_kernels_do_device_work(weighted, triton_launches):
    """Forward: 2 launches, backward: at most 3, and no torch op but allocations around them (issue 12)."""
    x, ids, weight, dout = _case("unsorted", S=24, C=16, G=5)
    x, weight, dout = x.float(), weight.float() if weighted else None, dout.float()
    saved = {}

    def forward():
        saved["fwd"] = tb.block_aggregate_forward(x, ids, 5, weight, EPS)

    ops, launches = _count_device_work(forward, triton_launches)
    assert ops == [] and 1 <= len(launches) <= 2, (ops, launches)
    _, sums, rstd = saved["fwd"]
    ops, launches = _count_device_work(lambda: tb.block_aggregate_backward(dout, x, ids, 5, weight, sums, rstd, EPS),
                                       triton_launches)
    assert ops == [] and 1 <= len(launches) <= 3, (ops, launches)
