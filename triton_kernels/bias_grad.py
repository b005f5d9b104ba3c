"""Gradients of the band_bias (H, W) and side_bias (H, 2G + 1) tables, summed inside the dK/dV kernels, and the
backward's one fixed-order reduction of float32 partials (``reduce_partials``).

``dbias[h, t] = sum over (b, i) of dS[b, h, i, key(i, t)]`` where ``key(i, t) = i + t - left`` (band) or
``t - G + query_block[b, i]`` (side). A dK/dV program of a key tile (``band_side._keys_kernel``: band keys, or side
keys with SIDE) already holds dS for each query tile it walks; the helpers here sum it by table entry in registers
and write float32 rows of partial sums, one per (program, query head) (``partials``); ``reduce_partials`` sums the
rows in a fixed order. No atomics, no second pass over q/k/v: two runs are bitwise equal.

Why there and not in the dQ kernel (issue 12, target 5): the dQ kernel is the pass that can hold two programs per SM
(<= 128 registers at 8 warps on sm_90; the dK/dV kernels need 166-182 registers without any table, one program per
SM either way). Summed in dQ, the tables took it to 254-255 registers (one program per SM: by the H200 timings about
half the throughput); no in-dQ form measured fit (the skews' ``tl.gather`` alone add 55-95 registers, the one-hot
product 36). In the dK/dV kernels the sums add instructions but no occupancy cliff.

Row-shifted column sums. In a (BLOCK_M, BLOCK_N) tile, dS[r, c] belongs to table entry ``e0 + c + shift[r]``:
- band key tile ``n0`` with query tile ``t`` of its walk (rows from ``n0 - right + t * BLOCK_M``, see
  ``band_side._keys_kernel``): entry ``c - r + left + right - t * BLOCK_M``, so ``shift[r] = BLOCK_M - 1 - r`` and
  column ``x`` of the skewed tile is partial-row column ``(left + right - t * BLOCK_M) + x`` (band entry t' is column
  ``t' + BLOCK_M - 1``), the same for every key tile;
- side tile ``g0``: ``e = g0 + c - qb[r] + G``, so ``e0 = g0 + G - qhi`` and ``shift[r] = qhi - qb[r]``, where
  ``qhi`` is the largest block id of the group of rows summed together.
``shifted_column_sums`` (band) skews the tile by its row shifts with one ``tl.gather`` (warp shuffles) into
``L = 2 * max(BLOCK_M, BLOCK_N)`` columns and sums the rows: ``v[x] = sum_r dS[r, x - shift[r]]`` is entry
``e0 + x``. The band walk runs from the last query tile down, so successive tiles' columns rise by BLOCK_M and
``chain_add`` keeps an L-entry carry: shifted by BLOCK_M, plus the new tile, its first BLOCK_M entries are final and
stored (the carry restarts at each query head of a grouped-query program). The side rows have few distinct shifts (a
64-row tile of LongT5, 16 tokens per block, has 4), so ``grouped_column_sums`` first adds the rows of equal shift on
tensor cores (a (16, BLOCK_M) one-hot product) and skews only those 16 rows. A side program's query tiles have
overlapping entries (``qhi`` moves by BLOCK_M / block length per tile, by anything for arbitrary ids), so each
tile's L sums are read-added-written into the row (``side_entry_sums``: load, barrier, store; the row is the
program's own, L2-resident). Rows whose block id lies SIDE_SPAN or more below ``qhi`` (a tile mixing padding rows,
qb = -1, with others; arbitrary ids) are further groups of the same tile, taken only when one reduction of the
rows' largest and smallest ids says so.

Precision: float32 sums of float32 dS; the one-hot product rounds dS to TF32 (10-bit mantissa, finer than the
bf16/fp16 rounding of dS in the dK product) for 16-bit inputs and is exact ("ieee") for float32 inputs.

Partial rows (``partials``, one float32 buffer, every column written by its program after it zeroes its rows, so
the buffer needs no initialisation): band rows (B, band programs, H, W + BLOCK_M - 1), band entry t column
``t + BLOCK_M - 1``, one per band key tile (halo tiles included) and head, linear in S; side rows (splits, B, side
programs, H, 2G + 1), side entry e column e. One side row per side-key tile and query chunk is quadratic in S;
``_common.partial_programs`` keeps one per tile while band and side rows fit max(32 MiB, q's bytes / 4), else fewer
side programs of consecutive side-key tiles (PERSISTENT), never fewer than four waves of programs.
LongT5 TGlobal (H = 12, W = 255, G = S / 16, bf16, D = 64, 64 x 64 tiles; B = 1, 132 SMs):
    S = 16384:  band 3.7 MiB (256 programs) + side 4.5 MiB (3 query chunks x 16 programs, 1 tile each) = 8.2 MiB;
    S = 65536:  band 14.9 MiB + side 16.5 MiB (44 programs of 1-2 tiles; one per tile: 24.0) = 31.4 MiB;
    S = 131072: band 29.8 MiB + side 33.0 MiB (44 programs of 2-3 tiles; one per tile: 96.0) = 62.8 MiB
(the four-wave floor, 528 side programs, outweighs the budget there), written once per tile (side: read and
written per query tile) and read once by the reduction.

The reduction (``reduce_partials``, ``_reduce_kernel``): one launch per backward, after the dK/dV passes, whose
programs are laid out over every output it writes: the band table's gradient, the side table's, and the side
keys' dK/dV from their float32 partials over query chunks (``SideSums``: stored in q's dtype, or with
Longformer's slot index added into the band dK/dV rows the slots name), and for the fused Triton Longformer op the
global rows' dq (``RowSums``: the split programs' partial dq summed per slot, added into the slots' rows). Each
program owns ``_BLOCK_C`` columns of one output row (a global-rows program: ``_ROWS_BLOCK`` slots) and adds its
partial rows in order (``_UNROLL`` loads in flight), so the result is bitwise reproducible and no torch op (sum,
cast, copy, fill) runs around the kernels. On an H200 (2026-11-30, S = 16384, B = 1, H = 12, D = 64, bf16) the
reduction took 29.7 us of TGlobal's 3366 us backward (G = 1024, both tables, then summed in dQ), 24.0 us of local's
840 us.

History and cost. Measured (H200, 2026-11-30, commit dffeee2, Triton 3.6, sums then in dQ): TGlobal's backward took
3.382 ms with both tables and 1.601 ms without (52.7 %). Compiled as the launch specializes it
(``tests/test_triton_bias_cost.py``) the dQ kernel had 120 registers without the tables (two programs per SM) and
254-255 with both (one per SM); the H200 timings give about 1.8-1.9 warp-instructions per cycle per SM at two programs
and 0.95-1.2 at one. By that model the extra 1.78 ms split as: the sums in dQ ~615 us, dQ's fall to one program per
SM ~580 us, the per-element bias gathers ~140 us in dQ and ~435 us in the dK/dV kernels, the reduction ~15 us.
Now (CPU-compiled sm_90 SASS at that shape, Triton 3.8 / 3.6; NOT timed on a GPU): the dQ kernel with both tables has
128 / 128 registers (two programs per SM; its tile loops keep their invariants inside, no LICM: hoisted, the tables'
index tensors alone took it to 144 / 162), band loop 627 / 664 and side loop 640 / 638 instructions per tile (were
992 / 908 and 862 / 872 at one program per SM; 444 / 442 and 461 / 455 without tables). The dK/dV kernels with the
tables (no LICM in their query loop either: hoisted, the skews' indices take the band pass to 255 registers and
spill): band keys 211 / 208 registers, 1286 / 1395 instructions per tile (were 788 / 789; 654 / 660 without tables);
side keys 202 / 254 registers, 1473 / 1365 static instructions per tile of which 1159 / 1112 run when one group covers
the tile's rows, the rest being the rare further groups (were 838 / 845; 666 / 693 without). Since ptxas pipelines
the dK/dV kernels' wgmma (``band_side._keys_kernel``'s ``tl.assume``; they were serialized before, with tables or
without): band keys 228 / 224 registers, 1244 / 1364 instructions per tile (614 / 630 without tables), side keys
187 / 255, 1439 / 1240 static (624 / 635 without). Per LongT5 query tile
(5 band + 16 side tiles in each pass) the model gives, for 3.6, about 36.0k cycles of the dQ and dK/dV passes before
and 32.1k now (19.5k without tables): the occupancy regained in dQ is mostly spent again on the sums in the dK/dV
kernels, where a band tile's skew and cross-warp row sum cost ~430 instructions (~230 of them the row sum) and a
side tile's one-hot product, read-add-write and group test ~420. Left: cheaper bias loads (a Hankel-expanded band
table read as a plain 2-D tile; the gathers cost ~180 instructions per tile in each kernel) and cheaper sums.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cdiv
from ._launch import cached
from .global_rows import combine_program


def row_widths(has_band: bool, has_side: bool, W: int, G: int, block_m: int) -> tuple[int, int]:
    """(band_width, side_width) columns of a partial row: band entry t is column ``t + block_m - 1`` (the chain's
    columns below, all zero, need no room), side entry e column e; 0 for an absent table."""
    band = block_m - 1 + W if has_band else 0
    side = 2 * G + 1 if has_side and G > 0 else 0
    return band, side


class Partials(NamedTuple):
    """The backward's bias-table partial rows, one float32 buffer (the dK/dV passes write every column of their
    rows): ``band`` (B, band dK/dV programs, H, band_width), then ``side`` (splits, B, side dK/dV programs, H,
    side_width) at element ``side_offset`` of ``buffer``; an absent table's is ``like`` (never read)."""

    band: torch.Tensor
    side: torch.Tensor
    buffer: torch.Tensor
    side_offset: int


def partials(band_rows: tuple, side_rows: tuple, widths, like) -> Partials:
    """Uninitialised ``Partials`` of ``band_rows`` + (band_width,) and ``side_rows`` + (side_width,)."""
    n_band = math.prod(band_rows) * widths[0]
    n_side = math.prod(side_rows) * widths[1]
    if n_band + n_side == 0:
        return Partials(like, like, like, 0)
    buffer = torch.empty(n_band + n_side, dtype=torch.float32, device=like.device)
    return Partials(buffer[:n_band].view(*band_rows, widths[0]) if n_band else like,
                    buffer[n_band:].view(*side_rows, widths[1]) if n_side else like, buffer, n_band)


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


def reduce_partials(parts, widths, band_bias, side_bias, W, G, block_m, side_sums=None, row_sums=None):
    """(dband_bias, dside_bias), contiguous in the tables' dtypes (None when absent), and the side keys' dK/dV of
    ``side_sums`` (a ``SideSums`` or None), in one launch of ``_reduce_kernel`` (none when there is nothing to
    write): each output element is its float32 partials summed in a fixed order (a table's rows of ``parts``, a
    ``Partials``, over their leading axes in order; the query chunks in order), so two runs are bitwise equal. The
    side table of G = 0 scores no key: zeros. ``row_sums``: a ``RowSums`` or None, Longformer's global-row dq (its
    programs after the side keys')."""
    H = next((t.shape[0] for t in (band_bias, side_bias) if t is not None), 0)
    band_z = parts.band.numel() // (H * widths[0]) if widths[0] else 0  # band rows per head: (batch row, program)
    side_z = parts.side.numel() // (H * widths[1]) if widths[1] else 0  # side rows: (chunk, batch row, program)
    part = parts.buffer
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
        H, widths[0], band_z, block_m - 1, W, parts.side_offset, widths[1], side_z, 2 * G + 1, band_end, side_end,
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
    """Program ``p`` of a table's gradient (H, n_cols): columns ``[c0, c0 + n_cols)`` of the partial rows (..., H,
    part_width) summed over their ``n_z`` leading index values in order."""
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
                   H, band_width, band_z, band_c0, band_cols, side_offset, side_width, side_z, side_cols, band_end,
                   side_end,
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
            _table_tile(Part, DBand, pid, H, band_width, band_c0, band_cols, band_z, BLOCK_C, UNROLL)
    if HAS_SIDE:
        if (pid >= band_end) & (pid < side_end):
            _table_tile(Part + side_offset, DSide, pid - band_end, H, side_width, 0, side_cols, side_z, BLOCK_C,
                        UNROLL)
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
def grouped_column_sums(ds, shift, L: tl.constexpr, DOT_PREC: tl.constexpr):
    """``shifted_column_sums`` for rows with ``shift < SIDE_SPAN`` (the others left out), the row sum on tensor
    cores: ``z[k, c]`` = sum of ``ds[r, c]`` over the rows with shift k, a (SIDE_SPAN, BLOCK_M) one-hot product
    (TF32 for 16-bit inputs, "ieee" for float32; 3xTF32 would be exact but spills), then only z is skewed."""
    k = tl.arange(0, SIDE_SPAN)
    onehot = (k[:, None] == shift[None, :]).to(tl.float32)
    z = tl.dot(onehot, ds, input_precision=DOT_PREC)
    return shifted_column_sums(z, k, L)


@triton.jit
def _max_min(hi_a, lo_a, hi_b, lo_b):
    return tl.maximum(hi_a, hi_b), tl.minimum(lo_a, lo_b)


@triton.jit
def _group_sums(ds, qb, qhi, pending, row_ptr, base, row_width, L: tl.constexpr, DOT_PREC: tl.constexpr):
    """Adds the sums of the ``pending`` rows within SIDE_SPAN block ids of ``qhi`` (the group) into the row; returns
    the pending rows left (those SIDE_SPAN or more below ``qhi``)."""
    shift = tl.where(pending & (qhi - qb < SIDE_SPAN), qhi - qb, L)  # L drops a row
    sums = grouped_column_sums(ds, shift, L, DOT_PREC)
    cols = base - qhi + tl.arange(0, L)
    tl.debug_barrier()  # the previous sums' stores (this tile's other groups, earlier tiles) are visible
    _store_entries(row_ptr, cols, sums, (cols >= 0) & (cols < row_width), True)
    return pending & (shift == L)


@triton.jit
def side_entry_sums(ds, qb, pending, row_ptr, base, row_width, L: tl.constexpr, DOT_PREC: tl.constexpr):
    """Adds the side-bias sums of a (query tile, side-key tile) ``ds`` (BLOCK_M, BLOCK_N) into columns ``base - qb[r]
    + c`` (``base = G + g0``: side entry g - qb + G) of a partial row, for the ``pending`` rows (BLOCK_M,) of block ids
    ``qb``, read-added-written: the rows within SIDE_SPAN of the largest id first (all of them when the ids span less,
    as in LongT5's tiles: one reduction gives both ends), then, only if some are left (padding rows below others,
    arbitrary ids), group after group of the rest."""
    qhi, qlo = tl.reduce((tl.where(pending, qb, -1), tl.where(pending, qb, 2147483647)), 0, _max_min)
    pending = _group_sums(ds, qb, qhi, pending, row_ptr, base, row_width, L, DOT_PREC)
    if qhi - qlo >= SIDE_SPAN:
        while tl.max(pending.to(tl.int32), 0) > 0:
            pending = _group_sums(ds, qb, tl.max(tl.where(pending, qb, -1), 0), pending, row_ptr, base, row_width, L,
                                  DOT_PREC)


@triton.jit
def _store_entries(row_ptr, cols, values, mask, ACCUMULATE: tl.constexpr):
    """Store (or, with ACCUMULATE, add to) columns ``cols`` of a partial row."""
    if ACCUMULATE:
        values += tl.load(row_ptr + cols, mask=mask, other=0.0)
        tl.debug_barrier()  # every thread holding a replica of an entry has read it before any writes it
    tl.store(row_ptr + cols, values, mask=mask)


@triton.jit
def chain_add(carry, v, row_ptr, base, row_width, STEP: tl.constexpr):
    """Adds tile sums ``v`` (entries ``[base, base + L)``) to the carry of the previous tile (entries from
    ``base - STEP``, its first STEP already stored), stores entries ``[base, base + STEP)`` (now final: later tiles
    start at ``base + STEP`` or beyond) and returns the new carry."""
    L: tl.constexpr = v.shape[0]
    x = tl.arange(0, L)
    ahead = x + STEP
    carry = tl.where(ahead < L, tl.gather(carry, tl.minimum(ahead, L - 1), 0), 0.0) + v
    cols = base + x
    _store_entries(row_ptr, cols, carry, (x < STEP) & (cols >= 0) & (cols < row_width), False)
    return carry


@triton.jit
def chain_flush(carry, row_ptr, base, row_width, STEP: tl.constexpr):
    """Stores the carry's entries not yet stored, ``[base + STEP, base + L)`` (``base``: the last tile's)."""
    x = tl.arange(0, carry.shape[0])
    cols = base + x
    _store_entries(row_ptr, cols, carry, (x >= STEP) & (cols >= 0) & (cols < row_width), False)


@triton.jit
def zero_fill(row_ptr, lo, hi, BLOCK: tl.constexpr):
    """Zeros in columns ``[max(lo, 0), hi)`` of a partial row: the entries no tile of this program reaches."""
    offs = tl.arange(0, BLOCK)
    for c0 in range(tl.maximum(lo, 0), hi, BLOCK):
        tl.store(row_ptr + c0 + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=c0 + offs < hi)
