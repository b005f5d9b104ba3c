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

Cost (a prediction; on an H200, 2026-11-30, at S = 16384, B = 1: 7.3 us with 1 global, 9.9 us with 64). 2 bytes
read and 1 written per token, so bandwidth is
nothing (384 KB at S = 131072); the walk is latency-bound, one program per row: an iteration is one load round trip
from HBM (~0.7 us) plus a 16-warp reduction (~0.2 us), a chunk holding one of the first G globals adds its scan and
scatter (~0.3 us). B = 1, S = 131072: 16 chunks + 1 chunk of step 2 (G <= 8192) -> ~15-20 us on one SM, for any
number of globals, in place of the 4-5 torch kernels (and, xor, an argsort = a multi-kernel radix sort, gather).
For B up to the SM count the rows run side by side in the same time. If measured slower than that, prefetching the
next chunk's masks (a loop-carried load) overlaps the round trip with the reduction.

Packed batches add the slots' ranges and their tile bounds (``_row_ranges``): S / 4096 more steps (each a 4096-row
load of the key ranges, a gather of the counts and two tile reductions), G / 512 for the slots; at S = 131072 that is
32 steps, ~30 us more on one SM (NOT MEASURED either), in place of the bounds kernels' two launches each pass. Their
result is kept for the next call with the same inputs, so the other layers' calls and the backward skip them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longattn._memo import LastCall

from ._common import cdiv, interpreting, load_ranges, store_tile_bounds
from ._launch import cached

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
                  RowR=None, Before=None, BandB=None, SlotB=None, RANGES_ONLY: tl.constexpr = False,
                  BAND_M: tl.constexpr = 16, BAND_TILES: tl.constexpr = 1, SLOT_M: tl.constexpr = 16,
                  SLOT_TILES: tl.constexpr = 1):
    """Row b of the slot layout (module docstring): GMask / PMask (B, S) uint8 with strides; BandRows (B, S) uint8,
    Pos (B, G) int64, Used (B, G) uint8 contiguous. With ``Zero`` (contiguous int32 (B, n_zero)) row b of it is
    zeroed too (the counters of the launch after this one, ``global_rows.combine_when_last``).

    With ``KRanges`` (contiguous int32 (B, S, 2), a packed batch's per-row key ranges) also the ranges of
    ``_longformer.slot_ranges``: SideR (B, S, 2), each row's slots ``[globals before lo, globals before hi)`` (at most
    G), and RowR (B, G, 2), each slot's token's range (empty for unused slots), through Before (int32 (B, S + 1):
    the globals before each position, written by the walk, read after a barrier); and their ``_common.tile_bounds``
    (int32): BandB (B, cdiv(S, BAND_M), 8) of the key and side ranges per tile of BAND_M rows (the band pass's),
    SlotB (B, cdiv(G, SLOT_M), 8) of the used slots' ranges per tile of SLOT_M slots (the global rows'), computed
    BAND_TILES / SLOT_TILES tiles at a time (``_row_ranges``). RANGES_ONLY: Pos and Used are inputs (the backward's),
    only the ranges and bounds are written."""
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
        _row_ranges(KRanges + b * 2 * S, SideR + b * 2 * S, RowR + b * 2 * G, Before + b * (S + 1), pos, used,
                    BandB + b * tl.cdiv(S, BAND_M) * 8, SlotB + b * tl.cdiv(G, SLOT_M) * 8, S, G, BAND_M, BAND_TILES,
                    SLOT_M, SLOT_TILES)


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
def _row_ranges(kranges, side, rows, before, pos, used, band_bounds, slot_bounds, S, G, BAND_M: tl.constexpr,
                BAND_TILES: tl.constexpr, SLOT_M: tl.constexpr, SLOT_TILES: tl.constexpr):
    """One batch row's ``_longformer.slot_ranges`` and their ``_common.tile_bounds``, in one pass over each:

    - side ranges (S, 2) from the key ranges through ``before`` (S + 1 counts), and per tile of BAND_M rows the
      bounds of the key ranges (columns 0..3) and of the side ranges (4..7) into ``band_bounds`` (cdiv(S, BAND_M), 8);
    - slot ranges (G, 2), each used slot's token's key range (empty for unused slots), and per tile of SLOT_M slots
      the bounds of the used slots' ranges (columns 0..3) into ``slot_bounds`` (cdiv(G, SLOT_M), 8).

    BAND_TILES / SLOT_TILES tiles per iteration (``_ranges_args``), reduced along axis 1."""
    n_tiles = tl.cdiv(S, BAND_M)
    for t0 in range(0, n_tiles, BAND_TILES):
        t, offs, ok = _tile_rows(t0, S, BAND_M, BAND_TILES)
        lo, hi = load_ranges(kranges, offs, ok, S)
        side_lo = tl.minimum(tl.load(before + lo, mask=ok, other=0), G)
        side_hi = tl.minimum(tl.load(before + hi, mask=ok, other=0), G)
        tl.store(side + 2 * offs, side_lo, mask=ok)
        tl.store(side + 2 * offs + 1, side_hi, mask=ok)
        out = band_bounds + t * 8
        store_tile_bounds(out, lo, hi, ok, S, 1, t < n_tiles)
        store_tile_bounds(out + 4, side_lo, side_hi, ok, G, 1, t < n_tiles)
    n_slot_tiles = tl.cdiv(G, SLOT_M)
    for t0 in range(0, n_slot_tiles, SLOT_TILES):
        t, offs, ok = _tile_rows(t0, G, SLOT_M, SLOT_TILES)
        token = tl.load(pos + offs, mask=ok, other=0)
        inside = (token >= 0) & (token < S)  # always, for this kernel's slots; any other value reads nothing
        keep = ok & (tl.load(used + offs, mask=ok, other=0) != 0) & inside
        raw_lo = tl.load(kranges + 2 * token, mask=keep, other=0)
        raw_hi = tl.load(kranges + 2 * token + 1, mask=keep, other=0)
        tl.store(rows + 2 * offs, raw_lo, mask=ok)
        tl.store(rows + 2 * offs + 1, raw_hi, mask=ok)
        lo = tl.minimum(tl.maximum(raw_lo, 0), S)  # as load_ranges
        hi = tl.minimum(tl.maximum(raw_hi, 0), S)
        store_tile_bounds(slot_bounds + t * 8, lo, hi, keep, S, 1, t < n_slot_tiles)


@triton.jit
def _tile_rows(t0, n, M: tl.constexpr, TILES: tl.constexpr):
    """(tiles t (TILES,), their rows (TILES, M), rows < n) of tiles t0 .. t0 + TILES - 1 of M rows each."""
    t = t0 + tl.arange(0, TILES)
    offs = t[:, None] * M + tl.arange(0, M)[None, :]
    return t, offs, offs < n


def _check_mask(name: str, mask, shape, device) -> None:
    """TypeError / ValueError naming ``name`` unless ``mask`` is a bool tensor of ``shape`` (None: any 2-d) on
    ``device`` (None: any)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 2 or (shape is not None and mask.shape != shape) or (
            device is not None and mask.device != device):
        raise ValueError(f"{name}: expected a bool {tuple(shape) if shape else '(B, S)'} tensor"
                         f"{f' on {device}' if device else ''}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}")


def global_slots(global_mask, key_padding_mask, G: int, zero=None, key_ranges=None, tiles=None):
    """-> (band_rows (B, S) bool, pos (B, G) int64, used (B, G) bool), bitwise those of
    ``longattn.backends._longformer.global_slots``, in one launch and no other device work (allocations only).

    ``global_mask``: (B, S) bool, any strides; ``key_padding_mask``: None or like it (True = real token);
    ``G``: int in [0, S]; ``zero``: None or a contiguous int32 (B, n) tensor the same launch fills with zeros;
    ``key_ranges``: None or contiguous int32 (B, S, 2) (a packed batch): then also the two dicts of ``slot_ranges``,
    appended to the tuple; ``tiles`` = (band pass BLOCK_M, global rows' slot tile) for their bounds. The same launch
    computes them, unless the last call with the same unmodified masks and ranges did (``_PACKED_RANGES``: the
    layers of a model share them)."""
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
    extra = {} if zero is None else dict(Zero=zero, n_zero=zero.shape[1])
    if key_ranges is None:
        if B * S:  # (B = 0 leaves ``zero`` nothing to fill; S = 0 has no slot)
            _launch(global_mask, key_padding_mask, band_rows, pos, used, G, extra)
        return band_rows, pos, used
    key = (global_mask, key_padding_mask, key_ranges), (G, *_check_tiles(tiles))
    kept = _PACKED_RANGES.peek(*key)
    if kept is None:
        outputs = _ranges_out(key_ranges, B, S, G, tiles, device)
        extra.update(_ranges_args(key_ranges, outputs, tiles))
    if B * S:
        _launch(global_mask, key_padding_mask, band_rows, pos, used, G, extra)
    if kept is None:
        kept = _ranges_result(key_ranges, outputs, G)
        _PACKED_RANGES.put(*key, kept)
    return (band_rows, pos, used) + kept


def slot_ranges(global_mask, key_padding_mask, pos, used, G: int, key_ranges, tiles=None):
    """-> (band pass's ranges, global rows' ranges): ``_longformer.slot_ranges``' two dicts (bitwise), each with
    its ``_common.tile_bounds`` as ``range_bounds`` (``tiles`` as in ``global_slots``), for the slot layout ``pos``,
    ``used`` of ``global_slots`` (the backward's); ``({}, {})`` without ``key_ranges``. Those of the last
    ``global_slots`` call with the same inputs, else one launch."""
    if key_ranges is None:
        return {}, {}
    return _PACKED_RANGES.get(lambda: _slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges, tiles),
                              (global_mask, key_padding_mask, key_ranges), (G, *_check_tiles(tiles)))


# The packed slot ranges and bounds of the last call (``longattn._memo``): a function of the masks, the key ranges,
# G and the tiles alone, so every layer's forward and backward after the first reuses them.
_PACKED_RANGES = LastCall()


def _slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges, tiles):
    B, S = global_mask.shape
    outputs = _ranges_out(key_ranges, B, S, G, tiles, global_mask.device)
    if B * S:  # (band_rows: not written, used stands in)
        _launch(global_mask, key_padding_mask, used, pos, used, G,
                dict(RANGES_ONLY=True, **_ranges_args(key_ranges, outputs, tiles)))
    return _ranges_result(key_ranges, outputs, G)


def _check_tiles(tiles) -> tuple[int, int]:
    if (not isinstance(tiles, tuple) or len(tiles) != 2
            or not all(isinstance(t, int) and t >= 16 and t & (t - 1) == 0 for t in tiles)):
        raise ValueError(f"tiles: expected (band BLOCK_M, slot tile), powers of two >= 16, got {tiles!r}")
    return tiles


def _ranges_out(key_ranges, B, S, G, tiles, device):
    """(side (B, S, 2), rows (B, G, 2), before (B, S + 1), band bounds (B, band tiles, 8), slot bounds (B, slot
    tiles, 8)) int32, new."""
    if key_ranges.dtype != torch.int32 or key_ranges.shape != (B, S, 2) or not key_ranges.is_contiguous():
        raise ValueError(f"key_ranges: expected a contiguous int32 ({B}, {S}, 2) tensor, got {key_ranges.dtype} "
                         f"{tuple(key_ranges.shape)} strides {tuple(key_ranges.stride())}")
    band_m, slot_m = tiles
    shapes = ((B, S, 2), (B, max(G, 1), 2), (B, S + 1), (B, cdiv(S, band_m), 8), (B, max(cdiv(G, slot_m), 1), 8))
    return tuple(torch.empty(*shape, dtype=torch.int32, device=device) for shape in shapes)


def _ranges_args(key_ranges, outputs, tiles) -> dict:
    """``_slots_kernel``'s keywords for the ranges and bounds of a packed batch."""
    side, rows, before, band_bounds, slot_bounds = outputs
    band_m, slot_m = tiles
    # Rows per step of ``_row_ranges``' walks (at least one tile): half a chunk of the band's; 512 slots on a GPU,
    # as more spill (sm_90, 16 warps: the gathers through the slots' tokens hold 64-bit addresses).
    band_rows, slot_rows = (_INTERPRET_BLOCK // 2,) * 2 if interpreting() else (_GPU_BLOCK // 2, 512)
    return dict(KRanges=key_ranges, SideR=side, RowR=rows, Before=before, BandB=band_bounds, SlotB=slot_bounds,
                BAND_M=band_m, BAND_TILES=max(band_rows // band_m, 1), SLOT_M=slot_m,
                SLOT_TILES=max(slot_rows // slot_m, 1))


def _ranges_result(key_ranges, outputs, G):
    """(band pass's, global rows') range keywords: ``_longformer.slot_ranges``' two dicts plus ``range_bounds``."""
    side, rows, _, band_bounds, slot_bounds = outputs
    return ({"key_ranges": key_ranges, "side_ranges": side, "range_bounds": band_bounds},
            {"key_ranges": rows[:, :G], "range_bounds": slot_bounds})


def _launch(global_mask, key_padding_mask, band_rows, pos, used, G, extra):
    """The ``_slots_kernel`` launch (one program per batch row) with the optional outputs of ``extra``."""
    B, S = global_mask.shape
    gm = global_mask.view(torch.uint8)
    pm = gm if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    block, warps = (_INTERPRET_BLOCK, 1) if interpreting() else (_GPU_BLOCK, _GPU_WARPS)
    cached(_slots_kernel)[(B,)](gm, pm, band_rows.view(torch.uint8), pos, used.view(torch.uint8), S, G, gm.stride(0),
                        gm.stride(1), pm.stride(0), pm.stride(1), HAS_PAD=key_padding_mask is not None, BLOCK=block,
                        num_warps=warps, **extra)
