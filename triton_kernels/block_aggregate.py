"""Fused block aggregation (LongT5's side tokens): segment sums by block id, optional RMS norm with weight.

Only kernels do device work: the forward launches 2 kernels and the backward at most 3; around them there are
allocations only (no torch sort / gather / elementwise / reduction / dtype copy).

Forward, 2 launches:

1. ``_order_kernel``: the stable counting sort of each row's tokens by block id, on the device. Ids are
   arbitrary: unsorted, -1 anywhere, values outside [0, G) (all dropped, never read through). It writes
   ``bounds`` (B, G + 1) int32 (block g of row b is ``order[b, bounds[b, g] : bounds[b, g + 1]]``) and ``order``
   (B, S) int32 (token indices, each block's in sequence order; slots from ``bounds[b, G]`` on are unused).
   One program per (id tile of ``BLOCK_G`` blocks, row): no communication between programs, no atomics.
2. ``_aggregate_kernel``: one program per (row, block) sums its tokens in float32 in block order, ``BLOCK_S``
   at a time (deterministic, no atomics) and, with a weight, normalises the row in the same program:
   ``out = weight * sums * rsqrt(mean(sums**2) + eps)``.

``order`` and ``bounds`` are exactly what a stable argsort of the ids (dropped last) and a ``searchsorted``
gave before (``tests/test_triton_block_aggregate.py`` checks it), so the sums are bitwise unchanged.

Backward, with a weight 3 launches, without 1:

1. ``_rows_grad_kernel`` (weight only): per row tile of (b, g) rows, the per-row coefficient of the RMS-norm
   backward ``coef = rstd**3 * mean(sums * w * dy)`` and the row tile's partial ``dweight``
   (``sum over its rows of dy * sums * rstd``) into a (tiles, C) float32 buffer;
2. ``_dweight_kernel`` (weight only): ``dweight[c]`` = the partials summed over tiles in order (fixed order:
   deterministic), in weight's dtype;
3. ``_scatter_grad_kernel``: ``dx[b, s] = dsums[b, ids[b, s]]`` (0 for dropped tokens), with
   ``dsums = rstd * w * dy - sums * coef`` computed in place from the row's statistics.

Layouts: x (B, S, C) and dout (B, G, C) with any strides and a unit last stride; ids contiguous int32 (B, S);
outputs contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_power_of_2
from ._launch import cached

# Aggregation tiles. Channel tile: a whole LongT5 d_model row (512..4096) takes 2..16 passes of 256. Token step:
# 16 rows of a block per load (LongT5's global_block_size is 16). Untuned; measured on an H200 (2026-11-30, S = 16384,
# C = 768, G = 1024, bf16; 2026-11-30T165656_NVIDIA-H200_profile-ops.json): the aggregate kernel 33.5 us.
_GPU_BLOCK_C, _GPU_BLOCK_S = 256, 16
_INTERPRET_BLOCK_C, _INTERPRET_BLOCK_S = 32, 8

# Order kernel tiles (ids per scan step, blocks per program, owned tokens per ranking step) and warps.
# Predicted cost (H100/H200; not measured, no GPU when written) at S = 131072, G = 8192 (LongT5, block 16), B = 1:
# 128 programs of 16 warps, one wave. Each scans the row's ids twice (16 steps of 8192 ids per pass, each an L2
# read plus a block-wide sum or scan, ~1k cycles: ~32k cycles) and ranks its ~1024 owned tokens in 8 + 8 steps of
# a 128 x 64 one-hot (~1k cycles each: ~16k), about 50k cycles or 25-30 us. It moves 128 MB of L2 reads (each
# program re-reads the 512 KB of ids twice) and ~4 MB of scratch, order and bounds traffic. The aggregate kernel
# reads all of x from DRAM: 200 MB at C = 768 in bf16, 50-70 us. The scans' L2 reads grow as B * S * G / 8 bytes,
# against x's 2 * B * S * C (G = S / 16: S / (256 C) of x, 2/3 at S = 131072 and C = 768, 1/12 at S = 16384): the
# price of programs that share nothing (a shared count needs zeroed memory, i.e. one more launch). Ranking costs
# (owned tokens) x BLOCK_G per program: when a few blocks hold most of the row (G <= 64), one program ranks them
# all, as one aggregate program then sums them. Measured on an H200 (2026-11-30) at S = 16384, G = 1024: 48.5 us, more
# than the prediction at 8x the length: 16 programs (G / BLOCK_G), each latency-bound on its two serial scans (the CUDA
# order kernel: 10.8 us). More, smaller id tiles at small G are the first thing to try.
_GPU_ORDER = dict(BLOCK_T=8192, BLOCK_G=64, BLOCK_R=128, num_warps=16)  # sm_90: 88 registers, no spill
# Tiny interpreter tiles, so test rows cross several scan steps, id tiles and ranking steps.
_INTERPRET_ORDER = dict(BLOCK_T=32, BLOCK_G=4, BLOCK_R=8, num_warps=1)

# Weight-gradient tiles. ``_rows_grad_kernel``: BLOCK_R (b, g) rows x BLOCK_C channels per step (S = 131072, G = 8192:
# 512 programs reading dy and sums once, 38 MB at C = 768; sm_90 compile: 137 registers, no spill; 32 rows with
# 8 warps take 200). ``_dweight_kernel``: BLOCK_C channels per program, the per-tile partials (512 x C float32)
# BLOCK_T tiles per step (C = 768: 24 programs of 8 steps). H200, 2026-11-30, S = 16384 (G = 1024): rows-grad 8.4 us,
# dweight 1.7 us, scatter-grad 8.8 us.
_GPU_ROWS = dict(BLOCK_R=16, BLOCK_C=128, num_warps=4)
_GPU_DWEIGHT = dict(BLOCK_T=64, BLOCK_C=32, num_warps=4)
_INTERPRET_ROWS = dict(BLOCK_R=4, BLOCK_C=16, num_warps=1)
_INTERPRET_DWEIGHT = dict(BLOCK_T=4, BLOCK_C=16, num_warps=1)


def _blocks(C: int) -> tuple[int, int]:
    block_c, block_s = (_INTERPRET_BLOCK_C, _INTERPRET_BLOCK_S) if interpreting() else (_GPU_BLOCK_C, _GPU_BLOCK_S)
    return min(block_c, next_power_of_2(C)), block_s


@triton.jit
def _order_kernel(Ids, Order, Bounds, Scratch, S, G,
                  BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """Stable counting sort of row b's tokens, for blocks [g0, g0 + BLOCK_G): their ``bounds`` and ``order`` slots.

    The program owns the tokens whose id lies in its id tile. Their slots are ``[base, base + n_own)`` with
    ``base`` = the kept tokens of smaller id; ranking needs only the owned tokens, so they are first compacted
    (in sequence order, as ``token * BLOCK_G + local id``, int64) into the same slots of ``Scratch`` and then
    ranked BLOCK_R at a time: a one-hot (BLOCK_R, BLOCK_G) of their local ids, whose running column sums (carried
    from step to step) give each token the number of earlier owned tokens of its block. Every count is an integer
    sum: no atomics, deterministic. Nothing another program writes is read.
    """
    b = tl.program_id(1).to(tl.int64)
    g0 = tl.program_id(0) * BLOCK_G
    g_hi = tl.minimum(g0 + BLOCK_G, G)
    ids_row = Ids + b * S
    offs_t = tl.arange(0, BLOCK_T)
    # Pass 1: base = kept tokens with an id below g0; n_own = tokens with an id in [g0, g_hi).
    base = tl.zeros([], dtype=tl.int32)
    n_own = tl.zeros([], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_T):
        s = s0 + offs_t
        ids = tl.load(ids_row + s, mask=s < S, other=-1)
        base += tl.sum(((ids >= 0) & (ids < g0)).to(tl.int32), 0)
        n_own += tl.sum(((ids >= g0) & (ids < g_hi)).to(tl.int32), 0)
    # Pass 2: the owned tokens, in sequence order, into Scratch[b, base : base + n_own] (disjoint per program).
    scratch_row = Scratch + b * S + base
    done = tl.zeros([], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_T):
        s = s0 + offs_t
        ids = tl.load(ids_row + s, mask=s < S, other=-1)
        own = (ids >= g0) & (ids < g_hi)
        pos = done + tl.cumsum(own.to(tl.int32), 0) - 1
        tl.store(scratch_row + pos, s.to(tl.int64) * BLOCK_G + (ids - g0), mask=own)
        done += tl.sum(own.to(tl.int32), 0)
    tl.debug_barrier()  # Scratch is re-read below by other threads of this program (bar.sync: CTA visibility)
    offs_r = tl.arange(0, BLOCK_R)
    offs_g = tl.arange(0, BLOCK_G)
    # Pass 3: tokens per owned block -> bounds of blocks g0..g_hi-1 (and bounds[G] from the last id tile).
    count = tl.zeros([BLOCK_G], dtype=tl.int32)
    for r0 in range(0, n_own, BLOCK_R):
        r = r0 + offs_r
        local = tl.where(r < n_own, tl.load(scratch_row + r, mask=r < n_own, other=0) % BLOCK_G, -1)
        count += tl.sum((local[:, None] == offs_g[None, :]).to(tl.int32), 0)
    cursor = base + tl.cumsum(count, 0) - count  # exclusive: the first slot of each owned block
    bounds_row = Bounds + b * (G + 1)
    tl.store(bounds_row + g0 + offs_g, cursor, mask=g0 + offs_g < g_hi)
    tl.store(bounds_row + G, base + n_own, mask=g_hi == G)
    # Pass 4: slot = the block's first slot + the block's owned tokens before this one (sequence order).
    for r0 in range(0, n_own, BLOCK_R):
        r = r0 + offs_r
        packed = tl.load(scratch_row + r, mask=r < n_own, other=0)
        local = tl.where(r < n_own, packed % BLOCK_G, -1)  # -1: past the owned tokens, in no block
        onehot = (local[:, None] == offs_g[None, :]).to(tl.int32)
        running = tl.cumsum(onehot, 0)  # per block, its tokens up to and including this row of the step
        slot = tl.sum(onehot * (cursor[None, :] + running - 1), 1)
        tl.store(Order + b * S + slot, (packed // BLOCK_G).to(tl.int32), mask=r < n_own)
        cursor += tl.sum(onehot, 0)


@triton.jit
def _aggregate_kernel(X, Order, Bounds, W, Out, Sums, Rstd, stride_xb, stride_xs, S, G, C, eps,
                      HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Block g of row b: sum x over tokens Order[b, Bounds[b, g] : Bounds[b, g + 1]], then the optional norm."""
    pid = tl.program_id(0)
    b = (pid // G).to(tl.int64)
    g = (pid % G).to(tl.int64)
    start = tl.load(Bounds + b * (G + 1) + g)
    end = tl.load(Bounds + b * (G + 1) + g + 1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    row = (b * G + g) * C  # (B, G, C) contiguous outputs
    sumsq = tl.zeros([BLOCK_C], dtype=tl.float32)  # per-channel partials of sum(sums**2)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            pos = s0 + offs_s
            tok = tl.load(Order + b * S + pos, mask=pos < end, other=0).to(tl.int64)
            x = tl.load(X + b * stride_xb + tok[:, None] * stride_xs + c[None, :],
                        mask=(pos < end)[:, None] & (c < C)[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
        if HAS_WEIGHT:
            tl.store(Sums + row + c, acc, mask=c < C)
            sumsq += acc * acc
        else:
            tl.store(Out + row + c, acc.to(Out.dtype.element_ty), mask=c < C)
    if HAS_WEIGHT:
        rstd = 1.0 / tl.sqrt(tl.sum(sumsq, 0) / C + eps)
        tl.store(Rstd + b * G + g, rstd)
        tl.debug_barrier()  # the sums stored above are re-read below
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            sums = tl.load(Sums + row + c, mask=c < C, other=0.0)
            w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
            tl.store(Out + row + c, (w * sums * rstd).to(Out.dtype.element_ty), mask=c < C)


@triton.jit
def _rows_grad_kernel(DOut, W, Sums, Rstd, Coef, Partial, stride_db, stride_dg, R, G, C,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [r0, r0 + BLOCK_R) of the flattened (B * G) rows: ``Coef[r] = rstd**3 * mean(sums * w * dy)`` and
    ``Partial[tile, c] = sum over the tile's rows of dy * sums * rstd`` (the tile's share of dweight)."""
    tile = tl.program_id(0)
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 division (R < 2**31), 64-bit offsets
    dy_row = (r // G).to(tl.int64) * stride_db + (r % G).to(tl.int64) * stride_dg
    sums_row = r.to(tl.int64) * C
    rstd = tl.load(Rstd + r, mask=r < R, other=0.0)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (r < R)[:, None] & (c < C)[None, :]
        dy = tl.load(DOut + dy_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sums = tl.load(Sums + sums_row[:, None] + c[None, :], mask=mask, other=0.0)
        w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
        dot += tl.sum(sums * w[None, :] * dy, 1)
        tl.store(Partial + tile.to(tl.int64) * C + c, tl.sum(dy * (sums * rstd[:, None]), 0), mask=c < C)
    tl.store(Coef + r, rstd * rstd * rstd * (dot / C), mask=r < R)


@triton.jit
def _dweight_kernel(Partial, DW, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``DW[c] = sum over the T row tiles of Partial[t, c]``, BLOCK_T tiles at a time in order (deterministic)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        acc += tl.sum(tl.load(Partial + t[:, None] * C + c[None, :], mask=(t < T)[:, None] & (c < C)[None, :],
                              other=0.0), 0)
    tl.store(DW + c, acc.to(DW.dtype.element_ty), mask=c < C)


@triton.jit
def _scatter_grad_kernel(DOut, Ids, W, Sums, Rstd, Coef, DX, stride_db, stride_dg, S, G, C,
                         HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx of BLOCK_S tokens x BLOCK_C channels of row b: the (normalised) gradient of each token's block."""
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ids = tl.load(Ids + b * S + s, mask=s < S, other=-1)
    keep = (ids >= 0) & (ids < G)  # out-of-range ids are dropped, never read through (no host check)
    gid = tl.where(keep, ids, 0).to(tl.int64)
    mask = keep[:, None] & (c < C)[None, :]
    dy = tl.load(DOut + b * stride_db + gid[:, None] * stride_dg + c[None, :], mask=mask, other=0.0)
    dx = dy.to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
        sums = tl.load(Sums + (b * G + gid)[:, None] * C + c[None, :], mask=mask, other=0.0)
        rstd = tl.load(Rstd + b * G + gid, mask=keep, other=0.0)
        coef = tl.load(Coef + b * G + gid, mask=keep, other=0.0)
        dx = rstd[:, None] * w[None, :] * dx - sums * coef[:, None]
    tl.store(DX + (b * S + s)[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty),
             mask=(s < S)[:, None] & (c < C)[None, :])


def _order(block_ids, num_blocks, device):
    """-> (order (B, S) int32, bounds (B, G + 1) int32) of ``_order_kernel`` (one launch; G >= 1)."""
    B, S = block_ids.shape
    meta = _INTERPRET_ORDER if interpreting() else _GPU_ORDER
    order = torch.empty(B, S, dtype=torch.int32, device=device)
    scratch = torch.empty(B, S, dtype=torch.int64, device=device)
    bounds = torch.empty(B, num_blocks + 1, dtype=torch.int32, device=device)
    # S = 0: ids, order and scratch are never read (empty tensors may be null pointers): bounds stands in.
    ids, order_arg, scratch_arg = (block_ids, order, scratch) if S else (bounds, bounds, bounds)
    cached(_order_kernel)[(cdiv(num_blocks, meta["BLOCK_G"]), B)](ids, order_arg, bounds, scratch_arg, S, num_blocks,
                                                                 **meta)
    return order, bounds


def forward(x, block_ids, num_blocks, weight, eps):
    """-> (out (B, G, C) in x's dtype, sums (B, G, C) float32, rstd (B, G) float32); see ``longattn.backends``.

    ``sums`` and ``rstd`` are empty (0,) tensors without a weight.
    """
    B, S, C = x.shape
    G = num_blocks
    out = torch.empty(B, G, C, dtype=x.dtype, device=x.device)
    if weight is None:
        sums, rstd = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    else:
        sums = torch.empty(B, G, C, dtype=torch.float32, device=x.device)
        rstd = torch.empty(B, G, dtype=torch.float32, device=x.device)
    if B * G == 0 or (C == 0 and weight is None):  # nothing to compute (no block, or no channel to sum)
        return out, sums, rstd
    order, bounds = _order(block_ids, G, x.device)
    block_c, block_s = _blocks(C)
    # Without a weight, W, Sums and Rstd are never read: ``out`` stands in (empty tensors may be null pointers).
    w, s_ptr, r_ptr = (out, out, out) if weight is None else (weight, sums, rstd)
    cached(_aggregate_kernel)[(B * G,)](
        x, order if S else bounds, bounds, w, out, s_ptr, r_ptr,
        x.stride(0), x.stride(1), S, G, C, float(eps),
        HAS_WEIGHT=weight is not None, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return out, sums, rstd


def _weight_grads(dout, weight, sums, rstd, B, G, C):
    """-> (coef (B, G) float32, dweight (C,) in weight's dtype; C >= 1): ``_rows_grad_kernel`` (when B * G > 0),
    then ``_dweight_kernel`` over its per-tile partials (no tile: dweight = 0)."""
    rows, dweight_meta = (_INTERPRET_ROWS, _INTERPRET_DWEIGHT) if interpreting() else (_GPU_ROWS, _GPU_DWEIGHT)
    rows = dict(rows, BLOCK_C=min(rows["BLOCK_C"], next_power_of_2(C)))
    dweight_meta = dict(dweight_meta, BLOCK_C=min(dweight_meta["BLOCK_C"], next_power_of_2(C)))
    R = B * G
    tiles = cdiv(R, rows["BLOCK_R"])
    coef = torch.empty(B, G, dtype=torch.float32, device=dout.device)
    dweight = torch.empty(C, dtype=weight.dtype, device=weight.device)
    partial = torch.empty(tiles, C, dtype=torch.float32, device=dout.device)
    if tiles:
        cached(_rows_grad_kernel)[(tiles,)](dout, weight, sums, rstd, coef, partial, dout.stride(0), dout.stride(1),
                                            R, G, C, **rows)
    grid = (cdiv(C, dweight_meta["BLOCK_C"]),)
    cached(_dweight_kernel)[grid](partial if tiles else dweight, dweight, tiles, C, **dweight_meta)
    return coef, dweight


def backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    """-> (dx (B, S, C) in x's dtype, dweight (C,) in weight's dtype or empty (0,))."""
    B, S, C = x.shape
    G = num_blocks
    dx = torch.empty(B, S, C, dtype=x.dtype, device=x.device)
    dweight, coef = x.new_empty(0), None
    if weight is not None:
        coef, dweight = _weight_grads(dout, weight, sums, rstd, B, G, C) if C else (None, weight.new_empty(0))
    if B * S * C == 0:
        return dx, dweight
    block_c, block_s = _blocks(C)
    grid = (cdiv(S, block_s), cdiv(C, block_c), B)
    # G = 0: every token is dropped (dx = 0) and nothing but the ids is read: dx stands in for dout (it may be a
    # null pointer) and the statistics, and the weight path is off.
    weighted = coef is not None and G > 0
    d = dout if G else dx
    cached(_scatter_grad_kernel)[grid](
        d, block_ids, weight if weighted else d, sums if weighted else d, rstd if weighted else d,
        coef if weighted else d, dx, d.stride(0), d.stride(1), S, G, C,
        HAS_WEIGHT=weighted, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return dx, dweight
