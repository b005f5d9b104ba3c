"""Gradients of the band_bias (H, W) and side_bias (H, 2G + 1) tables, reduced inside the dQ kernel.

``dbias[h, t] = sum over (b, i) of dS[b, h, i, key(i, t)]`` where ``key(i, t) = i + t - left`` (band) or
``t - G + query_block[b, i]`` (side). The dQ program of a query tile (``band_side._rows_kernel`` with
``BACKWARD``) already holds dS for each of its key tiles; the helpers here sum it by table entry in registers
and write one float32 row of partial sums per program (``partials``); ``reduce_partials`` sums the rows over
programs in a fixed order. No atomics, no second pass over q/k/v: two runs are bitwise equal.

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

Partial rows (``partials``): program (b, query tile, h) owns one row of ``band_width + side_width`` floats;
band entry t is column ``t + BLOCK_M - 1``, side entry e is column ``band_width + e``. Every column is written
by its program (the entries its tiles never reach with zeros), so the buffer needs no initialisation.
LongT5 TGlobal at S = 16384, H = 12, G = 1024, W = 255 with 64 x 64 tiles (L = 128): 384 band + 2176 side
columns x 256 query tiles x 12 heads = 30 MiB per batch row, written once and read once by the reduction
(~20 us of HBM time on an H100, against a backward of several ms).

Cost (static SASS of the sm_90 bf16 build, D = 64, 8 warps; not timed, no GPU): the band tile loop grows from
1008 to 1391 instructions per tile, the side tile loop from 1056 to 1216 (8 extra HMMA for the one-hot
product; the three 64 x 64 x 64 wgmma products are unchanged). For LongT5 (5 band + 16 side tiles per query
tile in dQ, 5 + 16 in the dK/dV kernels at 1085 / 1175 per tile) that is 4475 extra instructions against
45491 per query tile: 9 % of the backward if it is issue-bound, less where the tensor cores bound it. The
separate kernel this replaced recomputed every score on the FMA units (12 ms per call on an H100, 88 % of the
backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def row_widths(has_band: bool, has_side: bool, W: int, G: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(band_width, side_width) columns of a program's partial row; 0 for an absent table."""
    L = 2 * max(block_m, block_n)
    band = (triton.cdiv(block_m - 1 + W, block_n) - 1) * block_n + L if has_band else 0
    side = 2 * G + L if has_side and G > 0 else 0
    return band, side


def partials(B, n_query_tiles, H, widths, like):
    """Uninitialised float32 (B, query tiles, H, band_width + side_width) (the kernel writes every column);
    ``like`` (never read) when there is no table to differentiate."""
    if sum(widths) == 0:
        return like
    return torch.empty(B, n_query_tiles, H, sum(widths), dtype=torch.float32, device=like.device)


def reduce_partials(part, widths, band_bias, side_bias, W, G, block_m):
    """(dband_bias, dside_bias), contiguous in the tables' dtypes (None when absent): the rows summed over
    programs in a fixed order (torch's reduction), then the table's columns cut out."""
    total = part.sum((0, 1)) if sum(widths) else None
    dband = dside = None
    if band_bias is not None:
        dband = total[:, block_m - 1 : block_m - 1 + W].to(band_bias.dtype).contiguous()
    if side_bias is not None:  # G = 0: the table (H, 1) scores no key
        side = slice(widths[0], widths[0] + 2 * G + 1)
        dside = total[:, side].to(side_bias.dtype).contiguous() if G else torch.zeros_like(side_bias)
    return dband, dside


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
