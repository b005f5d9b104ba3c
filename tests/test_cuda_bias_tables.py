"""The CUDA band op's bias tables: the tile kernels read float32 only; a float16 / bfloat16 table (what LongT5 models
pass) is converted to a float32 workspace on the device by longattn's own code (csrc/band_side/bias_tables.h): in the
forward by ``band_side_bias_convert_kernel``, launched just before the band kernel and only then (float32 tables are
read in place: one launch), in the backward by the delta kernel, which runs first anyway (no extra launch). Reading
the tables in their dtype inside the score loop grew the tile kernels by a third (sm_90 SASS) and cost 15-30 % on an
H200.

CPU: the conversion's index arithmetic emulated (both tables in one grid-stride pass over the workspace the API
allocates, from the forward's grid and from the delta kernel's, however small). GPU (``@pytest.mark.gpu``): every
table dtype gives bitwise the outputs and input gradients of the float32-upcast tables (the kernels read the same
float32 values), table gradients in the table's dtype (the float32 sums rounded once), and the launch counts.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_cuda_longformer import gpu_ready

CONVERT_THREADS, DELTA_WARPS = 256, 8  # csrc/band_side/launch.cu


# --------------------------------------------------------------------------------------------------------
# Emulation (csrc/band_side/bias_tables.h, csrc/band_side_api.cpp prepare)
# --------------------------------------------------------------------------------------------------------


def _convert(band, side, grid_threads):
    """convert_bias_tables over ``grid_threads`` threads: the workspace (band's float32 entries, then side's; only the
    16-bit tables', as prepare allocates it) after the grid-stride loop; every entry must be written exactly once."""
    tables = [t for t in (band, side) if t is not None and t.dtype != torch.float32]
    n_band = band.numel() if band is not None and band.dtype != torch.float32 else 0
    n = sum(t.numel() for t in tables)
    workspace = torch.full((n,), float("nan"), dtype=torch.float32)
    writes = torch.zeros(n, dtype=torch.int64)
    for thread in range(grid_threads):
        for e in range(thread, n, grid_threads):
            src, i = (band, e) if e < n_band else (side, e - n_band)
            workspace[e] = src.reshape(-1)[i].float()
            writes[e] += 1
    assert (writes == 1).all()
    return workspace, n_band


@pytest.mark.parametrize("band_dtype, side_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, None),
                                                    (torch.float32, torch.float16), (None, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("grid", ["forward", "delta-one-cta"])
def test_conversion_writes_both_tables_once(band_dtype, side_dtype, grid):
    """``forward``: ceil(n / 256) CTAs of 256 threads; ``delta-one-cta``: the delta kernel's grid for B * S * H = 3
    rows (one CTA of 8 warps), smaller than the tables: the grid-stride loop still covers every entry."""
    H_, width, G_ = 3, 255, 70
    gen = torch.Generator().manual_seed(0)
    band = torch.randn(H_, width, generator=gen).to(band_dtype) if band_dtype else None
    side = torch.randn(H_, 2 * G_ + 1, generator=gen).to(side_dtype) if side_dtype else None
    n = sum(t.numel() for t in (band, side) if t is not None and t.dtype != torch.float32)
    threads = -(-n // CONVERT_THREADS) * CONVERT_THREADS if grid == "forward" else -(-3 // DELTA_WARPS) * 256
    workspace, n_band = _convert(band, side, threads)
    # What the tile kernels then read: the workspace for a 16-bit table, the table itself for a float32 one.
    read_band = workspace[:n_band].view(H_, width) if n_band else band
    read_side = workspace[n_band:].view(H_, 2 * G_ + 1) if side is not None and side.dtype != torch.float32 else side
    for table, read in ((band, read_band), (side, read_side)):
        if table is not None:
            assert read.dtype == torch.float32 and torch.equal(read, table.float())


# --------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------


def _case(dtype, S_=200, G_=25, left=40, right=25, B_=2, H_=2, D_=64):
    gen = torch.Generator(device="cuda").manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q, k, v = (randn(B_, S_, H_, D_) for _ in range(3))
    sk, sv = randn(B_, G_, H_, D_), randn(B_, G_, H_, D_)
    bkm = torch.rand(B_, S_, generator=gen, device="cuda") > 0.2
    sm = torch.rand(B_, G_, generator=gen, device="cuda") > 0.3
    qb = torch.randint(-1, G_, (B_, S_), generator=gen, device="cuda", dtype=torch.int32)
    # Tables of magnitude ~8, so the 16-bit roundings matter; fp32 before the cast to the tested dtype.
    bb = 8 * torch.randn(H_, left + right + 1, generator=gen, device="cuda")
    sb = 8 * torch.randn(H_, 2 * G_ + 1, generator=gen, device="cuda")
    dout = randn(B_, S_, H_, D_)
    return (q, k, v, sk, sv, bkm, sm, qb), (bb, sb), (left, right, D_**-0.5), dout


def _run(inputs, tables, dims, dout):
    ops = torch.ops.longattn
    q, k, v, sk, sv, bkm, sm, qb = inputs
    out, lse = ops.cuda_band_side_fwd(q, k, v, sk, sv, bkm, sm, qb, *tables, *dims)
    grads = ops.cuda_band_side_bwd(dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, *tables, *dims)
    return out, lse, grads


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "one-row"])
def test_tables_of_every_dtype_are_their_float32_values(dtype, table_dtype, layout):
    """A table of any dtype (``strided``: a transposed view, copied dense first; ``one-row``: S = 1, so the delta
    kernel's grid (one CTA) is smaller than the tables, 2 x 1 + 2 x 601 entries, and its conversion loop strides; the
    window is 0 there: the API takes left, right <= S - 1, which the H200 run of 2026-11-30 caught in this test)
    gives out, lse and the q / k / v / side-key gradients bitwise equal to the call with the same tables upcast to
    float32 (the kernels read the same float32 values; an entry left unconverted would differ), and table gradients in
    the table's dtype: the float32 call's gradients rounded once."""
    shape = {"S_": 1, "G_": 300, "left": 0, "right": 0} if layout == "one-row" else {}
    inputs, (bb32, sb32), dims, dout = _case(dtype, **shape)
    bb32, sb32 = bb32.to(table_dtype).float(), sb32.to(table_dtype).float()  # values the 16-bit dtype holds exactly
    tables = [t.to(table_dtype) for t in (bb32, sb32)]
    if layout == "strided":
        tables = [t.t().contiguous().t() for t in tables]
        assert not tables[0].is_contiguous()
    out, lse, grads = _run(inputs, tables, dims, dout)
    out32, lse32, grads32 = _run(inputs, (bb32, sb32), dims, dout)
    assert torch.equal(out, out32) and torch.equal(lse, lse32)
    for name, g, g32 in zip(("dq", "dk", "dv", "dside_k", "dside_v"), grads[:5], grads32[:5]):
        assert torch.equal(g, g32), name
    for name, g, g32 in zip(("dband_bias", "dside_bias"), grads[5:7], grads32[5:7]):
        assert g.dtype == table_dtype and g.is_contiguous(), name
        assert torch.equal(g, g32.to(table_dtype)), name


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("table_dtype, forward_launches", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_launch_counts(table_dtype, forward_launches):
    """Forward: the band kernel, after the conversion launch only for 16-bit tables; backward: delta (which converts),
    dQ, dK/dV and the finish kernel, whatever the tables' dtype. No host sync (sync debug mode "error")."""
    from tests.test_host_sync import _gpu_kernels

    inputs, tables, dims, dout = _case(torch.bfloat16)
    tables = [t.to(table_dtype) for t in tables]
    _run(inputs, tables, dims, dout)  # warm up
    ops = torch.ops.longattn
    q, k, v, sk, sv, bkm, sm, qb = inputs
    fwd = _gpu_kernels(lambda: ops.cuda_band_side_fwd(q, k, v, sk, sv, bkm, sm, qb, *tables, *dims))
    out, lse = ops.cuda_band_side_fwd(q, k, v, sk, sv, bkm, sm, qb, *tables, *dims)
    bwd = _gpu_kernels(lambda: ops.cuda_band_side_bwd(dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, *tables, *dims))
    assert len(fwd) == forward_launches, fwd
    assert (forward_launches == 2) == any("bias_convert" in name for name in fwd), fwd
    assert len(bwd) == 4 and not any("bias_convert" in name for name in bwd), bwd
