"""Gradients of the band_bias (H, W) and side_bias (H, 2G + 1) tables, reduced inside the dQ kernel, and the
backward's one fixed-order reduction of float32 partials (``reduce_partials``).

``dbias[h, t] = sum over (b, i) of dS[b, h, i, key(i, t)]`` where ``key(i, t) = i + t - left`` (band) or
``t - G + query_block[b, i]`` (side). The dQ program of a query tile (``band_side._rows_kernel`` with
``BACKWARD``) already holds dS for each of its key tiles; the helpers here sum it by table entry in registers
and write one float32 row of partial sums per program (``partials``); ``reduce_partials`` sums the rows over
programs in a fixed order. No atomics, no second pass over q/k/v: two runs are bitwise equal. A program of several
query tiles (``PERSISTENT``, when one row per tile would not fit ``_common.query_programs``' budget) zeroes its row
and adds each tile's sums into it in tile order (the ACCUMULATE stores below).

Row-shifted column sums. In a (BLOCK_M, BLOCK_N) tile, dS[r, c] belongs to table entry ``e0 + c + shift[r]``:
- band key tile ``tt`` of query tile ``m0`` (its keys start at ``m0 - left + tt * BLOCK_N``, see ``_common``):
  ``t = tt * BLOCK_N + c - r``, so ``e0 = tt * BLOCK_N - (BLOCK_M - 1)`` and ``shift[r] = BLOCK_M - 1 - r``, the
  same for every query tile;
- side tile ``g0``: ``e = g0 + c - qb[r] + G``, so ``e0 = g0 + G - qhi`` and ``shift[r] = qhi - qb[r]``, where
  ``qhi`` is the largest block id among the program's rows.
``shifted_column_sums`` (band) skews the tile by its row shifts with one ``tl.gather`` (warp shuffles) into
``L = 2 * max(BLOCK_M, BLOCK_N)`` columns and sums the rows: ``v[x] = sum_r dS[r, x - shift[r]]`` is entry
``e0 + x``. The side rows have few distinct shifts (a 64-row tile of LongT5, 16 tokens per block, has 4), so
``grouped_column_sums`` first adds the rows of equal shift on tensor cores (a (16, BLOCK_M) one-hot product)
and skews only those 16 rows. The tiles of a program's loop have ``e0`` ``BLOCK_N`` apart, so ``chain_add``
keeps an L-entry carry: shifted by BLOCK_N, plus the new tile, its first BLOCK_N entries are final and stored.
Side rows whose block id lies SIDE_SPAN or more below ``qhi`` (a tile mixing padding rows, qb = -1, with
others; arbitrary ids) are summed after dQ's store by extra passes over the side tiles that recompute their dS
and add into the row (``ACCUMULATE``); most programs run none.

Precision: float32 sums of float32 dS; the one-hot product rounds dS to TF32 (10-bit mantissa, finer than the
bf16/fp16 rounding of dS in dQ's own product) for 16-bit inputs and is exact ("ieee") for float32 inputs.

Partial rows (``partials``): dQ program (b, p, h) owns one row of ``band_width + side_width`` floats; band entry
t is column ``t + BLOCK_M - 1``, side entry e is column ``band_width + e``. Every column is written by its program
(the entries its tiles never reach with zeros; PERSISTENT: the whole row zeroed first), so the buffer needs no
initialisation. The side columns grow with G ~ S, so one row per query tile is quadratic in S; ``query_programs``
keeps one per tile while the rows fit max(32 MiB, q's bytes / 4), else fewer programs of consecutive tiles.
LongT5 TGlobal (H = 12, W = 255, G = S / 16, bf16, D = 64, 64 x 64 tiles, L = 128; B = 1, 132 SMs):
    S = 16384:  384 + 2176 columns x 256 programs (1 tile each) x 12 heads = 30 MiB (as one row per tile);
    S = 65536:  384 + 8320 columns x 77 programs (13-14 tiles) x 12 heads = 31 MiB (one per tile: 408 MiB);
    S = 131072: 384 + 16512 columns x 55 programs (37-38 tiles) x 12 heads = 43 MiB (one per tile: 1584 MiB),
written once (read and written per tile by a persistent program: L2-resident, ~66 KB) and read once by the
reduction.

The reduction (``reduce_partials``, ``_reduce_kernel``): one launch per backward, after the dK/dV passes, whose
programs are laid out over every output it writes: the band table's gradient, the side table's, and the side
keys' dK/dV from their float32 partials over query chunks (``SideSums``: stored in q's dtype, or with
Longformer's slot index added into the band dK/dV rows the slots name), and for the fused Triton Longformer op the
global rows' dq (``RowSums``: the split programs' partial dq summed per slot, added into the slots' rows). Each
program owns ``_BLOCK_C`` columns of one output row (a global-rows program: ``_ROWS_BLOCK`` slots) and adds its
partial rows in order (``_UNROLL`` loads in flight), so the result is bitwise reproducible and no torch op (sum,
cast, copy, fill) runs around the kernels. On an H200 (2026-11-30, S = 16384, B = 1, H = 12, D = 64, bf16) the
reduction took 29.7 us of TGlobal's 3366 us backward (G = 1024, both tables), 24.0 us of local's 840 us.

Cost (static SASS of the sm_90 bf16 build, D = 64, 8 warps; not timed, no GPU): the band tile loop grows from
1008 to 1391 instructions per tile, the side tile loop from 1056 to 1216 (8 extra HMMA for the one-hot
product; the three 64 x 64 x 64 wgmma products are unchanged). For LongT5 (5 band + 16 side tiles per query
tile in dQ, 5 + 16 in the dK/dV kernels at 1085 / 1175 per tile) that is 4475 extra instructions against
45491 per query tile: 9 % of the backward if it is issue-bound, less where the tensor cores bound it. The
separate kernel this replaced recomputed every score on the FMA units (12 ms per call on an H100, 88 % of the
backward). PERSISTENT (same build, all masks and biases; not timed): each chain step also loads the row's entries
from L2 before its barrier and store; the side tile loop has 1220 instructions per tile and no spill (1227
without), the band loop 1515 with 22 local (spill) loads per tile (1399, none without: the outer loop keeps more
values live), against 5 band and 128 side tiles per query tile at S = 131072.

Measured since (H200, 2026-11-30, commit dffeee2, Triton 3.6): TGlobal's backward takes 3.382 ms with both tables and
1.601 ms without, so the tables cost 52.7 % of it, not the 9 % predicted above. The figures above came from a build
without the launch's argument specialization (scalar 16-bit K/V loads, other register counts). Compiled as the
launch specializes it (``tests/test_triton_bias_cost.py``), the dQ kernel has 120 registers without the tables (two
programs per SM) and 255 with both (one per SM). The H200 timings give about 1.8-1.9 warp-instructions per cycle per
SM at two programs and 0.95-1.2 at one. By that model the extra 1.78 ms splits as: the sums in dQ ~615 us, dQ's fall
to one program per SM ~580 us, the per-element bias gathers ~140 us in dQ and ~435 us in the dK/dV kernels, the
reduction ~15 us. The gathers alone (no sums) already take dQ past 128 registers on Triton 3.6.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cdiv
from ._launch import cached
from .global_rows import combine_program


def row_widths(has_band: bool, has_side: bool, W: int, G: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(band_width, side_width) columns of a program's partial row; 0 for an absent table."""
    L = 2 * max(block_m, block_n)
    band = (cdiv(block_m - 1 + W, block_n) - 1) * block_n + L if has_band else 0
    side = 2 * G + L if has_side and G > 0 else 0
    return band, side


def partials(B, n_programs, H, widths, like):
    """Uninitialised float32 (B, dQ programs per (b, h), H, band_width + side_width) (the kernel writes every
    column); ``like`` (never read) when there is no table to differentiate."""
    if sum(widths) == 0:
        return like
    return torch.empty(B, n_programs, H, sum(widths), dtype=torch.float32, device=like.device)


class SideSums(NamedTuple):
    """The side keys' dK/dV partials that ``reduce_partials`` finishes in its launch.

    ``part_k``, ``part_v``: contiguous float32 (splits, B, G, H_kv, D), slice z the sums of query chunk z.
    Without ``index``: ``out_k``, ``out_v`` contiguous (B, G, H_kv, D) get the sums over the chunks. With ``index``
    (B, G) int64 (unit last stride; Longformer's global tokens): ``out_k``, ``out_v`` are contiguous (B, S, H_kv, D)
    (the band dK/dV, already written) and row ``index[b, g]`` gets the sums of side key g added, for the slots
    where ``mask`` (None or (B, G) bool) is set and the index lies in [0, S) (the kept slots of a batch row must
    name distinct rows: each row is then read and written by one program)."""

    part_k: torch.Tensor
    part_v: torch.Tensor
    out_k: torch.Tensor
    out_v: torch.Tensor
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class RowSums(NamedTuple):
    """Longformer's global rows' dq that ``reduce_partials`` finishes in its launch (``global_rows.combine_program``):
    ``part`` contiguous float32 (splits, B * H, G, BLOCK_D) partial dq (unscaled) of the split-KV programs, summed in
    split order, times ``scale``, added into the rows ``pos[b, g]`` (int64 (B, G), unit last stride) of ``dq``
    (contiguous (B, S, H, D)) for the slots where ``used`` (contiguous (B, G) uint8) is set; ``_ROWS_BLOCK`` slots
    per program."""

    part: torch.Tensor
    pos: torch.Tensor
    used: torch.Tensor
    dq: torch.Tensor
    scale: float


_ROWS_BLOCK = 16  # slots per program of the global rows' dq (a 16 x D float32 tile: no spill at 2 warps)
_BLOCK_C = 256  # output columns per program of _reduce_kernel
_UNROLL = 8  # partial rows loaded together (their loads in flight at once; still added in order)


def reduce_partials(part, widths, band_bias, side_bias, W, G, block_m, side_sums=None, row_sums=None):
    """(dband_bias, dside_bias), contiguous in the tables' dtypes (None when absent), and the side keys' dK/dV of
    ``side_sums`` (a ``SideSums`` or None), in one launch of ``_reduce_kernel`` (none when there is nothing to
    write): each output element is its float32 partials summed in a fixed order (the programs' rows over
    (batch row, dQ program) in order; the query chunks in order), so two runs are bitwise equal. A table's
    entries are columns of ``part`` (``partials``); the side table of G = 0 scores no key: zeros. ``row_sums``: a
    ``RowSums`` or None, Longformer's global-row dq (its programs after the side keys')."""
    H = next((t.shape[0] for t in (band_bias, side_bias) if t is not None), 0)
    n_z = part.shape[0] * part.shape[1] if sum(widths) else 0  # rows of partial sums: (batch row, dQ program)
    device = part.device
    dband = None if band_bias is None else torch.empty(H, W, dtype=band_bias.dtype, device=device)
    dside = None if side_bias is None else torch.empty(H, 2 * G + 1, dtype=side_bias.dtype, device=device)
    band_end = H * cdiv(W, _BLOCK_C) if dband is not None else 0
    side_end = band_end + (H * cdiv(2 * G + 1, _BLOCK_C) if dside is not None else 0)
    keys = side_sums is not None
    splits, B, G_keys, H_kv, D = side_sums.part_k.shape if keys else (0, 0, 0, 0, 0)
    keys_end = side_end + B * G_keys * cdiv(H_kv * D, _BLOCK_C)
    rows = row_sums is not None
    splits_r, BH, G_r, BLOCK_D = row_sums.part.shape if rows else (0, 0, 0, 16)
    slot_tiles = cdiv(G_r, _ROWS_BLOCK) if rows else 0
    n_programs = keys_end + BH * slot_tiles
    if n_programs == 0:
        return dband, dside
    index = keys and side_sums.index is not None
    S = side_sums.out_k.shape[1] if keys else 0
    pk, pv, ok, ov = side_sums[:4] if keys else (part,) * 4
    sidx = side_sums.index if index else part
    smask = side_sums.mask if index and side_sums.mask is not None and side_sums.mask.numel() else None
    cached(_reduce_kernel)[(n_programs,)](
        part, part if dband is None else dband, part if dside is None else dside, pk, pv, ok, ov, sidx,
        part if smask is None else smask.view(torch.uint8),
        H, sum(widths), n_z, block_m - 1, W, widths[0], 2 * G + 1, n_z if G else 0, band_end, side_end,
        S, G_keys, H_kv * D, splits, B * G_keys * H_kv * D, sidx.stride(0) if index else 0,
        HAS_BAND=dband is not None, HAS_SIDE=dside is not None, HAS_KEYS=keys, KEYS_INDEX=index,
        HAS_SMASK=smask is not None, BLOCK_C=_BLOCK_C, UNROLL=_UNROLL, num_warps=2,
        **(_row_sums_args(row_sums, keys_end, slot_tiles) if rows else {}),
    )
    return dband, dside


def _row_sums_args(row_sums, keys_end, slot_tiles) -> dict:
    """``_reduce_kernel``'s keywords of a ``RowSums``."""
    dq, part = row_sums.dq, row_sums.part
    return dict(HAS_ROWS=True, RowPart=part, Pos=row_sums.pos, Used=row_sums.used, DQ=dq, stride_qb=dq.stride(0),
                stride_qs=dq.stride(1), stride_qh=dq.stride(2), rows_S=dq.shape[1], rows_H=dq.shape[2],
                rows_G=row_sums.pos.shape[1], rows_D=dq.shape[3], rows_splits=part.shape[0],
                rows_scale=float(row_sums.scale), stride_pb=row_sums.pos.stride(0), n_slot_tiles=slot_tiles,
                keys_end=keys_end, BLOCK_G=_ROWS_BLOCK, BLOCK_DG=part.shape[3])


@triton.jit
def _sum_rows(Src, Dst, src_off, dst_off, cols, ok, n_z, stride_z, ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr,
              UNROLL: tl.constexpr):
    """``Dst[dst_off + cols] = sum of Src[src_off + z * stride_z + cols] over z = 0, 1, ..., n_z - 1`` in that order in
    float32 (with ACCUMULATE then plus Dst's value), stored in Dst's dtype, for the columns where ``ok``."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for z0 in range(0, n_z, UNROLL):
        for u in tl.static_range(UNROLL):
            z = z0 + u
            acc += tl.load(Src + src_off + z.to(tl.int64) * stride_z + cols, mask=ok & (z < n_z), other=0.0)
    if ACCUMULATE:
        acc += tl.load(Dst + dst_off + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Dst + dst_off + cols, acc.to(Dst.dtype.element_ty), mask=ok)


@triton.jit
def _table_tile(Part, Dst, p, H, part_width, c0, n_cols, n_z, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr):
    """Program ``p`` of a table's gradient (H, n_cols): columns ``[c0, c0 + n_cols)`` of the partial rows (B, dQ
    programs, H, part_width) summed over (B, dQ programs) (``n_z`` rows)."""
    per_row = tl.cdiv(n_cols, BLOCK_C)
    h = p // per_row
    cols = (p % per_row) * BLOCK_C + tl.arange(0, BLOCK_C)
    _sum_rows(Part, Dst, h.to(tl.int64) * part_width + c0, h.to(tl.int64) * n_cols, cols, cols < n_cols, n_z,
              H * part_width, False, BLOCK_C, UNROLL)


@triton.jit
def _keys_tile(DSK, DSV, DK, DV, SIdx, SMask, p, S, G, row_width, splits, stride_split, stride_ib,
               INDEX: tl.constexpr, HAS_SMASK: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr):
    """Program ``p`` of the side keys' dK/dV (``SideSums``): side key (b, g)'s ``row_width = H_kv * D`` entries,
    summed over the ``splits`` chunks, stored into row (b, g) of DK, DV, or with INDEX added into row
    ``SIdx[b, g]`` of the (B, S, H_kv, D) DK, DV (skipped where SMask is 0 or the index is outside [0, S))."""
    per_row = tl.cdiv(row_width, BLOCK_C)
    r = p // per_row  # (b, g)
    cols = (p % per_row) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < row_width
    src_off = r.to(tl.int64) * row_width
    dst_off = src_off
    if INDEX:
        b = r // G
        row = tl.load(SIdx + b * stride_ib + r % G)
        keep = (row >= 0) & (row < S)
        if HAS_SMASK:
            keep = keep & (tl.load(SMask + r) != 0)
        ok = ok & keep
        dst_off = (b.to(tl.int64) * S + row) * row_width
    _sum_rows(DSK, DK, src_off, dst_off, cols, ok, splits, stride_split, INDEX, BLOCK_C, UNROLL)
    _sum_rows(DSV, DV, src_off, dst_off, cols, ok, splits, stride_split, INDEX, BLOCK_C, UNROLL)


@triton.jit
def _reduce_kernel(Part, DBand, DSide, DSK, DSV, DK, DV, SIdx, SMask,
                   H, part_width, n_z, band_c0, band_cols, side_c0, side_cols, side_z, band_end, side_end,
                   S, G, row_width, splits, stride_split, stride_ib,
                   HAS_BAND: tl.constexpr, HAS_SIDE: tl.constexpr, HAS_KEYS: tl.constexpr, KEYS_INDEX: tl.constexpr,
                   HAS_SMASK: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
                   HAS_ROWS: tl.constexpr = False, RowPart=None, Pos=None, Used=None, DQ=None, stride_qb=None,
                   stride_qs=None, stride_qh=None, rows_S=None, rows_H=None, rows_G=None, rows_D=None,
                   rows_splits=None, rows_scale=None, stride_pb=None, n_slot_tiles=None, keys_end=None,
                   BLOCK_G: tl.constexpr = 16, BLOCK_DG: tl.constexpr = 16):
    """The backward's one reduction (``reduce_partials``), programs laid out over its outputs: ``[0, band_end)``
    the band table's gradient (H, band_cols), ``[band_end, side_end)`` the side table's (H, side_cols), then
    the side keys' dK/dV (``_keys_tile``) up to ``keys_end``, then with HAS_ROWS (``RowSums``) Longformer's global
    rows' dq, one program per (b * H + h, slot tile). Absent outputs (flags off) have no programs."""
    pid = tl.program_id(0)
    if HAS_BAND:
        if pid < band_end:
            _table_tile(Part, DBand, pid, H, part_width, band_c0, band_cols, n_z, BLOCK_C, UNROLL)
    if HAS_SIDE:
        if (pid >= band_end) & (pid < side_end):
            _table_tile(Part, DSide, pid - band_end, H, part_width, side_c0, side_cols, side_z, BLOCK_C, UNROLL)
    if HAS_ROWS:
        if pid >= keys_end:
            r = pid - keys_end
            combine_program(r % n_slot_tiles, r // n_slot_tiles, (tl.num_programs(0) - keys_end) // n_slot_tiles,
                            RowPart, RowPart, Pos, Used, DQ, RowPart, stride_qb, stride_qs, stride_qh, rows_S, rows_H,
                            rows_G, rows_D, rows_splits, rows_scale, stride_pb, True, BLOCK_G, BLOCK_DG)
            return
    if HAS_KEYS:
        if pid >= side_end:
            _keys_tile(DSK, DSV, DK, DV, SIdx, SMask, pid - side_end, S, G, row_width, splits, stride_split,
                       stride_ib, KEYS_INDEX, HAS_SMASK, BLOCK_C, UNROLL)


@triton.jit
def shifted_column_sums(ds, shift, L: tl.constexpr):
    """(L,) float32 ``v[x] = sum_r ds[r, x - shift[r]]``; terms with ``x - shift[r]`` outside the tile are left out.

    ``ds``: (BLOCK_M, BLOCK_N) float32; ``shift``: (BLOCK_M,) int32, >= L drops a row.
    """
    x = tl.arange(0, L)
    col = x[None, :] - shift[:, None]
    ok = (col >= 0) & (col < ds.shape[1])
    skewed = tl.gather(ds, tl.where(ok, col, 0), 1)
    return tl.sum(tl.where(ok, skewed, 0.0), 0)


# Side rows summed together: those whose block ids lie within SIDE_SPAN of the group's largest (a 64-row tile
# of LongT5, 16 tokens per block, spans 4).
SIDE_SPAN = tl.constexpr(16)


@triton.jit
def side_group(qb, pending, L: tl.constexpr):
    """(qhi, shift, rest) for the ``pending`` rows (BLOCK_M,) of block ids ``qb``: the largest id ``qhi``, the
    shifts ``qhi - qb`` of the rows within SIDE_SPAN of it (L, which drops a row, for the others) and the pending
    rows left for a later group."""
    qhi = tl.max(tl.where(pending, qb, -2147483647), 0)
    shift = tl.where(pending & (qhi - qb < SIDE_SPAN), qhi - qb, L)
    return qhi, shift, pending & (shift == L)


@triton.jit
def grouped_column_sums(ds, shift, L: tl.constexpr, DOT_PREC: tl.constexpr):
    """``shifted_column_sums`` for rows with ``shift < SIDE_SPAN`` (the others left out), the row sum on tensor
    cores: ``z[k, c]`` = sum of ``ds[r, c]`` over the rows with shift k, a (SIDE_SPAN, BLOCK_M) one-hot product
    (TF32 for 16-bit inputs, "ieee" for float32; 3xTF32 would be exact but spills), then only z is skewed."""
    k = tl.arange(0, SIDE_SPAN)
    onehot = (k[:, None] == shift[None, :]).to(tl.float32)
    z = tl.dot(onehot, ds, input_precision=DOT_PREC)
    return shifted_column_sums(z, k, L)


@triton.jit
def _store_entries(row_ptr, cols, values, mask, ACCUMULATE: tl.constexpr):
    """Store (or, with ACCUMULATE, add to) columns ``cols`` of a partial row."""
    if ACCUMULATE:
        values += tl.load(row_ptr + cols, mask=mask, other=0.0)
        tl.debug_barrier()  # every thread holding a replica of an entry has read it before any writes it
    tl.store(row_ptr + cols, values, mask=mask)


@triton.jit
def chain_add(carry, v, row_ptr, base, row_width, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Adds tile sums ``v`` (entries ``[base, base + L)``) to the carry of the previous tile (entries from
    ``base - BLOCK_N``, its first BLOCK_N already stored), stores entries ``[base, base + BLOCK_N)`` (now
    final: later tiles start at ``base + BLOCK_N`` or beyond) and returns the new carry."""
    L: tl.constexpr = v.shape[0]
    x = tl.arange(0, L)
    ahead = x + BLOCK_N
    carry = tl.where(ahead < L, tl.gather(carry, tl.minimum(ahead, L - 1), 0), 0.0) + v
    cols = base + x
    _store_entries(row_ptr, cols, carry, (x < BLOCK_N) & (cols >= 0) & (cols < row_width), ACCUMULATE)
    return carry


@triton.jit
def chain_flush(carry, row_ptr, base, row_width, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Stores the carry's entries not yet stored, ``[base + BLOCK_N, base + L)`` (``base``: the last tile's)."""
    x = tl.arange(0, carry.shape[0])
    cols = base + x
    _store_entries(row_ptr, cols, carry, (x >= BLOCK_N) & (cols >= 0) & (cols < row_width), ACCUMULATE)


@triton.jit
def zero_fill(row_ptr, lo, hi, BLOCK: tl.constexpr):
    """Zeros in columns ``[max(lo, 0), hi)`` of a partial row: the entries no tile of this program reaches."""
    offs = tl.arange(0, BLOCK)
    for c0 in range(tl.maximum(lo, 0), hi, BLOCK):
        tl.store(row_ptr + c0 + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=c0 + offs < hi)
