"""Fused band + side-keys attention (DESIGN.md section 1): forward, dQ, and dK/dV kernels.

Kernels:

- ``_rows_kernel``: one program per (query tile, batch * head). It walks the key tiles of its band, then the
  side-key tiles (SIDE_N keys wide: ``_common.side_tiles``, 16 for up to 16 side keys without a side bias, else
  BLOCK_N), in one loop structure; ``BACKWARD`` picks the per-tile step: the online softmax (forward,
  saving the row log-sum-exp) or the dQ accumulation (backward). Its backward also computes and stores its rows'
  ``delta = rowsum(dout * out)`` (minus the lse gradient), the row term the dK/dV passes read.
- ``_keys_kernel``: one program per (key tile, batch * head), walking the query tiles that see it and
  accumulating dK and dV in registers, so no atomics. With ``SIDE`` its key tile is a side-key tile (the forward's
  side tile width, ``_common.side_tiles``) and it walks its share of the query tiles (each query attends every side
  key; see ``backward``). With a bias table it also sums each (query tile, key tile)'s dS by table entry
  (``bias_grad``: float32 partial rows, one per (program, head)); the side pass's programs own runs of side-key
  tiles when one row per tile would not fit ``_common.partial_programs``' budget (PERSISTENT).

The backward's float32 partials (bias-table rows, side keys' dK/dV per query chunk) are summed in a fixed order
by one launch of ``bias_grad.reduce_partials``: a backward launches at most four kernels and no torch op.

With ``side_index`` (constexpr ``SIDE_INDEX``; Longformer's global tokens) side key g of batch row b is token
``side_index[b, g]`` of k/v, read in place instead of from a gathered (B, G, H, D) copy.

All kernels use the score helpers of ``_common``. Layouts: q, k, v,
dout (B, S, H, D) and side_k, side_v (B, G, H, D) with any strides and a unit last stride (strides are passed
to the kernels, no copies); out, dq, dk, dv, dside_k, dside_v are written contiguous; lse and delta are
contiguous float32 (B, H, S).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import bias_grad, global_rows
from ._common import (
    as_u8,
    band_bias,
    band_scores,
    band_tile_interior,
    batch_head_offset,
    bias_acc,
    cdiv,
    check_bounds,
    dlse_args,
    ds_tile,
    halo_args,
    halo_excluded,
    halo_grad_args,
    halo_row,
    kv_grad_ds_step,
    launch_tiles,
    load_halo_rows,
    load_query_block,
    load_ranges,
    load_rows,
    partial_programs,
    range_arg,
    range_mask,
    range_tiles,
    ranged_scores,
    side_bias,
    side_scores,
    softmax_step,
    split_count,
    store_rows,
    strides3,
    tile_bounds,
    trim_row_tiles,
)
from ._dropout import check_offset, keep_scale_tile
from ._dropout import kernel_args as _dropout_meta
from ._launch import cached
from .bias_grad import chain_add, chain_flush, shifted_column_sums, zero_fill


@triton.jit
def kv_program(pid_bh, H, GROUP):
    """The (batch, K/V head) index, over ``B * H // GROUP``, of the (batch, query head) index ``pid_bh`` over
    ``B * H`` (grouped-query attention: query head h reads K/V head ``h // GROUP``)."""
    return (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP


@triton.jit
def _keep_scale(Rng, bh, rows, n0, drop_thresh, drop_scale, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
                SIDE: tl.constexpr, drop_offset, HAS_DOFFSET: tl.constexpr):
    """Dropout factors of a band (or, with SIDE, side-key) tile: ``_dropout.keep_scale_tile`` of query rows ``rows``
    (the bits of ``longattn._dropout``'s layout, so the forward, dQ and dK/dV kernels and every backend agree).
    ``ALIGNED``: ``n0 % 4 == 0`` (one Philox call per 4 keys; else one per key).

    HAS_DOFFSET (``notes/halo_contract.md`` section 3): rows and band keys are drawn ``drop_offset`` further on (a
    sequence-parallel shard's start, a multiple of 4: aligned tiles stay aligned); side keys keep their ids."""
    if HAS_DOFFSET:
        rows = rows + drop_offset
        if not SIDE:
            n0 = n0 + drop_offset
    return keep_scale_tile(Rng, bh, rows, n0, drop_thresh, drop_scale, BLOCK_N, ALIGNED, SIDE, False)


@triton.jit
def _rows_step(s, z, k, v, do, lse, delta, m_i, l_i, acc, BACKWARD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One key tile of a query tile: online-softmax update (forward) or dQ accumulation (backward).
    -> (m_i, l_i, acc)."""
    if BACKWARD:
        ds = ds_tile(s, z, v, do, lse, delta, HAS_DROPOUT, DOT_PREC)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    else:
        m_i, l_i, acc = softmax_step(s, z, v, m_i, l_i, acc, HAS_DROPOUT, DOT_PREC)
    return m_i, l_i, acc


@triton.jit
def side_rows(sidx_ptr, g, G, SIDE_INDEX: tl.constexpr):
    """K/V rows of side keys ``g``: ``sidx_ptr[g]`` (this batch row of ``side_index``) with SIDE_INDEX, else g.
    Index values are not checked (that would sync): ``load_rows`` reads rows outside the tensor as zeros."""
    rows = g
    if SIDE_INDEX:
        rows = tl.load(sidx_ptr + g, mask=(g >= 0) & (g < G), other=-1)
    return rows


@triton.jit
def _side_tile(q, g0, sk_base, sv_base, stride_sks, stride_svs, qblock, sbias_ptr, smask_ptr, sidx_ptr, n_side, G, D,
               scale, inv_scale, HAS_SBIAS: tl.constexpr, HAS_SMASK: tl.constexpr, SIDE_INDEX: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_ACC: tl.constexpr):
    """(k, v, scores) of side keys ``[g0, g0 + BLOCK_N)`` against the query tile ``q`` (qblock: its (BLOCK_M, 1)
    block ids); the scores are masked (g < G, side_mask). With SIDE_INDEX side key g is row ``sidx_ptr[g]`` of the
    ``n_side``-row K/V (``side_rows``); else row g. BIAS_ACC: the side table enters through the product's
    accumulator, its entries times ``inv_scale`` = 1 / scale (``_common.BIAS_ACC_MIN_SCALE``)."""
    g = g0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = side_rows(sidx_ptr, g, G, SIDE_INDEX)
    k = load_rows(sk_base, rows, n_side, stride_sks, offs_d, D)
    v = load_rows(sv_base, rows, n_side, stride_svs, offs_d, D)
    if HAS_SBIAS and BIAS_ACC:
        qk = tl.dot(q, tl.trans(k), acc=side_bias(sbias_ptr, qblock, g[None, :], G) * inv_scale,
                    input_precision=DOT_PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = side_scores(qk, qblock, g[None, :], G, scale, sbias_ptr, smask_ptr, HAS_SBIAS and not BIAS_ACC, HAS_SMASK)
    return k, v, s


@triton.jit
def _side_span(bounds, G, BLOCK_N: tl.constexpr):
    """(g_begin, g_end): the side tiles ``[g_begin, g_end)`` (steps of BLOCK_N from a multiple of it) that meet the
    union of the query tile's side ranges (``bounds``: its row of ``_common.tile_bounds``)."""
    gt_lo, gt_hi = range_tiles(0, tl.cdiv(G, BLOCK_N), 0, tl.load(bounds + 4), tl.load(bounds + 5), BLOCK_N)
    return gt_lo * BLOCK_N, tl.minimum(gt_hi * BLOCK_N, G)


@triton.jit
def _row_delta(do, o_base, offs_m, S, stride_os, offs_d, D, lse, DLse, stat_ptrs, HAS_DLSE: tl.constexpr):
    """(BLOCK_M,) float32 ``delta = <do, out>`` of rows ``offs_m`` (0 past S), the softmax-backward row term.

    HAS_DLSE: minus ``DLse[stat_ptrs]``, the loss's gradient w.r.t. the row's log-sum-exp: dS = P * (dP - delta +
    dlse), so every pass reading delta takes the lse gradient with it. Rows with lse = +inf (no key) keep delta:
    their P is 0, and a NaN or inf there must not reach 0 * NaN."""
    o = load_rows(o_base, offs_m, S, stride_os, offs_d, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        dlse = tl.load(DLse + stat_ptrs, mask=offs_m < S, other=0.0)
        delta -= tl.where(lse < float("inf"), dlse, 0.0)
    return delta


@triton.jit
def _slot_row(band_ptr, pos_ptr, used_ptr, rows, row_ok, real, G):
    """(BLOCK_M,) bool: rows ``rows`` of a batch row hold one of its used global slots. The slots hold the row's
    first globals in sequence order (``global_rows``' layout), so a global row (real, not a band row) is in one
    unless all G slots are used and it lies beyond the last slot's position."""
    glob = real & (tl.load(band_ptr + rows, mask=row_ok, other=1) == 0)
    all_used = tl.load(used_ptr + G - 1) != 0
    return glob & ((all_used == 0) | (rows <= tl.load(pos_ptr + G - 1)))


@triton.jit
def _rows_kernel(
    Q, K, V, SK, SV, DO, Out, Res, Lse, Delta, KMask, SMask, QBlock, BBias, SBias, SIdx, QMask,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_skb, stride_sks, stride_skh, stride_svb, stride_svs, stride_svh,
    stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh, stride_rb, stride_rs, stride_rh, stride_ib,
    S, H, GROUP, G, D, left, right, scale, Rng, drop_thresh, drop_scale, KRange, SRange, TBounds,
    BACKWARD: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SMASK: tl.constexpr, HAS_BBIAS: tl.constexpr,
    HAS_SBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr, SIDE_INDEX: tl.constexpr = False,
    HAS_QMASK: tl.constexpr = False, KMASK_ROWS: tl.constexpr = False, HAS_KRANGES: tl.constexpr = False,
    HAS_SRANGES: tl.constexpr = False, HAS_HALO: tl.constexpr = False, HAS_HMASK: tl.constexpr = False,
    HALO_ALIGN: tl.constexpr = 1, HK=None, HV=None, HMask=None, stride_hkb=None, stride_hks=None, stride_hkh=None,
    stride_hvb=None, stride_hvs=None, stride_hvh=None, n_halo=None, halo_left=None, key_lo=None, key_hi=None,
    HAS_DOFFSET: tl.constexpr = False, drop_offset=None, HAS_DLSE: tl.constexpr = False, DLse=None,
    GLOBAL_ROWS: tl.constexpr = False, n_lead=None, n_slot_tiles=None, QG=None, KG=None, VG=None, stride_qgb=None,
    stride_qgs=None, stride_qgh=None, stride_kgb=None, stride_kgs=None, stride_kgh=None, stride_vgb=None,
    stride_vgs=None, stride_vgh=None, GLse=None, PartO=None, PartL=None, Counter=None, GKMask=None, GKRange=None,
    GTBounds=None, keys_per_split=None, splits=None, HAS_GKMASK: tl.constexpr = False,
    HAS_GRANGES: tl.constexpr = False, SLOT_BLOCK: tl.constexpr = 16,
    SIDE_N: tl.constexpr = 0, BIAS_ACC: tl.constexpr = False,
):
    """Forward (Res = out, writes Lse) or dQ (Res = dq, reads DO, Out, Lse, writes Delta) of one query tile.

    The backward first computes its rows' ``delta = rowsum(DO * Out)`` (``_row_delta``; HAS_DLSE: minus ``DLse``,
    float32 (B, H, S) like Lse) and stores it into Delta (float32 (B, H, S)) for the dK/dV passes launched after
    it: the query tiles of the grid cover every row [0, S) of every (b, h), and no program returns early.

    The bias tables' gradients are not summed here (the dK/dV passes do it, ``bias_grad``): with or without the
    tables the dQ kernel stays within 128 registers at 8 warps on sm_90 (two programs per SM; the cost test,
    ``tests/test_triton_bias_cost.py``); the forward and, without dropout, the dQ are launched capped there
    (``_common.rows_cap``). Grouped-query attention: K, V, SK, SV have ``H // GROUP`` heads; query head h reads K/V
    head ``h // GROUP``.

    SIDE_INDEX: SK, SV are (B, S, H // GROUP, D) (the band K, V) and side key g of batch row b is row
    ``SIdx[b, g]`` (rows ``stride_ib`` apart), read in place. Forward only: with HAS_QMASK rows i where
    ``QMask[b, i]`` (uint8) is 0 store out = 0; with KMASK_ROWS rows that are not band keys (``KMask[b, i]`` 0)
    store lse = +inf, so the backward gives them no gradient (Longformer's padding and global rows).

    HAS_KRANGES / HAS_SRANGES: row i of batch row b attends band keys in ``[KRange[b, i, 0], KRange[b, i, 1])`` /
    side keys in ``[SRange[b, i, 0], SRange[b, i, 1])`` only (contiguous int32 (B, S, 2)). The tile loops visit
    only the key / side tiles that meet the union of the tile's rows' ranges (``range_tiles``; the union and
    the cover of each query tile are precomputed in ``TBounds``, ``_common.tile_bounds``); band tiles not inside
    every row's range get the per-element mask (``ranged_scores``), side tiles all get it.

    HAS_HALO (``notes/halo_contract.md``): band keys ``j`` in ``[key_lo, key_hi)`` (local numbering, the part of
    ``[-halo_left, S + n_halo - halo_left)`` any query reaches), rows outside ``[0, S)`` read in place from HK, HV
    (B, n_halo, H // GROUP, D) (``_common.load_halo_rows``), their mask from HMask (B, n_halo) uint8 (HAS_HMASK).
    The key-tile walk covers those keys; tiles reaching outside ``[0, S)`` are edge tiles, interior ones unchanged.
    The halo arguments default to None (compile-time constants): without a halo the kernel is compiled as before.

    HAS_DOFFSET (with HAS_DROPOUT; ``notes/halo_contract.md`` section 3): query row i draws the dropout bits of row
    ``i + drop_offset`` and band key j (halo keys included, local j) those of key ``j + drop_offset``; side keys keep
    theirs. Off (``drop_offset`` None, a compile-time constant) the kernels compile exactly as without it.

    GLOBAL_ROWS (Longformer, with SIDE_INDEX: SIdx = the slots' positions, SMask = their ``used``): the first
    ``n_lead`` programs of axis 0 are the global rows' split-KV programs (``global_rows.split_program``, slot tile
    ``pid % n_slot_tiles`` of SLOT_BLOCK slots, key chunk ``pid // n_slot_tiles``; the longest programs first) over
    QG, KG, VG (the global
    projections, or q, k, v), key mask GKMask (the padding mask, HAS_GKMASK), per-slot ranges GKRange / GTBounds
    (HAS_GRANGES). Forward: each writes its partials into PartO / PartL and the last of a slot tile's ``splits``
    merges them into Res and GLse (``global_rows.combine_when_last``, Counter zeroed before the launch), and the
    band programs leave the used slots' rows of Res to it. Backward: partial dq into PartO (summed by the reduction).

    SIDE_N: the side tiles' width (``_common.side_tiles``: narrower than BLOCK_N for a few side keys); 0 (the
    default) means BLOCK_N. With HAS_SBIAS it must be BLOCK_N: the side dK/dV pass, whose key tile is the side tile,
    sums dS by side-bias entry in BLOCK_N-wide tiles (narrow tiles with a side bias are not built or tested).
    """
    SN: tl.constexpr = SIDE_N if SIDE_N > 0 else BLOCK_N
    if HAS_SBIAS:
        tl.static_assert(SN == BLOCK_N, "a side bias table needs SIDE_N == BLOCK_N")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_tiles = tl.num_programs(0)  # query tiles
    if GLOBAL_ROWS:
        n_tiles -= n_lead
        if pid_m < n_lead:
            pid_g = pid_m % n_slot_tiles
            split = pid_m // n_slot_tiles
            global_rows.split_program(
                pid_g, pid_bh, split, n_slot_tiles, tl.num_programs(1), QG, KG, VG, DO, Out, GLse, SIdx, SMask, GKMask,
                PartO, PartL, stride_qgb, stride_qgs, stride_qgh, stride_kgb, stride_kgs, stride_kgh, stride_vgb,
                stride_vgs, stride_vgh, stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh, S, H, G, D,
                scale, keys_per_split, stride_ib, Rng, drop_thresh, drop_scale, GKRange, GTBounds, BACKWARD,
                HAS_GKMASK, SLOT_BLOCK, BLOCK_N, BLOCK_D, DOT_PREC, HAS_DROPOUT, HAS_GRANGES)
            if not BACKWARD:
                global_rows.combine_when_last(pid_g, pid_bh, n_slot_tiles, tl.num_programs(1), Counter, splits, PartO,
                                              PartL, SIdx, SMask, Res, GLse, stride_rb, stride_rs, stride_rh, S, H, G,
                                              D, stride_ib, SLOT_BLOCK, BLOCK_D)
            return
        pid_m -= n_lead
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m_tile = pid_m
    m0 = m_tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None]
    row_ok = offs_m < S
    # With a bias table the tile loops keep their loop-invariant values inside (no LICM): hoisted, the tables'
    # index tensors stay live through the loop (sm_90 D = 64, LongT5 shape: the dQ kernel 144 registers against
    # 128, one program per SM instead of two; see tests/test_triton_bias_cost.py). Off, the loops compile as before.
    NO_LICM: tl.constexpr = BACKWARD and (HAS_BBIAS or HAS_SBIAS)

    q = load_rows(Q + batch_head_offset(pid_bh, H, stride_qb, stride_qh), offs_m, S, stride_qs, offs_d, D)
    pid_kv = kv_program(pid_bh, H, GROUP)
    k_base = K + batch_head_offset(pid_kv, H // GROUP, stride_kb, stride_kh)
    v_base = V + batch_head_offset(pid_kv, H // GROUP, stride_vb, stride_vh)
    stat_ptrs = pid_bh.to(tl.int64) * S + offs_m  # (B, H, S) contiguous statistics
    do = q  # unused in the forward
    lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = lse
    if BACKWARD:
        do = load_rows(DO + batch_head_offset(pid_bh, H, stride_dob, stride_doh), offs_m, S, stride_dos, offs_d, D)
        lse = tl.load(Lse + stat_ptrs, mask=row_ok, other=float("inf"))
        delta = _row_delta(do, Out + batch_head_offset(pid_bh, H, stride_ob, stride_oh), offs_m, S, stride_os,
                           offs_d, D, lse, DLse, stat_ptrs, HAS_DLSE)
        tl.store(Delta + stat_ptrs, delta, mask=row_ok)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Band key tiles start at m0 - left (see _common); skip those wholly outside [0, S) (with a halo: outside the
    # reachable keys [key_lo, key_hi)). With dropout they start at the multiple of 4 at or below it instead, so the
    # keep bits take one Philox call per 4 keys (``_dropout.keep_tile_aligned``), not one per key: the same bits, at a
    # tile more for some query tiles (sm_90, D = 64, bf16, windows 127 and 256, Triton 3.6 / 3.8: band loop 1340 /
    # 1337 -> 691 / 683 SASS instructions per tile in the forward, 2326 / 1328 -> 690 / 691 in the dQ; not timed).
    n_start = m0 - left
    if HAS_DROPOUT:
        n_start -= n_start & 3
    band_row = BBias + h * (left + right + 1)  # this head's band_bias entries
    inv_scale = scale  # unused without BIAS_ACC (whose launches have a finite 1 / scale)
    if BIAS_ACC:
        inv_scale = 1.0 / scale
    halo = None
    if HAS_HALO:
        hk_base = HK + batch_head_offset(pid_kv, H // GROUP, stride_hkb, stride_hkh)
        hv_base = HV + batch_head_offset(pid_kv, H // GROUP, stride_hvb, stride_hvh)
        halo = (key_lo, key_hi, HMask + b * n_halo, halo_left)
        t_lo = tl.maximum(0, key_lo - n_start) // BLOCK_N
        t_hi = (tl.minimum(key_hi - 1, m0 + BLOCK_M - 1 + right) - n_start) // BLOCK_N + 1
    else:
        t_lo = tl.maximum(0, -n_start) // BLOCK_N
        t_hi = (tl.minimum(S - 1, m0 + BLOCK_M - 1 + right) - n_start) // BLOCK_N + 1
    bounds = TBounds + (b * n_tiles + m_tile) * 8  # this tile's row of _common.tile_bounds
    if HAS_KRANGES:
        t_lo, t_hi = range_tiles(t_lo, t_hi, n_start, tl.load(bounds), tl.load(bounds + 1), BLOCK_N)
        cover_lo, cover_hi = tl.load(bounds + 2), tl.load(bounds + 3)
    # With a halo, a query tile whose band stays inside [0, S) runs today's loop (part 0: plain loads, no halo
    # mask); one reaching outside (those within left / right of the ends) walks its tiles reading through the halo
    # (part 1).
    # Two loops, one of them empty, rather than one with a per-tile branch or select: the loads stay pipelined and
    # today's loop keeps its instructions (sm_90 SASS, D = 64, all masks and biases: forward 713 -> 717 per tile,
    # dQ without spills inside either loop; the halo loop first spilled inside both).
    for part in tl.static_range(2 if HAS_HALO else 1):
        t_begin = t_lo
        t_end = t_hi
        if HAS_HALO:
            reach_out = (n_start < 0) | (m0 + BLOCK_M - 1 + right >= S)
            if part == 0:
                t_end = tl.where(reach_out, t_lo, t_hi)
            else:
                t_begin = tl.where(reach_out, t_lo, t_hi)
        for t in tl.range(t_begin, t_end, disable_licm=NO_LICM):
            n0 = n_start + t * BLOCK_N
            cols = n0 + offs_n
            if HAS_HALO and part == 1:
                k = load_halo_rows(k_base, hk_base, cols, S, stride_ks, stride_hks, halo, offs_d, D, HALO_ALIGN)
                v = load_halo_rows(v_base, hv_base, cols, S, stride_vs, stride_hvs, halo, offs_d, D, HALO_ALIGN)
            else:
                k = load_rows(k_base, cols, S, stride_ks, offs_d, D)
                v = load_rows(v_base, cols, S, stride_vs, offs_d, D)
            if HAS_BBIAS and BIAS_ACC:
                qk = tl.dot(q, tl.trans(k), acc=band_bias(band_row, rows, cols[None, :], left, right) * inv_scale,
                            input_precision=DOT_PREC)
            else:
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            edge = band_tile_interior(m0, n0, S, left, right, BLOCK_M, BLOCK_N) == 0
            s = band_scores(qk, rows, cols[None, :], edge, S, left, right, scale, band_row, KMask + b * S,
                            HAS_BBIAS and not BIAS_ACC, HAS_KMASK, halo, HAS_HALO and part == 1, HAS_HMASK)
            if HAS_KRANGES:
                s = ranged_scores(s, n0, cols[None, :], KRange + b * 2 * S, offs_m, row_ok, S, cover_lo, cover_hi,
                                  BLOCK_N)
            z = s
            if HAS_DROPOUT:  # n0 % 4 == 0 (n_start above)
                z = _keep_scale(Rng, pid_bh, offs_m, n0, drop_thresh, drop_scale, BLOCK_N, True, False, drop_offset,
                                HAS_DOFFSET)
            m_i, l_i, acc = _rows_step(s, z, k, v, do, lse, delta, m_i, l_i, acc, BACKWARD, HAS_DROPOUT, DOT_PREC)

    # Side keys: extra tiles of the same loop, SN keys wide (always masked: g < G and side_mask).
    qb = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_SBIAS:
        qb = load_query_block(QBlock + b * S, offs_m, row_ok, G)
    sk_base = SK + batch_head_offset(pid_kv, H // GROUP, stride_skb, stride_skh)
    sv_base = SV + batch_head_offset(pid_kv, H // GROUP, stride_svb, stride_svh)
    side = (sk_base, sv_base, stride_sks, stride_svs, qb[:, None], SBias + h * (2 * G + 1), SMask + b * G,
            SIdx + b * stride_ib, S if SIDE_INDEX else G)
    if G > 0:
        g_begin = 0  # side tiles [g_begin, g_end) in steps of SN
        g_end = G
        if isinstance(G, int):  # G == 1 (Longformer's single global token), specialized to a constant by the launch
            # A bound the compiler cannot fold (S > 0 in any launch) keeps the side loop a loop: folded into straight
            # code after the band loop, ptxas serialized every wgmma of the band loop (sm_90, forward and dQ, Triton
            # 3.6 and 3.8: "non wgmma instructions defining accumulator registers"), +24-41 instructions per tile.
            g_end = tl.where(S > 0, G, 0)
        if HAS_SRANGES:
            g_begin, g_end = _side_span(bounds, G, SN)
        # A narrow side tile holds all G side keys: one tile at most, nothing to pipeline (pipelined, its buffers
        # cost the sm_90 dQ kernel 2 registers, Triton 3.8, G = 3: 130, past the two-programs-per-SM 128).
        for g0 in tl.range(g_begin, g_end, SN, disable_licm=NO_LICM, num_stages=1 if SN < BLOCK_N else None):
            k, v, s = _side_tile(q, g0, *side, G, D, scale, inv_scale, HAS_SBIAS, HAS_SMASK, SIDE_INDEX, SN, BLOCK_D,
                                 DOT_PREC, BIAS_ACC)
            if HAS_SRANGES:  # every side tile masked
                s = range_mask(s, (g0 + tl.arange(0, SN))[None, :],
                               *load_ranges(SRange + b * 2 * S, offs_m, row_ok, G))
            z = s
            if HAS_DROPOUT:
                z = _keep_scale(Rng, pid_bh, offs_m, g0, drop_thresh, drop_scale, SN, True, True, drop_offset,
                                HAS_DOFFSET)
            m_i, l_i, acc = _rows_step(s, z, k, v, do, lse, delta, m_i, l_i, acc, BACKWARD, HAS_DROPOUT, DOT_PREC)

    res_base = Res + batch_head_offset(pid_bh, H, stride_rb, stride_rh)
    if BACKWARD:
        store_rows(res_base, acc * scale, offs_m, S, stride_rs, offs_d, D)
    else:
        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # a row with no key has acc = 0: out = 0
        out_rows = offs_m
        real = row_ok
        if HAS_QMASK:
            real = tl.load(QMask + b * S + offs_m, mask=row_ok, other=0) != 0
            out = tl.where(real[:, None], out, 0.0)
        if GLOBAL_ROWS:  # a used slot's row is the global rows' (combine_when_last): not stored here
            slot = _slot_row(KMask + b * S, SIdx + b * stride_ib, SMask + b * G, offs_m, row_ok, real, G)
            out_rows = tl.where(slot, -1, offs_m)
        store_rows(res_base, out, out_rows, S, stride_rs, offs_d, D)
        row_lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
        if KMASK_ROWS:
            row_lse = tl.where(tl.load(KMask + b * S + offs_m, mask=row_ok, other=0) != 0, row_lse, float("inf"))
        tl.store(Lse + stat_ptrs, row_lse, mask=row_ok)


@triton.jit
def _keys_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KMask, SMask, QBlock, BBias, SBias, SIdx,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_gb, stride_gs, stride_gh, stride_split, stride_ib,
    S, N, H, GROUP, G, D, left, right, scale, tiles_per_split, Rng, drop_thresh, drop_scale, Ranges,
    SIDE: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SMASK: tl.constexpr, HAS_BBIAS: tl.constexpr,
    HAS_SBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr, SIDE_INDEX: tl.constexpr = False,
    HAS_RANGES: tl.constexpr = False, HAS_HALO: tl.constexpr = False, HAS_HMASK: tl.constexpr = False,
    HALO_ALIGN: tl.constexpr = 1, HK=None, HV=None, HMask=None, stride_hkb=None, stride_hks=None, stride_hkh=None,
    stride_hvb=None, stride_hvs=None, stride_hvh=None, n_halo=None, halo_left=None, key_lo=None, key_hi=None, DHK=None,
    DHV=None, stride_dhb=None, HAS_DOFFSET: tl.constexpr = False, drop_offset=None,
    GLOBAL_ROWS: tl.constexpr = False, GLOBAL_SEPARATE: tl.constexpr = False, QG=None, KG=None, VG=None, Out=None,
    GLse=None, GKMask=None, GKRange=None, DKG=None, DVG=None, DQG=None, stride_qgb=None, stride_qgs=None,
    stride_qgh=None, stride_kgb=None, stride_kgs=None, stride_kgh=None, stride_vgb=None, stride_vgs=None,
    stride_vgh=None, stride_ob=None, stride_os=None, stride_oh=None, HAS_GKMASK: tl.constexpr = False,
    HAS_GRANGES: tl.constexpr = False, ZERO_DQG: tl.constexpr = False, SLOT_BLOCK: tl.constexpr = 16,
    Part=None, part_width=None, PERSISTENT: tl.constexpr = False, KV_STAGES: tl.constexpr = None,
):
    """dK, dV of one tile of N keys (band keys: N = S; side keys with SIDE: N = G) over its query tiles. BLOCK_N keys
    per tile; with SIDE the launcher passes the side tile width (``_common.side_tiles``).

    K, V are the band (B, S, H, D) or side (B, G, H, D) tensors. DK and DV are contiguous, (B, N, H, D) for
    band keys, (splits, B, G, H, D) for side keys, where program (., ., z) sums query tiles
    ``[z * tiles_per_split, (z + 1) * tiles_per_split)`` into slice z (``stride_split`` elements apart).
    With SIDE and SIDE_INDEX, K and V are the band (B, S, H // GROUP, D) tensors and side key g is row
    ``SIdx[b, g]`` (``side_rows``); DK, DV are still per side key.

    Grouped-query attention: K, V, DK, DV have ``H // GROUP`` heads and a program owns one (batch, K/V head);
    it walks the query tiles of each of the GROUP query heads reading that K/V head (one flat loop over
    (head, tile)), summing their dK/dV in registers: deterministic, no atomics, no repeated K/V.

    With the band table (HAS_BBIAS; band keys) or the side table (HAS_SBIAS; SIDE) and ``Part``: each (query tile,
    key tile)'s dS summed by table entry (``bias_grad``) into this program's rows of Part, contiguous float32
    (splits, B, programs, H, part_width) (band: splits = 1), one row per query head of its group, zeroed first. The
    band walk then runs from the last query tile down, so that the entries' base rises by BLOCK_M per tile
    (``chain_add``, the carry reset at each head); the side sums are read-added-written per tile (``side_entry_sums``).
    PERSISTENT (side keys; ``_common.partial_programs``): fewer programs P along axis 0 than side-key tiles; program
    p owns tiles ``[p * n / P, (p + 1) * n / P)`` (n = cdiv(G, BLOCK_N), rounded down), walked in order, one row per
    head for all of them. Off, a program is one key tile, compiled as before. The dQ kernel has no sums: it keeps two
    programs per SM with the tables (``tests/test_triton_bias_cost.py``).

    HAS_RANGES: ``Ranges`` (contiguous int32 (B, S, 2)) holds each query row's band key range, or with SIDE its
    side key range. The query tiles at either end of the walk whose rows' ranges all miss this key tile are
    dropped before it (``trim_row_tiles``); the pairs left are masked per element.

    HAS_HALO (band keys only; the arguments as in ``_rows_kernel``): the programs past the ``cdiv(S, BLOCK_N)`` tiles
    of the S keys own the halo's, ``cdiv(halo_left, BLOCK_N)`` tiles of the left part (keys from -halo_left rounded
    down to a multiple of 4) then those of the right part (keys from S rounded down likewise), and store their dK, dV
    into rows ``_common.halo_row`` of DHK, DHV (contiguous (B, n_halo, H // GROUP, D), batch stride ``stride_dhb``):
    zeros for rows no query reaches.

    HAS_DOFFSET: dropout rows and band keys drawn ``drop_offset`` further on (``_keep_scale``), as in ``_rows_kernel``.

    KV_STAGES: the query-tile loop's software-pipelining depth (None: the launch's num_stages;
    ``_common.launch_tiles``).

    GLOBAL_ROWS (Longformer's band keys, no halo, H_kv = H; SIdx / SMask the slots' positions / ``used``): the key
    tile's gradients over the global queries too (``global_rows.slot_key_grads``, arguments as in ``_rows_kernel``;
    Out, GLse: the forward's out and global lse), summed in registers with the band's: one store, no second pass.
    With GLOBAL_SEPARATE the global keys are KG, VG's: their sums go to DKG, DVG instead. With ZERO_DQG the tile's
    rows of DQG (a new dq of a separate QG, DK's layout) are zeroed for the reduction to add the global rows into.
    """
    pid_p = tl.program_id(0)
    pid_kv = tl.program_id(1)  # (batch, K/V head)
    b = (pid_kv // (H // GROUP)).to(tl.int64)
    pid_q0 = b * H + (pid_kv % (H // GROUP)) * GROUP  # its first query head's (batch, head) program index
    # This pass sums dS by a table's entries into Part (given with the table; None compiles the sums out).
    SUMS: tl.constexpr = (HAS_SBIAS if SIDE else HAS_BBIAS) and Part is not None
    BIAS_L: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N  # bias_grad's skewed tile width
    rows_ptr = Part
    if SUMS:  # the rows of this program's GROUP heads, contiguous in Part (splits, B, programs, H, part_width)
        n_batch = tl.num_programs(1) // (H // GROUP)
        rows_ptr = Part + (((tl.program_id(2) * n_batch + b) * tl.num_programs(0) + pid_p) * H +
                           (pid_q0 - b * H)) * part_width
        zero_fill(rows_ptr, 0, GROUP * part_width, 1024)
        tl.debug_barrier()  # the zeros are visible to every thread before the sums' stores
    first = pid_p  # this program's key tiles: [first, first + n_own)
    n_own = 1
    if PERSISTENT:  # (side keys) one row per head for n_own tiles: each adds its sums into it
        n_key_tiles = tl.cdiv(N, BLOCK_N)
        first = (pid_p.to(tl.int64) * n_key_tiles // tl.num_programs(0)).to(tl.int32)  # balanced to within one tile
        n_own = ((pid_p + 1).to(tl.int64) * n_key_tiles // tl.num_programs(0)).to(tl.int32) - first
    # n_own = 1 (not PERSISTENT): a constant trip count of 1, folded away: the kernel is compiled as without the loop.
    for j in tl.range(0, n_own, disable_licm=True):
        pid_n = first + j
        n0 = pid_n * BLOCK_N
        halo = None
        if HAS_HALO:  # this tile's part of the keys: [part_lo, part_hi), the S keys' or a halo part
            th = pid_n - tl.cdiv(N, BLOCK_N)  # >= 0: a halo tile
            n_left = tl.cdiv(halo_left, BLOCK_N)
            part_lo = tl.where(th < 0, 0, tl.where(th < n_left, -halo_left, S))
            part_hi = tl.where(th < 0, S, tl.where(th < n_left, 0, S + n_halo - halo_left))
            # Halo tiles start at multiples of 4: the left part's first up to 3 keys before -halo_left, the right part's
            # up to 3 before S (keys outside the part: not loaded, not stored), so the dropout bits take the aligned
            # path (one Philox call per 4 keys) on every tile. ``_common.halo_grad_args`` counts them alike.
            n0 = tl.where(th < 0, n0, tl.where(th < n_left, th * BLOCK_N - (halo_left + 3) // 4 * 4,
                                                S // 4 * 4 + (th - n_left) * BLOCK_N))
            halo = (tl.maximum(key_lo, part_lo), tl.minimum(key_hi, part_hi), HMask + b * n_halo, halo_left)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        if HAS_HALO:
            k = load_halo_rows(K + batch_head_offset(pid_kv, H // GROUP, stride_kb, stride_kh),
                               HK + batch_head_offset(pid_kv, H // GROUP, stride_hkb, stride_hkh), offs_n, S, stride_ks,
                               stride_hks, halo, offs_d, D, HALO_ALIGN)
            v = load_halo_rows(V + batch_head_offset(pid_kv, H // GROUP, stride_vb, stride_vh),
                               HV + batch_head_offset(pid_kv, H // GROUP, stride_hvb, stride_hvh), offs_n, S, stride_vs,
                               stride_hvs, halo, offs_d, D, HALO_ALIGN)
        else:
            kv_rows = side_rows(SIdx + b * stride_ib, offs_n, G, SIDE and SIDE_INDEX)
            n_kv = S if SIDE and SIDE_INDEX else N
            k = load_rows(K + batch_head_offset(pid_kv, H // GROUP, stride_kb, stride_kh), kv_rows, n_kv, stride_ks,
                          offs_d, D)
            v = load_rows(V + batch_head_offset(pid_kv, H // GROUP, stride_vb, stride_vh), kv_rows, n_kv, stride_vs,
                          offs_d, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        if SIDE:  # every query attends every side key: this program's chunk of all query tiles
            m_start = 0
            t_lo = tl.program_id(2) * tiles_per_split
            t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(S, BLOCK_M))
        else:  # queries i with i - left <= j <= i + right for some key j of the tile, as tiles from n0 - right
            m_start = n0 - right
            t_lo = tl.maximum(0, -m_start) // BLOCK_M
            t_hi = (tl.minimum(S - 1, n0 + BLOCK_N - 1 + left) - m_start) // BLOCK_M + 1
            if HAS_HALO:  # a tile of halo keys no query reaches: no query tile (its dK, dV rows are zeros)
                t_hi = tl.where((n0 + BLOCK_N <= halo[0]) | (n0 >= halo[1]), t_lo, t_hi)
        if HAS_RANGES:
            range_ptr = Ranges + b * 2 * S
            t_lo, t_hi = trim_row_tiles(range_ptr, t_lo, t_hi, m_start, S, n0, n0 + BLOCK_N, N, BLOCK_M)
        n_t = t_hi - t_lo
        no_rows = n_t == 0  # with halo keys or ranges: a key tile that no query tile sees (else never)
        if HAS_HALO or HAS_RANGES:
            # Such a tile still walks one query tile, of rows -BLOCK_M..-1 (below): none in [0, S), so p = 0 (their
            # lse loads as +inf). Its keys, which no query may read, can hold anything (NaN: 0 * NaN in the
            # products), so its dS sums and, after the loop, its dk, dv are set to zero, as if never walked.
            n_t = tl.maximum(n_t, 1)
        # Every band key tile has a query tile (n0 < S, windows >= 0: t_hi > t_lo), every side chunk one
        # (``_plan_side``: chunk z starts at z * tiles_per_split < cdiv(S, BLOCK_M)). Told so, the compiler drops the
        # loop's zero-trip path, whose copy of the zeroed dk, dv into the accumulators made ptxas serialize every
        # wgmma of the kernel (sm_90, Triton 3.6 / 3.8: "non wgmma instructions defining accumulator registers");
        # pipelined, the local op's loop is 619 / 610 instructions per tile instead of 653 / 645, a packed batch's
        # 715 / 776 instead of 745 / 826. The trip count itself: GROUP = H // H_kv >= 1 is not inferred otherwise.
        tl.assume(GROUP * n_t > 0)
        carry = tl.zeros([BIAS_L], dtype=tl.float32)
        # Query head it // n_t of the group, its query tile t_lo + it % n_t. With the sums no LICM: hoisted, their
        # gather indices stay live through the loop (sm_90 D = 64: 255 registers and spills against 208-250, none).
        for it in tl.range(0, GROUP * n_t, disable_licm=SUMS, num_stages=KV_STAGES):
            pid_bh = pid_q0 + it // n_t
            h = pid_bh % H
            q_base = Q + batch_head_offset(pid_bh, H, stride_qb, stride_qh)
            do_base = DO + batch_head_offset(pid_bh, H, stride_dob, stride_doh)
            t = t_lo + it % n_t
            if SUMS and not SIDE:  # band sums: the walk from the last query tile, the entries' base rises (chain_add)
                t = t_hi - 1 - it % n_t
            m0 = m_start + t * BLOCK_M
            if HAS_HALO or HAS_RANGES:
                m0 = tl.where(no_rows, -BLOCK_M, m0)
            rows = m0 + offs_m
            row_ok = (rows >= 0) & (rows < S)
            q = load_rows(q_base, rows, S, stride_qs, offs_d, D)
            do = load_rows(do_base, rows, S, stride_dos, offs_d, D)
            stat_ptrs = pid_bh.to(tl.int64) * S + rows
            lse = tl.load(Lse + stat_ptrs, mask=row_ok, other=float("inf"))  # rows outside [0, S): p = 0
            delta = tl.load(Delta + stat_ptrs, mask=row_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if SIDE:
                qblock = tl.zeros([BLOCK_M, 1], dtype=tl.int32)
                if HAS_SBIAS:
                    qb = load_query_block(QBlock + b * S, rows, row_ok, G)
                    qblock = qb[:, None]
                s = side_scores(qk, qblock, offs_n[None, :], G, scale, SBias + h * (2 * G + 1), SMask + b * G,
                                HAS_SBIAS, HAS_SMASK)
            else:
                edge = band_tile_interior(m0, n0, S, left, right, BLOCK_M, BLOCK_N) == 0
                s = band_scores(qk, rows[:, None], offs_n[None, :], edge, S, left, right, scale,
                                BBias + h * (left + right + 1), KMask + b * S, HAS_BBIAS, HAS_KMASK, halo, HAS_HALO,
                                HAS_HMASK)
            if HAS_RANGES:
                s = range_mask(s, offs_n[None, :], *load_ranges(range_ptr, rows, row_ok, N))
            z = s
            if HAS_DROPOUT:  # key tiles start at multiples of 4 (of BLOCK_N, or halo tiles: see above): aligned
                z = _keep_scale(Rng, pid_bh, rows, n0, drop_thresh, drop_scale, BLOCK_N, True, SIDE, drop_offset,
                                HAS_DOFFSET)
            dk, dv, ds = kv_grad_ds_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT, DOT_PREC)
            if SUMS and (HAS_HALO or HAS_RANGES):
                ds = tl.where(no_rows, 0.0, ds)
            if SUMS:  # this head's row: the tile's dS summed by table entry (bias_grad)
                row = rows_ptr + (it // n_t) * part_width
                if SIDE:  # side entry g - qb + G, read-add-written (the query tiles' entries overlap)
                    bias_grad.side_entry_sums(ds, qb, row_ok, row, G + n0, part_width, BIAS_L, DOT_PREC)
                else:  # band column n0 - m0 + left + c - r + BLOCK_M - 1 = (left + right - t * BLOCK_M) + x: a chain
                    carry = tl.where(it % n_t == 0, 0.0, carry)  # a new head's first tile
                    base = left + right - t * BLOCK_M
                    carry = chain_add(carry, shifted_column_sums(ds, (BLOCK_M - 1) - offs_m, BIAS_L), row, base,
                                      part_width, BLOCK_M)
                    if it % n_t == n_t - 1:
                        chain_flush(carry, row, base, part_width, BLOCK_M)
        if HAS_HALO or HAS_RANGES:
            dk = tl.where(no_rows, 0.0, dk)
            dv = tl.where(no_rows, 0.0, dv)

        out_offset = tl.program_id(2).to(tl.int64) * stride_split + batch_head_offset(pid_kv, H // GROUP, stride_gb,
                                                                                      stride_gh)
        if HAS_HALO:  # a halo tile stores the rows of its part into DHK, DHV
            halo_offset = batch_head_offset(pid_kv, H // GROUP, stride_dhb, stride_gh)
            dk_out = tl.where(th >= 0, DHK + halo_offset, DK + out_offset)
            dv_out = tl.where(th >= 0, DHV + halo_offset, DV + out_offset)
            n_out = tl.where(th >= 0, n_halo, N)
            out_rows = tl.where(th < 0, offs_n, tl.where((offs_n >= part_lo) & (offs_n < part_hi),
                                                         halo_row(offs_n, S, halo_left), -1))
            store_rows(dk_out, dk * scale, out_rows, n_out, stride_gs, offs_d, D)
            store_rows(dv_out, dv, out_rows, n_out, stride_gs, offs_d, D)
        else:
            dk_out = DK
            dv_out = DV
            if GLOBAL_ROWS:
                if ZERO_DQG:
                    store_rows(DQG + out_offset, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), offs_n, N, stride_gs,
                               offs_d, D)
                if GLOBAL_SEPARATE:
                    store_rows(DK + out_offset, dk * scale, offs_n, N, stride_gs, offs_d, D)
                    store_rows(DV + out_offset, dv, offs_n, N, stride_gs, offs_d, D)
                    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                    dk_out = DKG
                    dv_out = DVG
                # Loaded again (KG, VG are K, V without separate projections): the band loop's tiles need not stay live
                # across it (sm_90, D = 128: 104 bytes of spills otherwise).
                k = load_rows(KG + batch_head_offset(pid_kv, H, stride_kgb, stride_kgh), offs_n, S, stride_kgs, offs_d,
                              D)
                v = load_rows(VG + batch_head_offset(pid_kv, H, stride_vgb, stride_vgh), offs_n, S, stride_vgs, offs_d,
                              D)
                dk, dv = global_rows.slot_key_grads(
                    k, v, n0, dk, dv, pid_kv, QG, DO, Out, GLse, SIdx, SMask, GKMask, GKRange, stride_qgb, stride_qgs,
                    stride_qgh, stride_dob, stride_dos, stride_doh, stride_ob, stride_os, stride_oh, S, H, G, D, scale,
                    stride_ib, Rng, drop_thresh, drop_scale, HAS_GKMASK, SLOT_BLOCK, BLOCK_N, DOT_PREC, HAS_DROPOUT,
                    HAS_GRANGES)
            store_rows(dk_out + out_offset, dk * scale, offs_n, N, stride_gs, offs_d, D)
            store_rows(dv_out + out_offset, dv, offs_n, N, stride_gs, offs_d, D)


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------


def _side_or_dummy(side_k, side_v, q):
    """side_k, side_v, or q twice when G = 0: an empty tensor may have a null data pointer (never read)."""
    return (side_k, side_v) if side_k.shape[1] > 0 else (q, q)


def _side_count(side_k, side_index):
    """G: side keys are rows of side_k, or with ``side_index`` (B, G) the rows of (B, S, H, D) K/V it names."""
    if side_index is None:
        return side_k.shape[1]
    if side_index.dtype != torch.int64 or side_index.dim() != 2 or side_index.stride(1) != 1:
        raise ValueError(f"side_index: expected (B, G) int64 with unit last stride, got {side_index.dtype} "
                         f"{tuple(side_index.shape)} strides {tuple(side_index.stride())}")
    return side_index.shape[1]


def _index_args(side_index, dummy):
    """(pointer, batch stride, SIDE_INDEX) of the optional side index."""
    return (dummy, 0, False) if side_index is None or side_index.numel() == 0 else (
        side_index, side_index.stride(0), True)


def _common_args(band_key_mask, side_mask, query_block, band_bias, side_bias, dummy):
    """Pointers of the optional inputs, with ``dummy`` standing in for absent ones (flags keep them unread)."""
    return (
        as_u8(band_key_mask, dummy), as_u8(side_mask, dummy),
        dummy if query_block is None else query_block,
        dummy if band_bias is None else band_bias,
        dummy if side_bias is None else side_bias,
    )


def _flags(band_key_mask, side_mask, band_bias, side_bias):
    return dict(HAS_KMASK=band_key_mask is not None, HAS_SMASK=side_mask is not None,
                HAS_BBIAS=band_bias is not None, HAS_SBIAS=side_bias is not None)


def _range_args(key_ranges, side_ranges, B, S, G, block_m, dummy, range_bounds=None):
    """(``_rows_kernel``'s range keywords, (key pointer, flag), (side pointer, flag)) of the optional (B, S, 2)
    int32 per-row ranges (``notes/ranges_contract.md``); side ranges are moot without side keys. ``range_bounds``:
    None, or their ``_common.tile_bounds`` for ``block_m`` computed already (``slots.global_slots``)."""
    kr, has_kr = range_arg(key_ranges, "key_ranges", (B, S), dummy)
    sr, has_sr = range_arg(side_ranges, "side_ranges", (B, S), dummy)
    has_sr = has_sr and G > 0
    if range_bounds is None:
        bounds = tile_bounds(key_ranges if has_kr else None, side_ranges if has_sr else None, S, G, block_m, dummy)
    else:
        bounds = check_bounds(range_bounds, B, S, block_m, dummy)
    rows = dict(KRange=kr, SRange=sr, TBounds=bounds, HAS_KRANGES=has_kr, HAS_SRANGES=has_sr)
    return rows, (kr, has_kr), (sr, has_sr)


def forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
            scale, dropout_p=0.0, rng=None, side_index=None, query_mask=None, band_rows_only=False, key_ranges=None,
            side_ranges=None, *, halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0,
            fused_rows=None, range_bounds=None):
    """-> (out (B, S, H, D) contiguous in q's dtype, lse (B, H, S) float32); see ``longattn.backends``.

    ``key_ranges`` / ``side_ranges``: None or contiguous int32 (B, S, 2), the band / side keys each row may attend
    (packed variable-length batches); ``range_bounds``: None or their per-tile bounds, already computed
    (``_common.tile_bounds`` layout for this launch's BLOCK_M; ``slots.global_slots`` writes them).

    ``halo_k``, ``halo_v`` (B, HL + HR, H_kv, D), ``halo_mask`` (B, HL + HR) bool or None, ``halo_left`` = HL: band
    keys beyond both ends of the sequence (``notes/halo_contract.md``, ``_common.halo_args``), read in place; not
    combined with ranges or the Longformer options (ValueError).

    ``dropout_offset``: an int >= 0, a multiple of 4 (else ValueError): with dropout, row i and band key j (halo keys
    at their local j) draw the bits of row / key ``i + o`` / ``j + o`` (a sequence-parallel shard passes its start,
    ``notes/halo_contract.md`` section 3); side keys keep theirs. 0 (or no dropout) compiles today's kernels.

    Options of the Longformer op (``longattn.backends._longformer``), all default off:
    ``side_index`` (B, G) int64: side key g of batch row b is token ``side_index[b, g]`` of ``side_k``/``side_v``
    (then (B, S, H_kv, D), normally k and v themselves), read in place, no gathered copy; ``query_mask`` (B, S)
    bool: rows where it is False get out = 0; ``band_rows_only``: rows where ``band_key_mask`` is False get
    lse = +inf (no gradient from the backward). ``fused_rows`` (a ``global_rows.FusedRows``, with ``side_index``):
    Longformer's global rows in the same launch, their split-KV programs in front of the query tiles.
    """
    B, S, H, D = q.shape
    halo_excluded(halo_k, key_ranges=key_ranges is not None, side_ranges=side_ranges is not None,
                  side_index=side_index is not None, query_mask=query_mask is not None,
                  band_rows_only=bool(band_rows_only))
    check_offset(dropout_offset)
    halo = halo_args(halo_k, halo_v, halo_mask, halo_left, k, v, left, right)
    G = _side_count(side_k, side_index)
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    tiles = launch_tiles(D, G, side_bias is not None, q.dtype)
    BLOCK_M = tiles.block_m
    extra = _common_args(band_key_mask, side_mask, query_block, band_bias, side_bias, q)
    rows_role = fused_rows.role(False) if fused_rows is not None else {}
    grid = (cdiv(S, BLOCK_M) + rows_role.get("n_lead", 0), B * H)
    sidx, stride_ib, indexed = _index_args(side_index, q)
    ranged, _, _ = _range_args(key_ranges, side_ranges, B, S, G, BLOCK_M, q, range_bounds)
    cached(_rows_kernel)[grid](
        q, k, v, *_side_or_dummy(side_k, side_v, q), q, q, out, lse, lse, *extra, sidx, as_u8(query_mask, q),
        *strides3(q), *strides3(k), *strides3(v), *strides3(side_k), *strides3(side_v),
        *strides3(q), *strides3(q), *strides3(out), stride_ib,
        S, H, H // k.shape[2], G, D, left, right, float(scale),
        BACKWARD=False, **_flags(band_key_mask, side_mask, band_bias, side_bias),
        **_dropout_meta(dropout_p, rng, lse, dropout_offset), BLOCK_M=BLOCK_M,
        BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, DOT_PREC=tiles.dot_prec, num_warps=tiles.warps,
        SIDE_INDEX=indexed, HAS_QMASK=query_mask is not None, KMASK_ROWS=band_rows_only and band_key_mask is not None,
        **ranged, **halo, **rows_role, SIDE_N=tiles.side_n,
        BIAS_ACC=bias_acc(band_bias, side_bias, scale), **tiles.rows_options,  # two programs per SM (rows_cap)
    )
    return out, lse


def backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
             left, right, scale, dropout_p=0.0, rng=None, side_index=None, key_ranges=None, side_ranges=None, *,
             halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dlse=None, dropout_offset=0, fused_rows=None,
             range_bounds=None):
    """-> (dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias): contiguous gradients in the inputs' dtypes
    (a bias gradient is empty when its table is absent); with a halo (see ``forward``) followed by
    ``dhalo_k, dhalo_v`` (B, HL + HR, H_kv, D) contiguous in k's dtype (a 9-tuple).

    ``dlse``: None or float32 (B, H, S), the loss's gradient w.r.t. ``lse`` (the dQ pass subtracts it from
    delta, so every pass takes it; rows with lse = +inf get none, whatever dlse holds there).
    ``dropout_offset``: as in ``forward`` (every pass draws its dropout bits with it).

    Launches, in stream order: the dQ pass (which also writes delta, read by the later passes), the band dK/dV
    pass, the side keys' dK/dV pass (G > 0), then at most one ``bias_grad.reduce_partials`` launch that sums every
    float32 partial of the backward in a fixed order: the bias tables' rows (the dK/dV kernels sum dS by table
    entry, ``bias_grad``: the band pass one row per (band program, head), the side pass one per (query chunk, side
    program, head), a side program of several side-key tiles when one row per tile would exceed
    ``_common.partial_programs``' budget) and the side keys' dK/dV over query chunks. Side keys'
    dK/dV: every query attends every side key, so one program per side-key tile would walk all S queries (e.g.
    Longformer's single global token: B * H programs for the whole GPU); the query range is therefore split into
    ``side_splits`` chunks (one chunk writes dside_k, dside_v directly). No torch op runs besides allocations.

    With ``side_index`` (see ``forward``) the side keys' dK/dV are added into dk/dv at the rows it names (kept
    slots must name distinct rows) by the reduction launch, and dside_k, dside_v are returned empty.
    ``key_ranges`` / ``side_ranges`` / ``range_bounds``: as in ``forward``; the key-side passes skip query tiles
    that cannot see their key tile.

    ``fused_rows`` (a ``global_rows.FusedRows``, with ``side_index``): Longformer's global rows in the same launches,
    so the op still launches four kernels: their split-KV dq programs lead the dQ pass, their dK/dV join the band
    dK/dV programs' sums, and the reduction adds their dq into ``fused_rows.dq``.
    """
    B, S, H, D = q.shape
    halo_excluded(halo_k, key_ranges=key_ranges is not None, side_ranges=side_ranges is not None,
                  side_index=side_index is not None)
    check_offset(dropout_offset)
    halo = halo_args(halo_k, halo_v, halo_mask, halo_left, k, v, left, right)
    G = _side_count(side_k, side_index)
    tiles = launch_tiles(D, G, side_bias is not None, q.dtype)
    BLOCK_M, BLOCK_N = tiles.block_m, tiles.block_n
    ranged, (kr, has_kr), side_ranges = _range_args(key_ranges, side_ranges, B, S, G, BLOCK_M, q, range_bounds)
    lse = lse.contiguous()
    delta_lse = dlse_args(dlse, lse)
    delta = torch.empty(B, H, S, dtype=torch.float32, device=q.device)  # written by the dQ pass
    dq = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    H_kv = k.shape[2]  # grouped-query attention: H_kv < H (dK, dV have k's heads)
    dk = torch.empty(B, S, H_kv, D, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    extra = _common_args(band_key_mask, side_mask, query_block, band_bias, side_bias, q)
    meta = dict(**_flags(band_key_mask, side_mask, band_bias, side_bias),
                **_dropout_meta(dropout_p, rng, delta, dropout_offset),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_D=tiles.block_d, DOT_PREC=tiles.dot_prec, num_warps=tiles.warps)
    n_tiles = cdiv(S, BLOCK_M)
    halo_grads, halo_out, halo_tiles = halo_grad_args(halo, dk, BLOCK_N)
    n_keys = cdiv(S, BLOCK_N) + halo_tiles  # band dK/dV programs per (b, K/V head)
    widths = bias_grad.row_widths(band_bias is not None, side_bias is not None, left + right + 1, G, BLOCK_M)
    keys_meta = dict(meta, KV_STAGES=tiles.kv_stages) if tiles.kv_stages is not None else meta
    side_meta = dict(keys_meta, BLOCK_N=tiles.side_n, num_warps=tiles.side_warps)  # its key tile: a side tile
    side = _side_plan(q, side_k, G, side_meta, widths, 4 * B * H * n_keys * widths[0])
    parts = bias_grad.partials((B, n_keys, H), (side.splits, B, side.programs, H), widths, delta)
    sidx, stride_ib, indexed = _index_args(side_index, q)
    rows_role, keys_role = (fused_rows.role(True), fused_rows.keys_role()) if fused_rows is not None else ({}, {})
    cached(_rows_kernel)[(n_tiles + rows_role.get("n_lead", 0), B * H)](
        q, k, v, *_side_or_dummy(side_k, side_v, q), dout, out, dq, lse, delta, *extra, sidx, q,
        *strides3(q), *strides3(k), *strides3(v), *strides3(side_k), *strides3(side_v),
        *strides3(dout), *strides3(out), *strides3(dq), stride_ib,
        S, H, H // H_kv, G, D, left, right, float(scale), BACKWARD=True, SIDE_INDEX=indexed,
        **ranged, **meta, **halo, **delta_lse, **rows_role, SIDE_N=tiles.side_n,
        **({} if meta["HAS_DROPOUT"] else tiles.rows_options),  # two programs per SM (_common.rows_cap)
    )
    cached(_keys_kernel)[(n_keys, B * H_kv, 1)](
        q, k, v, dout, lse, delta, dk, dv, *extra, sidx,
        *strides3(q), *strides3(k), *strides3(v), *strides3(dout), *strides3(dk), 0, stride_ib,
        S, S, H, H // H_kv, G, D, left, right, float(scale), cdiv(S, BLOCK_M), SIDE=False, Ranges=kr,
        HAS_RANGES=has_kr, Part=parts.band, part_width=widths[0], **keys_meta, **halo, **halo_out, **keys_role,
    )
    dsk, dsv, side_sums = _side_key_grads(q, side_k, side_v, dout, lse, delta, extra, scale, side_meta, side_ranges,
                                          G, side_index, side_mask, dk, dv, side, parts.side, widths[1])
    dbb, dsb = bias_grad.reduce_partials(parts, widths, band_bias, side_bias, left + right + 1, G, BLOCK_M, side_sums,
                                         None if fused_rows is None else fused_rows.row_sums(dq))
    dbb, dsb = (q.new_empty(0) if grad is None else grad for grad in (dbb, dsb))
    return dq, dk, dv, dsk, dsv, dbb, dsb, *halo_grads


def side_splits(n_programs: int, n_query_tiles: int, device=None) -> int:
    """Query-range chunks for the side-key dK/dV (``_common.split_count``: about four waves of ``device``'s SMs)."""
    return split_count(n_programs, n_query_tiles, device)


class _SidePlan(NamedTuple):
    """The side keys' dK/dV launch: ``tiles`` side-key tiles, ``splits`` query chunks of ``per_split`` query tiles,
    ``programs`` side-key programs per (batch row, K/V head, chunk): ``tiles``, or fewer, each a run of tiles with one
    side-bias row per head (PERSISTENT, ``_common.partial_programs``)."""

    tiles: int
    splits: int
    per_split: int
    programs: int


def _side_plan(q, side_k, G, meta, widths, spent) -> _SidePlan:
    """``_SidePlan`` of the side keys' dK/dV pass (``spent``: the band rows' bytes, from the partials' budget)."""
    B, S, H, D = q.shape
    return _plan_side(B, S, H, side_k.shape[2], G, meta["BLOCK_M"], meta["BLOCK_N"], widths[1],
                      q.numel() * q.element_size(), q.device, spent)


@functools.lru_cache(maxsize=256)  # integer arithmetic on the call's sizes: once per shape
def _plan_side(B, S, H, H_kv, G, block_m, block_n, side_width, q_bytes, device, spent) -> _SidePlan:
    if G == 0:
        return _SidePlan(0, 1, 0, 0)
    n_tiles = cdiv(S, block_m)
    tiles = cdiv(G, block_n)
    splits = side_splits(tiles * B * H_kv, n_tiles, device)
    per_split = cdiv(n_tiles, splits)
    splits = cdiv(n_tiles, per_split)
    programs = partial_programs(B * H * splits, tiles, 4 * side_width, q_bytes, device, spent=spent)
    return _SidePlan(tiles, splits, per_split, programs)


def _side_key_grads(q, side_k, side_v, dout, lse, delta, extra, scale, meta, ranges, G, side_index, side_mask, dk,
                    dv, plan, part, part_width):
    """The side keys' dK/dV pass -> (dside_k, dside_v, side sums for ``bias_grad.reduce_partials`` or None).

    Slice z of the (splits, B, G, H_kv, D) partials sums query chunk z (see ``backward``). Without ``side_index``:
    dside_k, dside_v (B, G, H_kv, D) contiguous in q's dtype, written by the pass itself when there is one chunk,
    else by the reduction from float32 partials. With it (side key g of batch row b is row ``side_index[b, g]`` of
    k, v, which are then (B, S, H_kv, D)): float32 partials that the reduction adds into those rows of dk, dv
    (after the band dK/dV, stream order); dside_k, dside_v are empty. ``ranges``: (pointer, flag) of the side
    ranges (``_range_args``). ``plan``: its ``_SidePlan``; with a side table its programs write the side-bias rows
    ``part`` ((splits, B, plan.programs, H, part_width), ``bias_grad.Partials``)."""
    B, S, H, D = q.shape
    H_kv = side_k.shape[2]
    if G == 0:
        if side_index is not None:
            return q.new_empty(0), q.new_empty(0), None
        return (*(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (side_k, side_v)), None)
    splits = plan.splits
    direct = splits == 1 and side_index is None  # one chunk writes the gradients themselves
    part_k = torch.empty(splits, B, G, H_kv, D, dtype=q.dtype if direct else torch.float32, device=q.device)
    part_v = torch.empty_like(part_k)
    sidx, stride_ib, indexed = _index_args(side_index, q)
    persistent = dict(PERSISTENT=True) if plan.programs < plan.tiles else {}  # runs of side-key tiles
    cached(_keys_kernel)[(plan.programs, B * H_kv, splits)](
        q, side_k, side_v, dout, lse, delta, part_k, part_v, *extra, sidx,
        *strides3(q), *strides3(side_k), *strides3(side_v), *strides3(dout), *strides3(part_k[0]),
        part_k[0].numel(), stride_ib, S, G, H, H // H_kv, G, D, 0, 0, float(scale), plan.per_split, SIDE=True,
        SIDE_INDEX=indexed, Ranges=ranges[0], HAS_RANGES=ranges[1], Part=part, part_width=part_width, **meta,
        **persistent,
    )
    if indexed:
        return q.new_empty(0), q.new_empty(0), bias_grad.SideSums(part_k, part_v, dk, dv, side_index, side_mask)
    if direct:
        return part_k[0], part_v[0], None
    dsk = torch.empty(B, G, H_kv, D, dtype=q.dtype, device=q.device)
    dsv = torch.empty_like(dsk)
    return dsk, dsv, bias_grad.SideSums(part_k, part_v, dsk, dsv)
