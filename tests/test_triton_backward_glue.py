"""Issue 12, target 2: the Triton band + side backward launches only its own kernels, at most four, and no torch op.

Each case runs the backend's forward, then its backward under ``tests.conftest.DeviceWork`` (every aten op that is
not a view or an allocation), while the ``triton_launches`` fixture counts the Triton launches. Patterns: local
attention with a band bias, LongT5's TGlobal (side keys, side mask, query blocks, both bias tables), Longformer's
band pass (side keys read through ``side_index``), a halo, an lse gradient, dropout. CPU only, under
``TRITON_INTERPRET=1``; tiny shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import DeviceWork

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts launches through Triton's CPU interpreter (TRITON_INTERPRET=1)")

B, S, H, D, G = 2, 20, 2, 16, 3  # S not a multiple of the interpreter's 16-row tiles
LEFT, RIGHT, SCALE = 3, 5, 0.3


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _band_case(*, side=False, bias=False, side_table=False, halo=False, dlse=False, dropout=0.0):
    """The backward of ``triton_backend.band_side_*`` on tiny inputs (its forward run), as a closure.
    ``side_table``: a side-bias table (H, 2G + 1) even without side keys (G = 0: its gradient is zeros)."""
    from longattn.backends import triton_backend as tb

    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(g, B, S, H, D) for _ in range(3))
    n_side = G if side else 0
    side_k, side_v = _randn(g, B, n_side, H, D), _randn(g, B, n_side, H, D)
    key_mask = torch.rand(B, S, generator=g) > 0.2
    side_mask = torch.rand(B, n_side, generator=g) > 0.3 if side else None
    query_block = (torch.arange(S) // 8).repeat(B, 1).to(torch.int32) if side or side_table else None
    if side:
        query_block[1, 15:] = -1  # padding rows
    band_bias = _randn(g, H, LEFT + RIGHT + 1) if bias else None
    side_bias = _randn(g, H, 2 * n_side + 1) if (bias and side) or side_table else None
    rng = torch.tensor([1234, 8], dtype=torch.int64)
    halo_kw = {}
    if halo:
        halo_kw = dict(halo_k=_randn(g, B, 10, H, D), halo_v=_randn(g, B, 10, H, D),
                       halo_mask=torch.rand(B, 10, generator=g) > 0.2, halo_left=4)
    args = (q, k, v, side_k, side_v)
    masks = (key_mask, side_mask, query_block, band_bias, side_bias, LEFT, RIGHT, SCALE, dropout, rng)
    out, lse = tb.band_side_forward(*args, *masks, **halo_kw)
    dout = _randn(g, *out.shape)
    bwd_kw = dict(halo_kw, dlse=_randn(g, *lse.shape)) if dlse else halo_kw
    return lambda: tb.band_side_backward(dout, *args, out, lse, *masks, **bwd_kw)


def _longformer_case():
    from longattn.backends import triton_backend as tb

    g = torch.Generator().manual_seed(1)
    q, k, v = (_randn(g, B, S, H, D) for _ in range(3))
    pos = torch.tensor([[0, 10, 19], [5, 0, 0]])
    used = torch.tensor([[True, True, True], [True, False, False]])
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[0, [0, 10, 19]] = True
    glob[1, 5] = True
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, 15:] = False
    band_rows = pad & ~glob
    out, lse = tb.longformer_band_forward(q, k, v, pos, used, band_rows, pad, LEFT, RIGHT, SCALE)
    dout = _randn(g, *out.shape)
    return lambda: tb.longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, LEFT, RIGHT, SCALE)


CASES = {
    "local-band-bias": lambda: _band_case(bias=True),
    "tglobal": lambda: _band_case(side=True, bias=True),
    "side-bias-without-side-keys": lambda: _band_case(side_table=True),
    "longformer-band": _longformer_case,
    "halo": lambda: _band_case(bias=True, halo=True),
    "dlse": lambda: _band_case(side=True, bias=True, dlse=True),
    "dropout": lambda: _band_case(side=True, bias=True, dropout=0.2),
}


@pytest.mark.parametrize("name", CASES)
def test_backward_launches_only_its_kernels(name, triton_launches):
    backward = CASES[name]()
    triton_launches.clear()  # the forward's
    with DeviceWork() as mode:
        backward()
    assert mode.glue == [], f"torch ops in the backward: {mode.glue} (kernels: {triton_launches})"
    assert 0 < len(triton_launches) <= 4, triton_launches


def test_counters_see_torch_ops_and_launches(triton_launches):
    """The counters are live: a torch reduction is recorded, a view and an allocation are not, launches are."""
    backward = _band_case()
    triton_launches.clear()
    x = torch.ones(4)
    with DeviceWork() as mode:
        torch.empty(3)
        x.view(2, 2).sum()
        backward()
    assert mode.glue == ["aten.sum"], mode.glue
    assert triton_launches == ["_rows_kernel", "_keys_kernel"], triton_launches
