"""Longformer's global-slot layout (``longattn.backends._longformer.global_slots``) in one launch.

Per batch row b, with ``is_global = global_mask & key_padding_mask`` (``global_mask`` without a padding mask):

- ``band_rows[b, s] = real[b, s] & ~is_global[b, s]`` (B, S) bool;
- ``pos[b, :]`` (B, G) int64: the first G entries of a stable descending argsort of ``is_global[b]`` — the global
  positions in sequence order (slot ``r`` = the r-th global), then the non-global positions in sequence order
  (slot ``n + r'`` = the r'-th non-global, ``n`` the row's global count);
- ``used[b, g] = is_global[b, pos[b, g]]`` (B, G) bool, i.e. ``g < n``.

The slot of every position is a bijection of [0, S), so each of the G slots is written exactly once (outputs are
``torch.empty``). One program per batch row:

1. walks the row in chunks of ``BLOCK`` tokens, writing ``band_rows`` and counting the chunk's globals (``tl.sum``)
   into a running count ``n``; only a chunk holding one of the first G globals also runs the scan (``tl.cumsum``
   inside the chunk + ``n``: rank r of each global) and writes ``pos[r] = s`` for r < G;
2. writes the non-global slots ``n + r' < G`` (none when ``n >= G``). They depend on the row's count, known only
   after step 1, but need no second full walk: the r'-th non-global with ``n + r' < G`` sits at ``s = r' +
   (globals before s) <= r' + n < G``, so a walk over ``[0, G)`` with the same scan finds them all;
3. writes ``used[g] = g < n`` (the globals hold slots ``[0, n)``): a contiguous store, no scatter.

Layouts: ``global_mask`` / ``key_padding_mask`` (B, S) bool with any strides, read in place through uint8 views
(no copy, no dtype conversion); outputs contiguous.

Cost (a prediction, NOT MEASURED: no GPU when written). 2 bytes read and 1 written per token, so bandwidth is
nothing (384 KB at S = 131072); the walk is latency-bound, one program per row: an iteration is one load round trip
from HBM (~0.7 us) plus a 16-warp reduction (~0.2 us), a chunk holding one of the first G globals adds its scan and
scatter (~0.3 us). B = 1, S = 131072: 16 chunks + 1 chunk of step 2 (G <= 8192) -> ~15-20 us on one SM, for any
number of globals, in place of the 4-5 torch kernels (and, xor, an argsort = a multi-kernel radix sort, gather).
For B up to the SM count the rows run side by side in the same time. If measured slower than that, prefetching the
next chunk's masks (a loop-carried load) overlaps the round trip with the reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

# Chunk = tokens per iteration of the serial walk, whose iterations are latency-bound: the larger, the fewer. 8192
# over 16 warps = 16 tokens per thread (one 16-byte load per contiguous mask): ~128 registers on sm_90, no spill
# (the scan's scatter holds a 64-bit address and value per token); over 8 warps it needs ~240. One program per row,
# so 16 warps of one CTA per SM are all the occupancy there is to have. Under the interpreter, 16: tests' short
# rows cross chunks.
_GPU_BLOCK, _GPU_WARPS = 8192, 16
_INTERPRET_BLOCK = 16


@triton.jit
def _load_global(GMask, PMask, offs, S, stride_gs, stride_ps, HAS_PAD: tl.constexpr):
    """(is_global, real) int32 of tokens ``offs`` (0 beyond S); ``GMask`` / ``PMask`` point at the row."""
    in_row = offs < S
    glob = tl.load(GMask + offs * stride_gs, mask=in_row, other=0).to(tl.int32)
    if HAS_PAD:
        real = tl.load(PMask + offs * stride_ps, mask=in_row, other=0).to(tl.int32)
        glob = glob & real
    else:
        real = in_row.to(tl.int32)
    return glob, real


@triton.jit
def _slots_kernel(GMask, PMask, BandRows, Pos, Used, S, G, stride_gb, stride_gs, stride_pb, stride_ps,
                  HAS_PAD: tl.constexpr, BLOCK: tl.constexpr, Zero=None, n_zero=None, KRanges=None, SideR=None,
                  RowR=None, Before=None, RANGES_ONLY: tl.constexpr = False):
    """Row b of the slot layout (module docstring): GMask / PMask (B, S) uint8 with strides; BandRows (B, S) uint8,
    Pos (B, G) int64, Used (B, G) uint8 contiguous. With ``Zero`` (contiguous int32 (B, n_zero)) row b of it is
    zeroed too (the counters of the launch after this one, ``global_rows.combine_when_last``).

    With ``KRanges`` (contiguous int32 (B, S, 2), a packed batch's per-row key ranges) also the ranges of
    ``_longformer.slot_ranges``: SideR (B, S, 2), each row's slots ``[globals before lo, globals before hi)`` (at most
    G), and RowR (B, G, 2), each slot's token's range (empty for unused slots), through Before (int32 (B, S + 1):
    the globals before each position, written by the walk, read after a barrier). RANGES_ONLY: Pos and Used are
    inputs (the backward's), only the ranges are written."""
    b = tl.program_id(0).to(tl.int64)
    if Zero is not None:
        for z0 in range(0, n_zero, BLOCK):
            offs = z0 + tl.arange(0, BLOCK)
            tl.store(Zero + b * n_zero + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < n_zero)
    gmask = GMask + b * stride_gb
    pmask = PMask + b * stride_pb
    pos = Pos + b * G
    used = Used + b * G
    lanes = tl.arange(0, BLOCK)
    n = 0  # globals before the chunk; after the walk, the row's count
    for s0 in range(0, S, BLOCK):
        offs = s0 + lanes
        glob, real = _load_global(gmask, pmask, offs, S, stride_gs, stride_ps, HAS_PAD)
        count = tl.sum(glob, 0)
        if not RANGES_ONLY:
            tl.store(BandRows + b * S + offs, (real & (glob ^ 1)).to(tl.uint8), mask=offs < S)
            if (count > 0) & (n < G):  # rare: only chunks holding one of the first G globals pay for the scan
                rank = n + tl.cumsum(glob, 0) - glob  # globals before each token
                slot_ok = (glob != 0) & (rank < G)
                tl.store(pos + rank, offs.to(tl.int64), mask=slot_ok)
        if KRanges is not None:
            tl.store(Before + b * (S + 1) + offs, n + tl.cumsum(glob, 0) - glob, mask=offs < S)
        n += count
    if KRanges is not None:
        tl.store(Before + b * (S + 1) + S, n)
    if not RANGES_ONLY:
        _free_slots(gmask, pmask, pos, used, n, S, G, stride_gs, stride_ps, HAS_PAD, BLOCK)
    if KRanges is not None:
        tl.debug_barrier()  # Before and the slots are read by other threads of this program
        _row_ranges(KRanges + b * 2 * S, SideR + b * 2 * S, RowR + b * 2 * G, Before + b * (S + 1), pos, used, S, G,
                    BLOCK)


@triton.jit
def _free_slots(gmask, pmask, pos, used, n, S, G, stride_gs, stride_ps, HAS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Steps 2 and 3 of the module docstring: the non-global slots and ``used``."""
    lanes = tl.arange(0, BLOCK)
    # Non-global slots n + r' < G: their tokens lie in [0, G) (module docstring); none when n >= G.
    before = 0  # globals before the chunk, again
    for s0 in range(0, tl.where(n < G, G, 0), BLOCK):
        offs = s0 + lanes
        glob, real = _load_global(gmask, pmask, offs, S, stride_gs, stride_ps, HAS_PAD)
        slot = n + offs - (before + tl.cumsum(glob, 0) - glob)  # n + (non-globals before the token)
        slot_ok = (glob == 0) & (offs < S) & (slot < G)
        tl.store(pos + slot, offs.to(tl.int64), mask=slot_ok)
        before += tl.sum(glob, 0)
    for g0 in range(0, G, BLOCK):  # the globals hold slots [0, n)
        offs = g0 + lanes
        tl.store(used + offs, (offs < n).to(tl.uint8), mask=offs < G)


@triton.jit
def _row_ranges(kranges, side, rows, before, pos, used, S, G, BLOCK: tl.constexpr):
    """One batch row's ``_longformer.slot_ranges``: side ranges (S, 2) from the key ranges through ``before`` (S + 1
    counts), slot ranges (G, 2) from the slots' tokens. Half-width chunks: the 64-bit addresses of a full one spill
    (sm_90, 16 warps)."""
    CHUNK: tl.constexpr = BLOCK // 2
    lanes = tl.arange(0, CHUNK)
    for s0 in range(0, S, CHUNK):
        offs = s0 + lanes
        ok = offs < S
        for e in tl.static_range(2):
            j = tl.minimum(tl.maximum(tl.load(kranges + 2 * offs + e, mask=ok, other=0), 0), S)
            tl.store(side + 2 * offs + e, tl.minimum(tl.load(before + j, mask=ok, other=0), G), mask=ok)
    for g0 in range(0, G, CHUNK):
        offs = g0 + lanes
        ok = offs < G
        token = tl.load(pos + offs, mask=ok, other=0)
        inside = (token >= 0) & (token < S)  # always, for this kernel's slots; any other value reads nothing
        keep = (tl.load(used + offs, mask=ok, other=0) != 0) & inside
        for e in tl.static_range(2):
            value = tl.load(kranges + 2 * token + e, mask=ok & keep, other=0)
            tl.store(rows + 2 * offs + e, value, mask=ok)


def _check_mask(name: str, mask, shape, device) -> None:
    """TypeError / ValueError naming ``name`` unless ``mask`` is a bool tensor of ``shape`` (None: any 2-d) on
    ``device`` (None: any)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 2 or (shape is not None and mask.shape != shape) or (
            device is not None and mask.device != device):
        raise ValueError(f"{name}: expected a bool {tuple(shape) if shape else '(B, S)'} tensor"
                         f"{f' on {device}' if device else ''}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}")


def global_slots(global_mask, key_padding_mask, G: int, zero=None, key_ranges=None):
    """-> (band_rows (B, S) bool, pos (B, G) int64, used (B, G) bool), bitwise those of
    ``longattn.backends._longformer.global_slots``, in one launch and no other device work (allocations only).

    ``global_mask``: (B, S) bool, any strides; ``key_padding_mask``: None or like it (True = real token);
    ``G``: int in [0, S]; ``zero``: None or a contiguous int32 (B, n) tensor the same launch fills with zeros;
    ``key_ranges``: None or contiguous int32 (B, S, 2) (a packed batch): then also, from the same launch, the two
    dicts of ``_longformer.slot_ranges`` (bitwise), appended to the tuple."""
    _check_mask("global_mask", global_mask, None, None)
    B, S = global_mask.shape
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, global_mask.shape, global_mask.device)
    if isinstance(G, bool) or not isinstance(G, int):
        raise TypeError(f"G: expected an int, got {type(G).__name__}")
    if not 0 <= G <= S:
        raise ValueError(f"G: expected an int in [0, {S}] (S), got {G}")
    device = global_mask.device
    band_rows = torch.empty(B, S, dtype=torch.bool, device=device)
    # G = 0: one slot each, never written (the kernel is not handed a possibly null pointer), returned as (B, 0) views
    pos = torch.empty(B, max(G, 1), dtype=torch.int64, device=device)
    used = torch.empty(B, max(G, 1), dtype=torch.bool, device=device)
    if not G:
        pos, used = pos[:, :0], used[:, :0]
    ranges = _ranges_out(key_ranges, B, S, G, device)
    if B * S:  # (B = 0 leaves ``zero`` nothing to fill; S = 0 has no slot)
        _launch(global_mask, key_padding_mask, band_rows, pos, used, G, key_ranges, ranges,
                {} if zero is None else dict(Zero=zero, n_zero=zero.shape[1]))
    return (band_rows, pos, used) + (() if ranges is None else _ranges_result(key_ranges, ranges, G))


def slot_ranges(global_mask, key_padding_mask, pos, used, G: int, key_ranges):
    """``_longformer.slot_ranges`` (bitwise) in one launch, for the slot layout ``pos``, ``used`` of ``global_slots``
    (the backward's); ``({}, {})`` without ``key_ranges``."""
    if key_ranges is None:
        return {}, {}
    B, S = global_mask.shape
    ranges = _ranges_out(key_ranges, B, S, G, global_mask.device)
    if B * S:  # (band_rows: not written, used stands in)
        _launch(global_mask, key_padding_mask, used, pos, used, G, key_ranges, ranges, dict(RANGES_ONLY=True))
    return _ranges_result(key_ranges, ranges, G)


def _ranges_out(key_ranges, B, S, G, device):
    """(side (B, S, 2), rows (B, G, 2), before (B, S + 1)) int32, new, or None without ``key_ranges``."""
    if key_ranges is None:
        return None
    if key_ranges.dtype != torch.int32 or key_ranges.shape != (B, S, 2) or not key_ranges.is_contiguous():
        raise ValueError(f"key_ranges: expected a contiguous int32 ({B}, {S}, 2) tensor, got {key_ranges.dtype} "
                         f"{tuple(key_ranges.shape)} strides {tuple(key_ranges.stride())}")
    return tuple(torch.empty(*shape, dtype=torch.int32, device=device) for shape in ((B, S, 2), (B, max(G, 1), 2),
                                                                                     (B, S + 1)))


def _ranges_result(key_ranges, ranges, G):
    """``_longformer.slot_ranges``' two dicts (band pass, global rows)."""
    side, rows, _ = ranges
    return {"key_ranges": key_ranges, "side_ranges": side}, {"key_ranges": rows[:, :G]}


def _launch(global_mask, key_padding_mask, band_rows, pos, used, G, key_ranges, ranges, extra):
    """The ``_slots_kernel`` launch (one program per batch row) with the optional outputs of ``extra``."""
    B, S = global_mask.shape
    gm = global_mask.view(torch.uint8)
    pm = gm if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    if key_ranges is not None:
        extra = dict(extra, KRanges=key_ranges, SideR=ranges[0], RowR=ranges[1], Before=ranges[2])
    block, warps = (_INTERPRET_BLOCK, 1) if interpreting() else (_GPU_BLOCK, _GPU_WARPS)
    _slots_kernel[(B,)](gm, pm, band_rows.view(torch.uint8), pos, used.view(torch.uint8), S, G, gm.stride(0),
                        gm.stride(1), pm.stride(0), pm.stride(1), HAS_PAD=key_padding_mask is not None, BLOCK=block,
                        num_warps=warps, **extra)
