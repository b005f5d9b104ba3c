"""Dropout keep bits for score tiles, bit-identical to ``longattn._dropout`` (see its module doc for the layout).

``tl.philox(seed, c0, c1, c2, c3)`` is Random123's Philox4x32-10 with key ``(seed & 0xffffffff, seed >> 32)``
(checked against the known-answer vectors in tests/test_dropout_rng.py); ``tl.randint`` / ``tl.rand`` are
not used because they fix the counter to ``(offset_lo, offset_hi, 0, 0)``, a per-element linear index,
while our layout spreads (b, h, row, key group) over the four counter words and uses all four outputs.

Use in a kernel (rows = query positions, n0 = first key of a (BLOCK_M, BLOCK_N) score tile)::

    seed, c0, c1 = dropout_counter_base(rng_ptr, pid_bh)                 # once per program
    keep = keep_tile_aligned(seed, c0, c1, offs_m, n0, thresh, BLOCK_N, False, False)  # SIDE, GLOBAL_ROWS
    p_dropped = tl.where(keep, p, 0.0) * keep_scale                          # keep_scale = 1 / (1 - p)

The forward, dQ and dK/dV kernels call the same helper for the same (rows, keys), so they see the same bits
whatever their tile shapes. ``keep_tile_aligned`` needs ``n0`` to be a multiple of 4 (key tiles that start
at ``m0 - left`` must then start at ``floor((m0 - left) / 4) * 4``); ``keep_tile`` takes any int32 key
positions, at 4x the Philox work. Longformer's global rows pass their slot indices as ``rows`` with
``GLOBAL_ROWS`` and their keys (all tokens) with ``SIDE``. ``thresh`` is ``longattn._dropout.keep_threshold_i32(p)``,
the int32 bits of the uint32 threshold (a Python int >= 2**31 would be typed int64). Keys outside ``[0, S)``
(negative ``n0``, tiles hanging past the end) get well-defined bits that the caller masks anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longattn._dropout import dropout_scale, keep_threshold_i32

from ._common import cdiv, interpreting
from ._launch import cached


@triton.jit
def dropout_counter_base(rng_ptr, bh):
    """(seed uint64, c0 uint32, c1 uint32) of batch-head ``bh``: ``c0:c1 = (offset >> 2) + bh`` (uint64).

    ``rng_ptr`` points at the int64 ``[seed, offset]`` pair (uint64 bit patterns); it is read from memory
    so a CUDA-graph replay sees the values refilled for that replay.
    """
    seed = tl.load(rng_ptr).to(tl.uint64, bitcast=True)
    offset = tl.load(rng_ptr + 1).to(tl.uint64, bitcast=True)
    base = (offset >> 2) + bh.to(tl.uint64)
    return seed, base.to(tl.uint32), (base >> 32).to(tl.uint32)


@triton.jit
def _word(x, FLAGGED: tl.constexpr):
    """int32 positions as uint32 counter words; ``FLAGGED`` sets the top bit (the side-key flag of a key-group word,
    the global-row flag of a row word). A literal, not a ``tl.constexpr`` global: Triton re-checks every global a
    kernel reads at each launch."""
    words = x.to(tl.uint32, bitcast=True)
    if FLAGGED:
        words = words | 0x80000000
    return words


@triton.jit
def _philox_tile(seed, c0, c1, rows, groups, GLOBAL_ROWS: tl.constexpr):
    """The four Philox words ``(len(rows), len(groups))`` of query rows ``rows`` and key-group words ``groups``."""
    c2, c3 = tl.broadcast(groups[None, :], _word(rows, GLOBAL_ROWS)[:, None])
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _interleave4(x0, x1, x2, x3):
    """``out[:, 4q + lane] = x_lane[:, q]``: interleave(a, b) puts a[k] at 2k and b[k] at 2k + 1."""
    return tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))


@triton.jit
def _aligned_groups(n0, BLOCK_N: tl.constexpr, SIDE: tl.constexpr):
    return _word((n0 >> 2) + tl.arange(0, BLOCK_N // 4), SIDE)


@triton.jit
def bits_tile_aligned(seed, c0, c1, rows, n0, BLOCK_N: tl.constexpr, SIDE: tl.constexpr,
                      GLOBAL_ROWS: tl.constexpr):
    """uint32 bits ``(len(rows), BLOCK_N)`` of keys ``n0 + [0, BLOCK_N)`` (``n0 % 4 == 0``) of query rows ``rows``.

    One Philox call per 4 keys: call ``(row, q)`` gives keys ``4q .. 4q + 3`` its four words, which are
    interleaved back into key order. ``rows``: int32 ``(BLOCK_M,)`` positions; ``n0``: int32 scalar
    (band key position, or side-key index with ``SIDE``).
    """
    x0, x1, x2, x3 = _philox_tile(seed, c0, c1, rows, _aligned_groups(n0, BLOCK_N, SIDE), GLOBAL_ROWS)
    return _interleave4(x0, x1, x2, x3)


@triton.jit
def keep_tile_aligned(seed, c0, c1, rows, n0, thresh, BLOCK_N: tl.constexpr, SIDE: tl.constexpr,
                      GLOBAL_ROWS: tl.constexpr):
    """Keep mask (bool) of ``bits_tile_aligned``; ``thresh``: int32 bits of the uint32 keep threshold.

    The words are compared before interleaving, so the layout shuffle moves booleans, not 32-bit words.
    """
    t = thresh.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = _philox_tile(seed, c0, c1, rows, _aligned_groups(n0, BLOCK_N, SIDE), GLOBAL_ROWS)
    return _interleave4(x0 >= t, x1 >= t, x2 >= t, x3 >= t)


@triton.jit
def bits_tile(seed, c0, c1, rows, cols, SIDE: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    """uint32 bits ``(len(rows), len(cols))`` for any int32 key positions ``cols`` (one Philox call per key)."""
    x0, x1, x2, x3 = _philox_tile(seed, c0, c1, rows, _word(cols >> 2, SIDE), GLOBAL_ROWS)
    lane = (cols & 3)[None, :]
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def keep_tile(seed, c0, c1, rows, cols, thresh, SIDE: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    """Keep mask (bool) of ``bits_tile``; ``thresh``: int32 bits of the uint32 keep threshold."""
    return bits_tile(seed, c0, c1, rows, cols, SIDE, GLOBAL_ROWS) >= thresh.to(tl.uint32, bitcast=True)


@triton.jit
def keep_scale_tile(rng_ptr, bh, rows, n0, thresh, keep_scale, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
                    SIDE: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    """Dropout factors ``Z = keep / (1 - p)`` (float32 ``(len(rows), BLOCK_N)``) of batch-head ``bh``, query rows
    ``rows`` and keys ``n0 + [0, BLOCK_N)``: what an attention kernel multiplies its probabilities by.

    ``ALIGNED`` (``n0 % 4 == 0``) uses ``keep_tile_aligned`` (one Philox call per 4 keys), else ``keep_tile``;
    ``keep_scale`` is ``1 / (1 - p)``. Reads ``[seed, offset]`` at ``rng_ptr`` (two cached scalar loads).
    """
    seed, c0, c1 = dropout_counter_base(rng_ptr, bh)
    if ALIGNED:
        keep = keep_tile_aligned(seed, c0, c1, rows, n0, thresh, BLOCK_N, SIDE, GLOBAL_ROWS)
    else:
        keep = keep_tile(seed, c0, c1, rows, n0 + tl.arange(0, BLOCK_N), thresh, SIDE, GLOBAL_ROWS)
    return tl.where(keep, keep_scale, 0.0)


def check_offset(dropout_offset) -> int:
    """``dropout_offset`` (``notes/halo_contract.md`` section 3) as an int: ValueError unless it is an int in
    ``[0, 2**31)`` (an int32 kernel argument: row ids are int32 words) and a multiple of 4 (key tiles aligned to 4
    locally then stay aligned in the counters: ``keep_tile_aligned``)."""
    o = dropout_offset
    if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < 2**31 or o % 4:
        raise ValueError(f"dropout_offset: expected an int in [0, 2**31) that is a multiple of 4, got {o!r}")
    return o


def kernel_args(dropout_p: float, rng, dummy, offset: int = 0) -> dict:
    """The attention kernels' dropout keywords ``Rng, drop_thresh, drop_scale, HAS_DROPOUT``: ``dropout_p = 0``
    compiles them without any dropout code (``dummy``, any tensor, stands in for the unread ``rng``).

    ``offset`` (``check_offset``; moot without dropout): with dropout and ``offset != 0`` also ``HAS_DOFFSET`` and
    ``drop_offset``, the position the kernels add to their query rows and band keys (not side keys) before drawing
    bits. Without one those keywords are left out: their defaults (False, None) compile today's kernels."""
    offset = check_offset(offset)
    if not dropout_p:
        return dict(Rng=dummy, drop_thresh=0, drop_scale=1.0, HAS_DROPOUT=False)
    args = dict(Rng=rng, drop_thresh=keep_threshold_i32(dropout_p), drop_scale=dropout_scale(dropout_p),
                HAS_DROPOUT=True)
    if offset:
        args.update(HAS_DOFFSET=True, drop_offset=offset)
    return args


# --------------------------------------------------------------------------------------------------------
# A materialised mask, for tests and debugging (the attention kernels never store one)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tiles_kernel(rng_ptr, out_ptr, n_rows, n_cols, row0, col0, stride_bh, stride_row, thresh,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, KEEP: tl.constexpr,
                  SIDE: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seed, c0, c1 = dropout_counter_base(rng_ptr, bh)
    rows = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = col0 + pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    if KEEP:
        if ALIGNED:
            out = keep_tile_aligned(seed, c0, c1, rows, n0, thresh, BLOCK_N, SIDE, GLOBAL_ROWS).to(tl.int32)
        else:
            out = keep_tile(seed, c0, c1, rows, cols, thresh, SIDE, GLOBAL_ROWS).to(tl.int32)
    else:
        if ALIGNED:
            out = bits_tile_aligned(seed, c0, c1, rows, n0, BLOCK_N, SIDE, GLOBAL_ROWS).to(tl.int32, bitcast=True)
        else:
            out = bits_tile(seed, c0, c1, rows, cols, SIDE, GLOBAL_ROWS).to(tl.int32, bitcast=True)
    r = (rows - row0)[:, None]
    c = (cols - col0)[None, :]
    ptrs = out_ptr + bh.to(tl.int64) * stride_bh + r.to(tl.int64) * stride_row + c
    tl.store(ptrs, out, mask=(r < n_rows) & (c < n_cols))


def dropout_tiles(rng: torch.Tensor, BH: int, row0: int, n_rows: int, col0: int, n_cols: int, *,
                  thresh: int | None = None, side: bool = False, global_rows: bool = False, aligned: bool = True,
                  block: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """What the kernel helpers give for rows ``row0 + [0, n_rows)`` and keys ``col0 + [0, n_cols)`` (side-key
    indices with ``side``) of every (b, h), computed tile by tile: ``(BH, n_rows, n_cols)`` uint32 bits (as
    int64), or with ``thresh`` (``keep_threshold_i32(p)``) the bool keep mask.

    ``aligned`` uses the 4-keys-per-call helpers and needs ``col0 % 4 == 0``. ``rng``: int64 ``(2,)`` on the
    device.
    """
    if aligned and col0 % 4:
        raise ValueError(f"col0: the aligned tiles need a multiple of 4, got {col0}")
    out = torch.empty((BH, n_rows, n_cols), dtype=torch.int32, device=rng.device)
    block_m, block_n = block
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n), BH)
    cached(_tiles_kernel)[grid](rng, out, n_rows, n_cols, row0, col0, out.stride(0), out.stride(1),
                        0 if thresh is None else thresh, BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned,
                        KEEP=thresh is not None, SIDE=side, GLOBAL_ROWS=global_rows,
                        num_warps=1 if interpreting() else 4)
    return out.to(torch.int64) & 0xFFFFFFFF if thresh is None else out != 0
