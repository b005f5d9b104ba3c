"""Deterministic gradients of the band_bias (H, W) and side_bias (H, 2G + 1) tables.

``dbias[h, t] = sum over (b, i) of dS[b, h, i, key(i, t)]`` where ``key(i, t) = i + t - left`` (band) or
``t - G + query_block[b, i]`` (side). Summing dS along the diagonals of the (query, key) tiles of the dQ/dK
kernels would need a scatter or atomics, so this kernel works in *skewed* coordinates instead: a program
owns a tile of table entries ``t`` of one head and walks a fixed share of the (batch, query tile) pairs;
for each query row it gathers exactly the keys ``key(i, t)`` and recomputes their probabilities and dP
(``<q_i, k_key>``, ``<dO_i, v_key>`` as elementwise products summed over D chunks), so each entry's sum is a
plain register reduction. Every program writes its partial sums to a (splits, H, T) buffer that torch sums
in a fixed order: two runs are bitwise equal, with no atomics.

Cost: the two recomputed dot products per (query, entry) pair run on the FMA units, not tensor cores
(about half the FLOPs of the band part of the backward, paid only when a bias table is given). Not
measured: no GPU was available when this was written; fusing the diagonal sums into the dQ kernel is
the obvious next step if it shows in profiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, as_u8, band_scores, batch_head_offset, head_dim_block, interpreting, side_scores, strides3

# (BLOCK_M, BLOCK_T, BLOCK_DC, num_warps): query rows x table entries per step, D chunk of the 3-D products.
# Not timed (no GPU); chosen from ptxas register counts of an offline sm_90 compile (bf16): (16, 16, 16) with
# 8 warps uses 179 registers and no spills for D = 64 and 128; BLOCK_T = 32 or 4 warps spill 200+ bytes.
_GPU_TILES = (16, 16, 16, 8)
_INTERPRET_TILES = (16, 16, 16, 1)
_GPU_PROGRAMS = 4 * 132  # about four waves of an H100's SMs


@triton.jit
def _gather_dot(a_base, rows, b_base, cols, valid, stride_a, stride_b, d, D):
    """(BLOCK_M, BLOCK_T) float32 ``<a[rows[i]], b[cols[i, t]]>`` over the head-dim chunk ``d``."""
    a = tl.load(a_base + rows.to(tl.int64)[:, None, None] * stride_a + d[None, None, :],
                mask=(d < D)[None, None, :], other=0.0)
    bm = valid[:, :, None] & (d < D)[None, None, :]
    bv = tl.load(b_base + cols.to(tl.int64)[:, :, None] * stride_b + d[None, None, :], mask=bm, other=0.0)
    return tl.sum(a.to(tl.float32) * bv.to(tl.float32), 2)


@triton.jit
def _bias_grad_kernel(
    Q, K, V, DO, Lse, Delta, KMask, SMask, QBlock, Bias, Partial,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    B, S, H, G, D, left, right, scale, T, pairs_per_split,
    SIDE: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SMASK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr, D_CHUNKS: tl.constexpr,
):
    """Partial[split, h, t] = sum of dS over this split's (batch, query tile) pairs; K, V are band or side."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    n_mtiles = tl.cdiv(S, BLOCK_M)
    n_keys = G if SIDE else S
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    w_lo = split * pairs_per_split
    w_hi = tl.minimum(w_lo + pairs_per_split, B * n_mtiles)
    for w in range(w_lo, w_hi):
        b = (w // n_mtiles).to(tl.int64)
        rows = (w % n_mtiles) * BLOCK_M + offs_m
        row_ok = rows < S
        bh = b * H + h
        if SIDE:
            qblock = tl.load(QBlock + b * S + rows, mask=row_ok, other=0)[:, None]
            cols = offs_t[None, :] - G + qblock  # side key g of table entry t
        else:
            cols = rows[:, None] + offs_t[None, :] - left  # band key j of offset t
        valid = (cols >= 0) & (cols < n_keys) & row_ok[:, None]
        qk = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
        dp = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
        q_base = Q + batch_head_offset(bh, H, stride_qb, stride_qh)
        do_base = DO + batch_head_offset(bh, H, stride_dob, stride_doh)
        k_base = K + batch_head_offset(bh, H, stride_kb, stride_kh)
        v_base = V + batch_head_offset(bh, H, stride_vb, stride_vh)
        safe_rows = tl.where(row_ok, rows, 0)
        for c in range(D_CHUNKS):  # a loop, not unrolled: unrolling keeps every chunk live (spills)
            d = c * BLOCK_DC + tl.arange(0, BLOCK_DC)
            qk += _gather_dot(q_base, safe_rows, k_base, cols, valid, stride_qs, stride_ks, d, D)
            dp += _gather_dot(do_base, safe_rows, v_base, cols, valid, stride_dos, stride_vs, d, D)
        if SIDE:
            s = side_scores(qk, qblock, cols, G, scale, Bias + h * T, SMask + b * G, True, HAS_SMASK)
        else:
            s = band_scores(qk, rows[:, None], cols, True, S, left, right, scale, Bias + h * T, KMask + b * S,
                            True, HAS_KMASK)
        stat = bh * S + rows
        lse = tl.load(Lse + stat, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + stat, mask=row_ok, other=0.0)
        p = tl.exp2((s - lse[:, None]) * LOG2E)
        acc += tl.sum(p * (dp - delta[:, None]), 0)
    tl.store(Partial + (split * H + h).to(tl.int64) * T + offs_t, acc, mask=offs_t < T)


def bias_grad(side: bool, q, keys, values, dout, lse, delta, band_key_mask, side_mask, query_block, table,
              left, right, scale):
    """Gradient of ``table`` (band_bias (H, W) or, with ``side``, side_bias (H, 2G + 1)) in its dtype.

    ``keys``/``values``: k, v (B, S, H, D) or side_k, side_v (B, G, H, D); lse, delta: (B, H, S) float32.
    """
    B, S, H, D = q.shape
    G = keys.shape[1] if side else 0
    T = table.shape[1]
    BLOCK_M, BLOCK_T, BLOCK_DC, warps = _INTERPRET_TILES if interpreting() else _GPU_TILES
    BLOCK_DC = min(BLOCK_DC, head_dim_block(D))
    pairs = B * triton.cdiv(S, BLOCK_M)
    programs = triton.cdiv(T, BLOCK_T) * H
    splits = min(pairs, 2 if interpreting() else max(1, triton.cdiv(_GPU_PROGRAMS, programs)))
    per_split = triton.cdiv(pairs, splits)
    splits = triton.cdiv(pairs, per_split)
    partial = torch.empty(splits, H, T, dtype=torch.float32, device=q.device)
    _bias_grad_kernel[(triton.cdiv(T, BLOCK_T), H, splits)](
        q, keys, values, dout, lse, delta, as_u8(band_key_mask, q), as_u8(side_mask, q),
        q if query_block is None else query_block, table, partial,
        *strides3(q), *strides3(keys), *strides3(values), *strides3(dout),
        B, S, H, G, D, left, right, float(scale), T, per_split,
        SIDE=side, HAS_KMASK=band_key_mask is not None, HAS_SMASK=side_mask is not None, BLOCK_M=BLOCK_M,
        BLOCK_T=BLOCK_T, BLOCK_DC=BLOCK_DC, D_CHUNKS=head_dim_block(D) // BLOCK_DC, num_warps=warps,
    )
    return partial.sum(0).to(table.dtype)
