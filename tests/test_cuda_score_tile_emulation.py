"""The CUDA kernels' score tile (csrc/band_side/tile_ops.h ``tile_key_bits``, ``column_key_bits``,
``column_key_kept`` and ``score_log2``), emulated lane by lane on the CPU for one CTA's four warps, against the masks
and tables read directly.

Every tile kernel (forward, dQ, dK/dV, Longformer's fused ones) forms its scores there: keys are fragment columns in
the forward and dQ, fragment rows in the dK/dV kernel (the transposed products, bwd_kernel.h ``key_kept``). The
emulation follows the device code statement by statement: the key mask's two ballots per warp (lane L reads keys
key0 + L and key0 + 32 + L when they lie inside the mask), each lane's view of the bits, and the per-element tests.
Checked, for band and side tiles, interior and edge, with and without masks and tables, both orientations: every
element keeps exactly the pairs the masks and window keep and adds exactly the table entry of its pair, and every
load (mask byte, table entry) is inside its tensor. Halo keys (``halo_score_log2``) are not emulated.
"""

from __future__ import annotations

import random

import pytest

TILE = 64
WARPS = 4


def _interior(S, left, right, m0, n0):  # tile_ops.h band_tile_is_interior (no halo)
    return n0 + TILE <= S and n0 >= m0 + TILE - 1 - left and n0 + TILE - 1 <= m0 + right


class _Call:
    """The params a tile reads (BandSideParams): S, G, window, masks (lists of 0/1 or None), tables (lists or None,
    one head), the query rows' block ids (clamped as clamp_query_block does)."""

    def __init__(self, S, G, left, right, band_mask, side_mask, band_bias, side_bias, query_block):
        self.S, self.G, self.left, self.right = S, G, left, right
        self.band_mask, self.side_mask, self.band_bias, self.side_bias = band_mask, side_mask, band_bias, side_bias
        self.W = left + right + 1
        self.query_block = query_block
        self.loads = []  # (tensor name, index) of every load the emulation makes

    def qb(self, i):  # tile_ops.h clamp_query_block
        if self.side_bias is None or i >= self.S:
            return -1
        return min(max(self.query_block[i], -1), self.G - 1)

    def read(self, name, index):
        self.loads.append((name, index))
        table = getattr(self, name)
        assert 0 <= index < len(table), f"{name}[{index}] outside [0, {len(table)})"
        return table[index]


def _tile_key_bits(c, side, key0):  # tile_ops.h tile_key_bits: lane L's loads of keys key0 + L and key0 + 32 + L
    mask, name, limit = (c.side_mask, "side_mask", c.G) if side else (c.band_mask, "band_mask", c.S)
    if mask is None:
        return (1 << 64) - 1
    bits = 0
    for half in range(2):
        for lane in range(32):
            key = key0 + 32 * half + lane
            if 0 <= key < limit and c.read(name, key):  # the && short-circuits: no load outside the mask
                bits |= 1 << (32 * half + lane)
    return bits


def _column_key_bits(tile_bits, lane):  # tile_ops.h column_key_bits
    return tile_bits >> (lane % 4 * 2)


def _column_key_kept(column_bits, n, e):  # tile_ops.h column_key_kept
    return bool((column_bits >> (n * 8 + (e & 1))) & 1)


def _row_key_kept(tile_bits, key0, k0, k1, e):  # bwd_kernel.h key_kept[e >> 1] of the dK/dV kernel
    return bool((tile_bits >> ((k1 if e >= 2 else k0) - key0)) & 1)


def _emulate(c, side, key0, row0, check, key_rows):
    """score_log2 over one tile for the CTA: {(query, key): (kept, table entry or None)} over every element of every
    lane of the four warps. row0: the query tile's first row (m0 or q0)."""
    has_mask = (c.side_mask if side else c.band_mask) is not None
    bias = c.side_bias if side else c.band_bias
    bias_name = "side_bias" if side else "band_bias"

    def score(i, key, qb, key_kept):  # tile_ops.h score_log2 (kHalo = false): (kept, entry read)
        if not side:
            if check and (key < i - c.left or key > i + c.right or key >= c.S):
                return False, None
            if has_mask and not key_kept:
                return False, None
            entry = key - i + c.left
        else:
            if check and key >= c.G:
                return False, None
            if has_mask and not key_kept:
                return False, None
            entry = key - qb + c.G
        if bias is None:
            return True, None
        c.read(bias_name, entry)
        return True, entry

    tile_bits = _tile_key_bits(c, side, key0)  # once per tile (forward, dQ) or per CTA (dK/dV)
    out = {}
    for warp in range(WARPS):
        for lane in range(32):
            column_bits = _column_key_bits(tile_bits, lane)
            k0 = key0 + warp * 16 + lane // 4
            for n in range(TILE // 8):
                for e in range(4):
                    frag_row = warp * 16 + lane // 4 + 8 * (e >= 2)
                    frag_col = n * 8 + (lane % 4) * 2 + (e & 1)
                    if key_rows:
                        i, key = row0 + frag_col, key0 + frag_row
                        kept = _row_key_kept(tile_bits, key0, k0, k0 + 8, e)
                    else:
                        i, key = row0 + frag_row, key0 + frag_col
                        kept = _column_key_kept(column_bits, n, e)
                    out[(i, key)] = score(i, key, c.qb(i), kept)
    return out


def _want(c, side, i, key):
    """(kept, table entry or None) of pair (query i, key), read directly from the masks and tables."""
    if side:
        kept = key < c.G and (c.side_mask is None or bool(c.side_mask[key]))
        entry = key - c.qb(i) + c.G if c.side_bias is not None and kept else None
    else:
        kept = 0 <= key < c.S and i - c.left <= key <= i + c.right
        kept = kept and (c.band_mask is None or bool(c.band_mask[key]))
        entry = key - i + c.left if c.band_bias is not None and kept else None
    return kept, entry


def _check_tile(c, side, key0, row0, key_rows):
    check = (key0 + TILE > c.G) if side else not _interior(c.S, c.left, c.right, *((row0, key0)))
    got = _emulate(c, side, key0, row0, check, key_rows)
    assert len(got) == TILE * TILE  # every (row, column) of the tile held by exactly one element
    for (i, key), (kept, entry) in got.items():
        if i >= c.S:  # rows past the end are never stored (forward, dQ) and have lse = +inf (dK/dV)
            continue
        want_kept, want_entry = _want(c, side, i, key)
        assert kept == want_kept, (side, key0, row0, key_rows, i, key)
        if kept and want_entry is not None:
            assert entry == want_entry, (side, key0, row0, key_rows, i, key)


CASES = [  # S, G, left, right
    (200, 70, 16, 16),
    (256, 64, 127, 127),
    (129, 5, 70, 5),
    (300, 130, 0, 63),
]


@pytest.mark.parametrize("S,G,left,right", CASES)
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize("key_rows", [False, True], ids=["query-rows", "key-rows"])
def test_score_tiles_keep_the_masked_pairs_and_add_their_entries(S, G, left, right, masks, tables, key_rows):
    rng = random.Random(S * 7 + G + left + 3 * right + 2 * masks + tables)
    c = _Call(S, G, left, right,
              band_mask=[int(rng.random() < 0.7) for _ in range(S)] if masks else None,
              side_mask=[int(rng.random() < 0.7) for _ in range(G)] if masks else None,
              band_bias=[rng.random() for _ in range(left + right + 1)] if tables else None,
              side_bias=[rng.random() for _ in range(2 * G + 1)] if tables else None,
              query_block=[rng.randrange(-3, G + 3) for _ in range(S)])
    for row0 in range(0, S, TILE):
        for key0 in range(0, S, TILE):  # every band tile, the walk's and others (interior is decided per tile)
            _check_tile(c, False, key0, row0, key_rows)
        for key0 in range(0, G, TILE):
            _check_tile(c, True, key0, row0, key_rows)
    if masks:  # each ballot load once per lane and tile, clamped into the mask (checked in read)
        assert any(name == "band_mask" for name, _ in c.loads) and any(name == "side_mask" for name, _ in c.loads)


def test_the_emulation_can_fail():
    """A column test that reads the other column of its pair (e & 1 swapped) keeps the wrong keys: the checks see it."""
    original = _column_key_kept
    rng = random.Random(1)
    S, G = 200, 70
    c = _Call(S, G, 16, 16, [int(rng.random() < 0.5) for _ in range(S)], [int(rng.random() < 0.5) for _ in range(G)],
              None, None, [0] * S)
    globals()["_column_key_kept"] = lambda bits, n, e: original(bits, n, e ^ 1)
    try:
        with pytest.raises(AssertionError):
            _check_tile(c, False, 64, 64, False)
    finally:
        globals()["_column_key_kept"] = original
