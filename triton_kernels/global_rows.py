"""Longformer's global rows: G slot queries attending all S tokens, split over the keys (flash-decoding).

A global row attends every real token, so one program per query tile would walk all S keys alone (Longformer's
single global token: B * H programs for the whole GPU). Instead the keys are cut into ``splits`` chunks:

- ``_split_kernel``, grid (slot tiles, B * H, splits): the partial (out, lse) of a tile of slot queries over one
  key chunk, float32; with ``BACKWARD`` the chunk's partial dq;
- ``_combine_kernel``, grid (slot tiles, B * H): merges the partials in chunk order by log-sum-exp and writes the
  rows straight into ``out`` at the slots' positions, and ``glse``; forward (out) or backward (dq, summing
  partial dq);
- ``_keys_kernel``, grid (key tiles, B * H): dk, dv of one key tile over all slot queries (G is small), written or
  added into dk / dv.

The Triton Longformer op runs these as roles inside the band launches instead (``FusedRows``, see
``triton_kernels/longformer.py``): ``split_program`` leads the band's grid, the forward's merge runs in the last
split program of a slot tile to finish (``combine_when_last``: an arrival counter, no waiting), the backward's in
the band backward's reduction, and ``slot_key_grads`` inside the band dK/dV programs.

Every sum runs in a fixed order in one program (the arrival counter only picks which program merges): two runs are
bitwise equal. Slot queries are read
through their positions (``pos``, ``used``): no gathered copy of q, dout or out. Unused slots read as zero rows
with ``lse = +inf`` and are never stored. Layouts: q, k, v, out, dout, dq, dk, dv (B, S, H, D) with a unit last
stride; pos (B, G) int64, used (B, G) bool; key_mask (B, S) bool or None; glse (B, H, G) float32.

Per-slot key ranges (``key_ranges``, contiguous int32 (B, G, 2), constexpr ``HAS_RANGES``; packed variable-length
batches): slot s attends key j only if ``key_ranges[b, s, 0] <= j < key_ranges[b, s, 1]``. A slot tile's key chunk
is walked only over the key tiles meeting the union of its used slots' ranges, and the dK/dV program of a key tile
skips the slot tiles at either end that cannot see it; pairs are masked per element, so any values are safe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    as_u8,
    attention_tiles,
    batch_head_offset,
    cdiv,
    check_bounds,
    dot_precision,
    ds_tile,
    head_dim_block,
    kv_grad_step,
    load_ranges,
    load_rows,
    range_arg,
    range_mask,
    range_tiles,
    softmax_step,
    split_count,
    store_rows,
    strides3,
    tile_bounds,
    trim_row_tiles,
)
from ._dropout import keep_scale_tile
from ._dropout import kernel_args as _dropout_meta
from ._launch import cached


@triton.jit
def _keep_scale(Rng, bh, offs_g, n0, drop_thresh, drop_scale, BLOCK_N: tl.constexpr):
    """Dropout factors of global rows (slots ``offs_g``) against tokens ``n0 + [0, BLOCK_N)`` (``n0 % 4 == 0``): the
    global-row counters of ``longattn._dropout`` (row = slot with the global-row flag, keys counted as side keys)."""
    return keep_scale_tile(Rng, bh, offs_g, n0, drop_thresh, drop_scale, BLOCK_N, True, True, True)


@triton.jit
def _slot_rows(Pos, Used, b, offs_g, G, stride_pb):
    """Sequence positions of slots ``offs_g`` of batch row b; -1 (never read nor stored) for unused slots.

    ``Pos`` rows are ``stride_pb`` apart (a (B, G) slice of a (B, S) sort); ``Used`` is contiguous (B, G)."""
    ok = offs_g < G
    pos = tl.load(Pos + b * stride_pb + offs_g, mask=ok, other=-1)
    used = tl.load(Used + b * G + offs_g, mask=ok, other=0)
    return tl.where(used != 0, pos, -1)


@triton.jit
def _key_scores(q, k, cols, j_hi, kmask_ptr, scale, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Float32 scores of the slot queries against key tile ``cols``; -inf for keys >= j_hi or masked."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    keep = cols < j_hi
    if HAS_KMASK:
        keep = keep & (tl.load(kmask_ptr + cols, mask=keep, other=0) != 0)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def combine_program(
    pid_g, pid_bh, n_bh, PartO, PartL, Pos, Used, Res, GLse, stride_rb, stride_rs, stride_rh, S, H, G, D, splits, scale,
    stride_pb, BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of slot tile ``pid_g`` of ``pid_bh`` (of ``n_bh`` = B * H) in split order and write its rows of
    Res at the slots' positions.

    Forward: log-sum-exp merge of the partial (out, lse) into ``out`` rows and ``glse`` (+inf for a row with
    no key or an unused slot). Backward: the sum of the partial dq, times ``scale``, added to the rows of Res.
    The partials are read through L2 only (``.cg``): in the fused forward another program wrote them moments ago.
    """
    b = (pid_bh // H).to(tl.int64)
    offs_g = pid_g * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_g < G
    rows = _slot_rows(Pos, Used, b, offs_g, G, stride_pb)
    stride_split = n_bh.to(tl.int64) * G
    first = pid_bh.to(tl.int64) * G + offs_g
    res_base = Res + batch_head_offset(pid_bh, H, stride_rb, stride_rh)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BACKWARD:
        for z in range(splits):
            acc += tl.load(PartO + (z * stride_split + first)[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None],
                           other=0.0, cache_modifier=".cg")
        acc = acc * scale + load_rows(res_base, rows, S, stride_rs, offs_d, D).to(tl.float32)
        store_rows(res_base, acc, rows, S, stride_rs, offs_d, D)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for z in range(splits):
            m = tl.maximum(m, tl.load(PartL + z * stride_split + first, mask=ok, other=float("-inf"),
                                      cache_modifier=".cg"))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for z in range(splits):
            w = tl.exp2((tl.load(PartL + z * stride_split + first, mask=ok, other=float("-inf"),
                                 cache_modifier=".cg") - m_safe) * 1.4426950408889634)  # e^x, _common
            total += w
            acc += w[:, None] * tl.load(PartO + (z * stride_split + first)[:, None] * BLOCK_D + offs_d[None, :],
                                        mask=ok[:, None], other=0.0, cache_modifier=".cg")
        has_key = (total > 0.0) & (rows >= 0)
        store_rows(res_base, acc / tl.where(has_key, total, 1.0)[:, None], rows, S, stride_rs, offs_d, D)
        lse = tl.where(has_key, m_safe + tl.log(tl.where(has_key, total, 1.0)), float("inf"))
        tl.store(GLse + pid_bh.to(tl.int64) * G + offs_g, lse, mask=ok)


@triton.jit
def _combine_kernel(
    PartO, PartL, Pos, Used, Res, GLse, stride_rb, stride_rs, stride_rh, S, H, G, D, splits, scale, stride_pb,
    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``combine_program`` of slot tile ``program_id(0)`` of ``program_id(1)`` = b * H + h."""
    combine_program(tl.program_id(0), tl.program_id(1), tl.num_programs(1), PartO, PartL, Pos, Used, Res, GLse,
                    stride_rb, stride_rs, stride_rh, S, H, G, D, splits, scale, stride_pb, BACKWARD, BLOCK_M, BLOCK_D)


@triton.jit
def _slot_tile(Q, DO, Out, GLse, Pos, Used, pid_bh, b, offs_g, offs_d, stride_qb, stride_qs, stride_qh,
               stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh, S, H, G, D, stride_pb):
    """(q, dout, lse, delta) of a tile of slot rows: delta = <dout, out> (the softmax-backward row term)."""
    rows = _slot_rows(Pos, Used, b, offs_g, G, stride_pb)
    q = load_rows(Q + batch_head_offset(pid_bh, H, stride_qb, stride_qh), rows, S, stride_qs, offs_d, D)
    do = load_rows(DO + batch_head_offset(pid_bh, H, stride_dob, stride_doh), rows, S, stride_dos, offs_d, D)
    o = load_rows(Out + batch_head_offset(pid_bh, H, stride_ob, stride_oh), rows, S, stride_os, offs_d, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(GLse + pid_bh.to(tl.int64) * G + offs_g, mask=offs_g < G, other=float("inf"))
    return q, do, tl.where(rows >= 0, lse, float("inf")), delta


@triton.jit
def split_program(
    pid_g, pid_bh, split, n_slot_tiles, n_bh, Q, K, V, DO, Out, GLse, Pos, Used, KMask, PartO, PartL,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh,
    S, H, G, D, scale, keys_per_split, stride_pb, Rng, drop_thresh, drop_scale, KRange, TBounds,
    BACKWARD: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RANGES: tl.constexpr = False,
):
    """Key chunk ``split`` of slot tile ``pid_g`` (of ``n_slot_tiles``) of ``pid_bh`` = b * H + h (of ``n_bh``), written
    as float32 partials at [split, b * H + h, g].

    Forward: PartO = the chunk's softmax-weighted values (normalised within the chunk), PartL = its log-sum-exp
    (-inf without a key). Backward (reads DO, Out, GLse): PartO = the chunk's dS @ k (unscaled), for dq.
    HAS_RANGES: ``TBounds`` holds the union of each slot tile's used slots' ranges (``_common.tile_bounds``), read
    as two scalars (a reduction here would cost registers in the loop).
    """
    b = (pid_bh // H).to(tl.int64)
    offs_g = pid_g * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if BACKWARD:
        q, do, lse, delta = _slot_tile(Q, DO, Out, GLse, Pos, Used, pid_bh, b, offs_g, offs_d, stride_qb,
                                       stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_ob,
                                       stride_os, stride_oh, S, H, G, D, stride_pb)
    else:
        rows = _slot_rows(Pos, Used, b, offs_g, G, stride_pb)
        q = load_rows(Q + batch_head_offset(pid_bh, H, stride_qb, stride_qh), rows, S, stride_qs, offs_d, D)
    k_base = K + batch_head_offset(pid_bh, H, stride_kb, stride_kh)
    v_base = V + batch_head_offset(pid_bh, H, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    j_lo = split * keys_per_split
    j_hi = tl.minimum(j_lo + keys_per_split, S)
    n_begin = j_lo
    n_end = j_hi
    if HAS_RANGES:  # only the chunk's key tiles that meet the used slots' ranges (tiles stay BLOCK_N-aligned)
        bounds = TBounds + (b * n_slot_tiles + pid_g) * 8  # the slot tile's union (_common.tile_bounds)
        t0, t1 = range_tiles(0, tl.cdiv(j_hi - j_lo, BLOCK_N), j_lo, tl.load(bounds), tl.load(bounds + 1), BLOCK_N)
        n_begin = j_lo + t0 * BLOCK_N
        n_end = tl.minimum(j_lo + t1 * BLOCK_N, j_hi)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + offs_n
        k = load_rows(k_base, cols, S, stride_ks, offs_d, D)
        v = load_rows(v_base, cols, S, stride_vs, offs_d, D)
        s = _key_scores(q, k, cols, j_hi, KMask + b * S, scale, HAS_KMASK, DOT_PREC)
        if HAS_RANGES:  # reloaded (cached) rather than kept live through the loop
            s = range_mask(s, cols[None, :], *load_ranges(KRange + b * 2 * G, offs_g, offs_g < G, S))
        z = s
        if HAS_DROPOUT:  # n0 = split * keys_per_split + a multiple of BLOCK_N: aligned
            z = _keep_scale(Rng, pid_bh, offs_g, n0, drop_thresh, drop_scale, BLOCK_N)
        if BACKWARD:  # lse = +inf (unused slot, no key): p = 0
            acc += tl.dot(ds_tile(s, z, v, do, lse, delta, HAS_DROPOUT, DOT_PREC).to(k.dtype), k,
                          input_precision=DOT_PREC)
        else:
            m_i, l_i, acc = softmax_step(s, z, v, m_i, l_i, acc, HAS_DROPOUT, DOT_PREC)
    part = (split * n_bh + pid_bh).to(tl.int64) * G + offs_g  # (splits, B * H, G) row index
    ok = offs_g < G
    if BACKWARD:
        tl.store(PartO + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=ok[:, None])
    else:
        has_key = l_i > 0.0
        tl.store(PartO + part[:, None] * BLOCK_D + offs_d[None, :], acc / tl.where(has_key, l_i, 1.0)[:, None],
                 mask=ok[:, None])
        tl.store(PartL + part, tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf")),
                 mask=ok)


@triton.jit
def combine_when_last(
    pid_g, pid_bh, n_slot_tiles, n_bh, Counter, splits, PartO, PartL, Pos, Used, Res, GLse, stride_rb, stride_rs,
    stride_rh, S, H, G, D, stride_pb, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """After a forward ``split_program`` of the fused launch (no combine launch): the last of the ``splits`` programs of
    its slot tile to arrive merges them all (``combine_program``, in split order: deterministic whatever the arrival
    order); ``Counter``: int32 (B * H, n_slot_tiles), zeroed before the launch (each call has its own).

    The release / acquire pair orders the partials: every thread's stores precede the barrier, the barrier precedes
    the releasing increment, and the last program's acquiring increment precedes its (L2-only) loads of them. No
    program waits for another, so any schedule completes."""
    tl.debug_barrier()
    ticket = Counter + pid_bh.to(tl.int64) * n_slot_tiles + pid_g
    arrived = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        combine_program(pid_g, pid_bh, n_bh, PartO, PartL, Pos, Used, Res, GLse, stride_rb, stride_rs, stride_rh, S,
                        H, G, D, splits, 1.0, stride_pb, False, BLOCK_M, BLOCK_D)


@triton.jit
def _split_kernel(
    Q, K, V, DO, Out, GLse, Pos, Used, KMask, PartO, PartL,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh,
    S, H, G, D, scale, keys_per_split, stride_pb, Rng, drop_thresh, drop_scale, KRange, TBounds,
    BACKWARD: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RANGES: tl.constexpr = False,
):
    """``split_program`` of grid (slot tiles, B * H, splits)."""
    split_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(1),
                  Q, K, V, DO, Out, GLse, Pos, Used, KMask, PartO, PartL,
                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh,
                  S, H, G, D, scale, keys_per_split, stride_pb, Rng, drop_thresh, drop_scale, KRange, TBounds,
                  BACKWARD, HAS_KMASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, HAS_DROPOUT, HAS_RANGES)


@triton.jit
def slot_key_grads(
    k, v, n0, dk, dv, pid_bh, Q, DO, Out, GLse, Pos, Used, KMask, KRange,
    stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh,
    S, H, G, D, scale, stride_pb, Rng, drop_thresh, drop_scale,
    HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_RANGES: tl.constexpr,
):
    """``(dk, dv)`` plus the gradients of key tile ``[n0, n0 + BLOCK_N)`` (its rows ``k``, ``v``) over every slot query
    of ``pid_bh`` (float32, dk unscaled): the slot tiles in order, so the sum is deterministic.
    With HAS_RANGES the slot tiles at either end whose ranges all miss the key tile are skipped (unused slots'
    ranges count here: they only make the walk longer, their lse = +inf gives them no gradient)."""
    b = (pid_bh // H).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, k.shape[1])
    g_begin = 0
    g_end = G
    if HAS_RANGES:
        t0, t1 = trim_row_tiles(KRange + b * 2 * G, tl.full([], 0, tl.int32), tl.cdiv(G, BLOCK_M), 0, G, n0,
                                n0 + BLOCK_N, S, BLOCK_M)
        g_begin = t0 * BLOCK_M
        g_end = t1 * BLOCK_M
    for g0 in range(g_begin, g_end, BLOCK_M):
        offs_g = g0 + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _slot_tile(Q, DO, Out, GLse, Pos, Used, pid_bh, b, offs_g, offs_d, stride_qb,
                                       stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_ob,
                                       stride_os, stride_oh, S, H, G, D, stride_pb)
        s = _key_scores(q, k, cols, S, KMask + b * S, scale, HAS_KMASK, DOT_PREC)
        if HAS_RANGES:
            s = range_mask(s, cols[None, :], *load_ranges(KRange + b * 2 * G, offs_g, offs_g < G, S))
        z = s
        if HAS_DROPOUT:
            z = _keep_scale(Rng, pid_bh, offs_g, n0, drop_thresh, drop_scale, BLOCK_N)
        dk, dv = kv_grad_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT, DOT_PREC)
    return dk, dv


@triton.jit
def _keys_kernel(
    Q, K, V, DO, Out, GLse, Pos, Used, KMask, DK, DV, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh, stride_gb, stride_gs, stride_gh,
    S, H, G, D, scale, stride_pb, Rng, drop_thresh, drop_scale, KRange,
    ADD_DK: tl.constexpr, ADD_DV: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RANGES: tl.constexpr = False,
    ZERO_DQ: tl.constexpr = False,
):
    """dk, dv of key tile ``[n0, n0 + BLOCK_N)`` over every slot query (``slot_key_grads``); added to DK / DV with
    ADD_DK / ADD_DV. With ZERO_DQ the tile's rows of DQ (DK's layout) are zeroed: a new dq for the global projections,
    whose global rows ``_combine_kernel`` writes afterwards (so no separate fill kernel)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(K + batch_head_offset(pid_bh, H, stride_kb, stride_kh), cols, S, stride_ks, offs_d, D)
    v = load_rows(V + batch_head_offset(pid_bh, H, stride_vb, stride_vh), cols, S, stride_vs, offs_d, D)
    dk, dv = slot_key_grads(k, v, n0, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32),
                            tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), pid_bh, Q, DO, Out, GLse, Pos, Used,
                            KMask, KRange, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                            stride_ob, stride_os, stride_oh, S, H, G, D, scale, stride_pb, Rng, drop_thresh,
                            drop_scale, HAS_KMASK, BLOCK_M, BLOCK_N, DOT_PREC, HAS_DROPOUT, HAS_RANGES)
    dk = dk * scale
    out_offset = batch_head_offset(pid_bh, H, stride_gb, stride_gh)
    if ADD_DK:
        dk += load_rows(DK + out_offset, cols, S, stride_gs, offs_d, D).to(tl.float32)
    if ADD_DV:
        dv += load_rows(DV + out_offset, cols, S, stride_gs, offs_d, D).to(tl.float32)
    store_rows(DK + out_offset, dk, cols, S, stride_gs, offs_d, D)
    store_rows(DV + out_offset, dv, cols, S, stride_gs, offs_d, D)
    if ZERO_DQ:
        store_rows(DQ + out_offset, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), cols, S, stride_gs, offs_d, D)


# --------------------------------------------------------------------------------------------------------
# launchers (the global-rows contract of longattn.backends._longformer)
# --------------------------------------------------------------------------------------------------------


def _used_u8(used):
    if not used.is_contiguous():
        raise ValueError("used: expected a contiguous (B, G) bool tensor")
    return used.view(torch.uint8)


def _plan(q, G, slot_block=None):
    """(tiles (BLOCK_M, BLOCK_N, warps), slot tiles, splits, keys per split) for G slots over S keys; BLOCK_M =
    ``slot_block`` when given."""
    B, S, H, D = q.shape
    return _sized_plan(B, S, H, G, slot_block, q.device, attention_tiles(D))


@functools.lru_cache(maxsize=256)  # integer arithmetic on the call's sizes (and the SM count): once per shape
def _sized_plan(B, S, H, G, slot_block, device, tiles):
    BLOCK_M, BLOCK_N, warps = tiles
    BLOCK_M = slot_block or BLOCK_M
    slot_tiles = cdiv(G, BLOCK_M)
    key_tiles = cdiv(S, BLOCK_N)
    splits = split_count(slot_tiles * B * H, key_tiles, device, cap=64)
    keys_per_split = cdiv(key_tiles, splits) * BLOCK_N
    return (BLOCK_M, BLOCK_N, warps), slot_tiles, cdiv(S, keys_per_split), keys_per_split


def forward(q, k, v, pos, used, key_mask, scale, out, dropout_p=0.0, rng=None, key_ranges=None):
    """Rows ``pos`` (used slots) of ``q`` attend every real token of k, v (within ``key_ranges`` (B, G, 2) int32 per
    slot when given); written into ``out``. -> glse (B, H, G)."""
    B, S, H, D = q.shape
    G = pos.shape[1]
    kr, has_kr = range_arg(key_ranges, "key_ranges", (B, G), q)
    (BLOCK_M, BLOCK_N, warps), slot_tiles, splits, keys_per_split = _plan(q, G)
    BLOCK_D = head_dim_block(D)
    used8 = _used_u8(used)
    bounds = tile_bounds(key_ranges if has_kr else None, None, S, 0, BLOCK_M, q, used8)
    part_o = torch.empty(splits, B * H, G, BLOCK_D, dtype=torch.float32, device=q.device)
    part_l = torch.empty(splits, B * H, G, dtype=torch.float32, device=q.device)
    glse = torch.empty(B, H, G, dtype=torch.float32, device=q.device)
    cached(_split_kernel)[(slot_tiles, B * H, splits)](
        q, k, v, q, q, part_l, pos, used8, as_u8(key_mask, used8), part_o, part_l,
        *strides3(q), *strides3(k), *strides3(v), *strides3(q), *strides3(q),
        S, H, G, D, float(scale), keys_per_split, pos.stride(0),
        BACKWARD=False, HAS_KMASK=key_mask is not None, KRange=kr, TBounds=bounds, HAS_RANGES=has_kr,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_PREC=dot_precision(q.dtype), **_dropout_meta(dropout_p, rng, glse), num_warps=warps,
    )
    cached(_combine_kernel)[(slot_tiles, B * H)](
        part_o, part_l, pos, used8, out, glse, *strides3(out), S, H, G, D, splits, 1.0, pos.stride(0),
        BACKWARD=False, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    return glse


def backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into, dropout_p=0.0,
             rng=None, key_ranges=None):
    """-> (dq, dk, dv) of ``forward``, each added into the given ``*_into`` tensor (and returned) or new."""
    B, S, H, D = q.shape
    G = pos.shape[1]
    kr, has_kr = range_arg(key_ranges, "key_ranges", (B, G), q)
    (BLOCK_M, BLOCK_N, warps), slot_tiles, splits, keys_per_split = _plan(q, G)
    BLOCK_D = head_dim_block(D)
    used8 = _used_u8(used)
    kmask = as_u8(key_mask, used8)
    common = (*strides3(q), *strides3(k), *strides3(v), *strides3(dout), *strides3(out))
    meta = dict(HAS_KMASK=key_mask is not None, KRange=kr, HAS_RANGES=has_kr, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_D=BLOCK_D,
                DOT_PREC=dot_precision(q.dtype), **_dropout_meta(dropout_p, rng, glse), num_warps=warps)
    part_q = torch.empty(splits, B * H, G, BLOCK_D, dtype=torch.float32, device=q.device)
    cached(_split_kernel)[(slot_tiles, B * H, splits)](
        q, k, v, dout, out, glse, pos, used8, kmask, part_q, part_q, *common, S, H, G, D, float(scale),
        keys_per_split, pos.stride(0), BACKWARD=True,
        TBounds=tile_bounds(key_ranges if has_kr else None, None, S, 0, BLOCK_M, q, used8), **meta,
    )
    # dk, dv and a new dq share one set of strides in the kernels: all contiguous (the band backward's or new ones).
    dq, dk, dv = (torch.empty(B, S, H, D, dtype=q.dtype, device=q.device) if into is None else into
                  for into in (dq_into, dk_into, dv_into))
    # The keys pass runs first: it zeroes a new dq's rows, whose global rows the combine then writes.
    cached(_keys_kernel)[(cdiv(S, BLOCK_N), B * H)](
        q, k, v, dout, out, glse, pos, used8, kmask, dk, dv, dq, *common, *strides3(dk), S, H, G, D, float(scale),
        pos.stride(0), ADD_DK=dk_into is not None, ADD_DV=dv_into is not None, ZERO_DQ=dq_into is None, **meta,
    )
    cached(_combine_kernel)[(slot_tiles, B * H)](
        part_q, part_q, pos, used8, dq, glse, *strides3(dq), S, H, G, D, splits, float(scale), pos.stride(0),
        BACKWARD=True, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    return dq, dk, dv


# Slots per tile of the fused roles: G is small (LED's and Longformer's models mark one to a few dozen tokens), so a
# 64-row tile would mostly compute padding rows, and its q / dout / out tiles would cost the band kernels' registers
# (sm_90, D = 128: spills); 16 is tl.dot's minimum.
SLOT_BLOCK = 16


class FusedRows:
    """Longformer's global rows folded into the band pass's launches (``band_side.forward`` / ``backward`` with
    ``fused_rows``), so the op runs the slots kernel and one launch forward, the band's four backward.

    ``q``, ``k``, ``v``: the global projections (or the band's q, k, v); ``pos``, ``used``: the slot layout (the band
    launch's ``side_index`` / side mask); ``key_mask`` (B, S) bool or None: the keys global rows attend;
    ``key_ranges`` (B, G, 2) int32 or None: per-slot ranges, ``range_bounds`` their ``_common.tile_bounds`` per slot
    tile when computed already (``slots.global_slots``). Forward: ``glse`` (B, H, G) and the split partials are
    allocated here; ``counter`` is int32 (B, H * slot tiles), zeroed by the launch before (``slots.global_slots``'s
    ``zero``; ``counter_shape``). Backward (``out``, ``glse`` given): ``new_q`` / ``new_kv`` say whether q / (k, v)
    are separate global projections, whose gradients ``dq``, ``dk``, ``dv`` are then allocated here (else the band's
    receive the global rows' sums)."""

    def __init__(self, q, k, v, pos, used, key_mask, scale, key_ranges=None, *, range_bounds=None, counter=None,
                 out=None, glse=None, new_q=False, new_kv=False):
        B, S, H, D = q.shape
        G = pos.shape[1]
        self.q, self.k, self.v, self.pos, self.used8, self.scale = q, k, v, pos, _used_u8(used), scale
        self.key_mask = as_u8(key_mask, self.used8)
        self.has_kmask = key_mask is not None
        self.kr, self.has_kr = range_arg(key_ranges, "key_ranges", (B, G), q)
        (self.block_m, _, _), self.slot_tiles, self.splits, self.keys_per_split = _plan(q, G, SLOT_BLOCK)
        if range_bounds is None or not self.has_kr:
            self.bounds = tile_bounds(key_ranges if self.has_kr else None, None, S, 0, self.block_m, q, self.used8)
        else:
            self.bounds = check_bounds(range_bounds, B, G, self.block_m, q)
        f32 = dict(dtype=torch.float32, device=q.device)
        self.part_o = torch.empty(self.splits, B * H, G, head_dim_block(D), **f32)
        self.glse = torch.empty(B, H, G, **f32) if glse is None else glse
        self.part_l = self.part_o if glse is not None else torch.empty(self.splits, B * H, G, **f32)
        self.counter, self.out = counter, out
        self.dq = torch.empty_like(q, memory_format=torch.contiguous_format) if new_q else None
        self.dk, self.dv = ((torch.empty_like(x, memory_format=torch.contiguous_format) for x in (k, v)) if new_kv
                            else (None, None))

    @staticmethod
    def counter_shape(q, G: int) -> tuple[int, int]:
        B, S, H, D = q.shape
        return B, H * cdiv(G, SLOT_BLOCK)  # (B * H, slot tiles) as (B, H * slot tiles): zeroed per batch row

    @functools.cached_property
    def _inputs(self) -> dict:
        """The global rows' keywords both band kernels take (the backward's two launches share them)."""
        return dict(QG=self.q, KG=self.k, VG=self.v, **_named_strides("qg", self.q), **_named_strides("kg", self.k),
                    **_named_strides("vg", self.v), GLse=self.glse, GKMask=self.key_mask, GKRange=self.kr,
                    HAS_GKMASK=self.has_kmask, HAS_GRANGES=self.has_kr)

    def role(self, backward: bool) -> dict:
        """``band_side._rows_kernel``'s keywords: the split-KV programs leading its grid (forward: merged by the last
        to finish, into ``out`` and ``glse``; backward: partial dq, which ``row_sums`` finishes)."""
        return dict(GLOBAL_ROWS=True, n_lead=self.slot_tiles * self.splits, n_slot_tiles=self.slot_tiles,
                    PartO=self.part_o, PartL=self.part_l, keys_per_split=self.keys_per_split, splits=self.splits,
                    SLOT_BLOCK=SLOT_BLOCK,
                    **({} if backward else dict(Counter=self.counter)), GTBounds=self.bounds, **self._inputs)

    def keys_role(self) -> dict:
        """``band_side._keys_kernel``'s keywords (band keys): the key tiles' gradients over the global queries."""
        dummy = self.q
        new_q, new_kv = self.dq is not None, self.dk is not None
        return dict(GLOBAL_ROWS=True, GLOBAL_SEPARATE=new_kv, ZERO_DQG=new_q, Out=self.out, SLOT_BLOCK=SLOT_BLOCK,
                    **_named_strides("o", self.out), DKG=self.dk if new_kv else dummy,
                    DVG=self.dv if new_kv else dummy, DQG=self.dq if new_q else dummy, **self._inputs)

    def row_sums(self, dq):
        """The reduction's share (``bias_grad.RowSums``): the partial dq summed into the global rows of the new dq, or
        of the band's ``dq``."""
        from .bias_grad import RowSums

        return RowSums(self.part_o, self.pos, self.used8, dq if self.dq is None else self.dq, self.scale)


def _named_strides(name: str, x) -> dict:
    """{stride_<name>b, stride_<name>s, stride_<name>h: x's (batch, sequence, head) strides}."""
    return dict(zip(_stride_names(name), strides3(x)))


@functools.cache
def _stride_names(name: str) -> tuple[str, str, str]:
    return f"stride_{name}b", f"stride_{name}s", f"stride_{name}h"
