"""The CUDA kHalo kernels' tile walks and dropout keep bits, emulated on the CPU (csrc/band_side; the backend's
checks and GPU tests are in test_cuda_halo.py).

- The tiles the kHalo kernels visit, emulated statement by statement from csrc/band_side/tile_ops.h (BandKeyTiles,
  BandQueryTiles, band_tile_is_interior, halo_row, load_halo_tile_async, store_band_key_rows) and
  band_side_api.cpp (the dK/dV grid, the zero fill of unreached halo rows), checked against brute force for windows
  and halos of every shape (halos wider than S, empty halos, windows across the halo).
- The dropout keep bits of one warp's mma fragment (csrc/band_side/dropout.h, keep_mask_query_rows /
  keep_mask_key_rows: Philox calls per lane, the shuffles between lanes) emulated lane by lane with a dropout
  offset, against ``longattn._dropout``'s bits of the shifted ids, on aligned, halo and side-key tiles.
"""

from __future__ import annotations

import pytest
import torch

TILE = 64

# --------------------------------------------------------------------------------------------------------
# The kHalo tile walks, emulated (Python's // is the floor division the kernels spell out).
# --------------------------------------------------------------------------------------------------------


def _c_div(a, b):
    """C++ integer division (truncates toward zero)."""
    return -(-a // b) if (a < 0) != (b < 0) else a // b


def _device_floor_div(a, b):  # tile_ops.h floor_div
    return _c_div(a if a >= 0 else a - b + 1, b)


def _host_floor_div(a, b):  # band_side_api.cpp floor_div
    return _c_div(a, b) if a >= 0 else -_c_div(-a + b - 1, b)


def _band_key_tiles(S, HL, HR, left, right, m0):
    """BandKeyTiles<kHalo = true>: the key tiles of query tile m0."""
    lo, hi = max(-HL, m0 - left), min(S + HR - 1, min(S - 1, m0 + TILE - 1) + right)
    first = _device_floor_div(lo, TILE)
    return range(first, _device_floor_div(hi, TILE) + 1)


def _band_query_tiles(S, left, right, n0):
    """BandQueryTiles<kHalo = true>: the query tiles of dK/dV key tile n0."""
    lo, hi = max(0, n0 - right), min(S - 1, n0 + TILE - 1 + left)
    return range(0) if lo > hi else range(_c_div(lo, TILE), _c_div(hi, TILE) + 1)


def _dkdv_band_tiles(S, HL, HR, left, right):
    """prepare(): the dK/dV band CTAs' key tiles [band_tile0, band_tile0 + n_band_tiles)."""
    key_lo, key_hi = max(-HL, -left), min(S + HR, S + right) - 1
    first = _host_floor_div(key_lo, TILE)
    return range(first, _host_floor_div(key_hi, TILE) + 1)


def _interior(S, left, right, m0, n0):
    """band_tile_is_interior<kHalo = true>."""
    return n0 >= 0 and n0 + TILE <= S and n0 >= m0 + TILE - 1 - left and n0 + TILE - 1 <= m0 + right


def _halo_row(S, HL, HR, j):
    row = HL + j if j < 0 else HL + (j - S)
    return row if 0 <= row < HL + HR else -1


def _kept(S, HL, HR, left, right, i, j, check_range):
    """score_log2<kHalo>'s band test for (query i < S, key j): True where the score is not -inf (masks aside)."""
    if check_range and (j < 0 or j >= S):
        return _halo_row(S, HL, HR, j) >= 0 and i - left <= j <= i + right
    return not check_range or (i - left <= j <= i + right and j < S)


def _needed(S, HL, HR, left, right):
    """(S, HL + S + HR) bool: query i needs key j = column - HL."""
    i = torch.arange(S)[:, None]
    j = torch.arange(-HL, S + HR)[None, :]
    return (j >= i - left) & (j <= i + right)


def _tile_keys(t):
    return range(t * TILE, t * TILE + TILE)


def _check_walks(S, HL, HR, left, right):
    need = _needed(S, HL, HR, left, right)
    col = lambda j: j + HL  # noqa: E731

    # Forward / dQ: a query tile visits exactly the key tiles holding one of its pairs; interior tiles hold only
    # needed pairs; on the others the element test keeps exactly the needed ones.
    for m0 in range(0, S, TILE):
        rows = range(m0, min(m0 + TILE, S))
        want = {j // TILE for i in rows for j in range(-HL, S + HR) if need[i, col(j)]}
        got = list(_band_key_tiles(S, HL, HR, left, right, m0))
        assert set(got) == want and len(got) == len(want), f"query tile {m0}: key tiles {got} vs {sorted(want)}"
        for t in got:
            check = not _interior(S, left, right, m0, t * TILE)
            # The mask-free path reads band_key_mask and loads from k / v: its keys must all be local.
            assert check or 0 <= t * TILE <= S - TILE, (m0, t)
            for i in rows:
                for j in _tile_keys(t):
                    needed = -HL <= j < S + HR and bool(need[i, col(j)])
                    assert _kept(S, HL, HR, left, right, i, j, check) == needed, (m0, t, i, j, check)

    # dK/dV: the grid covers every needed key; each CTA visits exactly the query tiles holding one of its pairs;
    # each halo row is written by one CTA or zero-filled (band_tiles_cover_halo false), never both or twice.
    grid = list(_dkdv_band_tiles(S, HL, HR, left, right))
    needed_keys = {j for j in range(-HL, S + HR) if need[:, col(j)].any()}
    assert {j // TILE for j in needed_keys} <= set(grid)
    written = []
    for t in grid:
        keys = [j for j in _tile_keys(t) if -HL <= j < S + HR]
        want = {i // TILE for j in keys for i in range(S) if need[i, col(j)]}
        got = list(_band_query_tiles(S, left, right, t * TILE))
        assert set(got) == want, f"key tile {t}: query tiles {got} vs {sorted(want)}"
        written += [_halo_row(S, HL, HR, j) for j in _tile_keys(t) if not 0 <= j < S and _halo_row(S, HL, HR, j) >= 0]
    assert len(written) == len(set(written))
    covers = grid[0] * TILE <= -HL and (grid[-1] + 1) * TILE >= S + HR  # band_tiles_cover_halo
    assert covers == (len(written) == HL + HR)
    unwritten = set(range(HL + HR)) - set(written)
    assert all(_halo_row(S, HL, HR, j) not in unwritten for j in needed_keys if not 0 <= j < S)


def _check_loads(S, HL, HR, tiles):
    """load_halo_tile_async reads row j of the extended sequence cat([halo[:HL], k, halo[HL:]]) in place (zeros
    outside it); stores of dK/dV rows go back to the same places (store_band_key_rows)."""
    k = torch.arange(S) + 1000
    halo = torch.arange(HL + HR) + 5000
    ext = torch.cat([halo[:HL], k, halo[HL:]])
    for t in tiles:
        for j in _tile_keys(t):
            row = _halo_row(S, HL, HR, j)
            got = int(k[j]) if 0 <= j < S else int(halo[row]) if row >= 0 else 0
            want = int(ext[j + HL]) if -HL <= j < S + HR else 0
            assert got == want, (t, j, got, want)


WALK_CASES = [  # (S, HL, HR, left, right)
    (1, 0, 0, 0, 0),
    (37, 0, 0, 5, 3),  # an empty halo
    (37, 300, 200, 336, 236),  # halos wider than S, the widest windows
    (37, 300, 200, 10, 20),  # halos wider than the window: unreached halo rows
    (64, 64, 64, 64, 64),  # tile-aligned
    (130, 20, 70, 100, 90),
    (200, 5, 129, 3, 128),
    (129, 63, 65, 63, 65),
    (64, 1, 0, 64, 0),  # a one-sided halo
    (5, 0, 130, 0, 134),
    (300, 128, 128, 128, 128),
]


@pytest.mark.parametrize("S,HL,HR,left,right", WALK_CASES)
def test_halo_tile_walks_are_exact(S, HL, HR, left, right):
    _check_walks(S, HL, HR, left, right)
    tiles = set(_dkdv_band_tiles(S, HL, HR, left, right))
    for m0 in range(0, S, TILE):
        tiles |= set(_band_key_tiles(S, HL, HR, left, right, m0))
    _check_loads(S, HL, HR, sorted(tiles))


def test_floor_divisions_floor():
    for a in range(-400, 400):
        assert _device_floor_div(a, TILE) == _host_floor_div(a, TILE) == a // TILE, a


# --------------------------------------------------------------------------------------------------------
# Dropout bits of a warp's fragment with a dropout offset, emulated lane by lane (csrc/band_side/dropout.h).
# --------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_LANES = torch.arange(32)
_NT = torch.arange(TILE // 8)  # the n-tiles of a 64-wide fragment


def _philox(rng, bh, group, row):
    """philox::dropout_bits4: the four words of counter ((offset >> 2) + bh, group, row), stacked (4, ...)."""
    from longattn import _dropout

    k0, k1, c0, c1 = _dropout._counter_words(_dropout.as_rng_tensor(rng), torch.tensor(bh))
    return torch.stack(torch.broadcast_tensors(*_dropout.philox4x32_10(c0, c1, group, row, k0, k1)))


def _group_word(side, key, o):
    """dropout_group_word: side keys keep their ids, band key j is j + o (C++: int64 j >> 2, cut to 32 bits)."""
    return ((key >> 2) & _M32) | (1 << 31) if side else ((key + o) >> 2) & _M32


def _keep_words_query_rows(rng, bh, side, key0, i0, o):
    """keep_mask_query_rows<64> before the threshold: (32 lanes, 8 n-tiles, 4 elements) words, i0: (32,) rows."""
    odd = (_LANES & 1).bool()[:, None]
    row = (torch.where(odd[:, 0], i0 + 8, i0)[:, None] + o) & _M32
    key = key0 + _NT[None] * 8 + (_LANES[:, None] % 4) * 2
    x, y, z, w = _philox(rng, bh, _group_word(side, key, o), row)
    partner = _LANES ^ 1  # __shfl_xor_sync(.., 1): each lane gets its partner's sent word
    r0, r1 = torch.where(odd, x, z)[partner], torch.where(odd, y, w)[partner]
    return torch.stack([torch.where(odd, r0, x), torch.where(odd, r1, y), torch.where(odd, z, r0),
                        torch.where(odd, w, r1)], -1)


def _keep_words_key_rows(rng, bh, side, k0, q0, o):
    """keep_mask_key_rows<64> before the threshold: (32 lanes, 8 n-tiles, 4 elements) words, k0: (32,) keys."""
    m = (_LANES // 4) % 4
    group = _group_word(side, torch.where(m >= 2, k0 + 8, k0), o)
    i = q0 + _NT[None] * 8 + (_LANES[:, None] % 4) * 2 + (m[:, None] & 1)
    words = _philox(rng, bh, group[:, None], (i + o) & _M32)  # (4, 32, 8): lane L's call e = m(L)
    out = torch.zeros(32, TILE // 8, 4, dtype=torch.int64)
    out[_LANES, :, m] = words[m, _LANES]
    for k in (1, 2, 3):  # send word m ^ k of my call to lane L ^ 4k; receive word m of its call e = m ^ k
        sent = words[m ^ k, _LANES]
        out[_LANES, :, m ^ k] = sent[_LANES ^ (4 * k)]
    return out


def _reference_bits(rng, bh, rows, keys, side, o):
    """longattn._dropout's bits of (row id rows + o, key id keys + o, or the side-key id of keys)."""
    from longattn import _dropout

    key_ids = keys + _dropout.SIDE_KEY_BASE if side else keys + o
    return _dropout.philox_bits(rng, torch.tensor(bh), rows + o, key_ids)


FRAGMENT_CASES = [  # (key0, row0 of the query tile, side, offset): aligned, halo (key0 < 0, >= S) and side tiles
    (128, 64, False, 0), (128, 64, False, 1000), (-64, 0, False, 64), (-128, 0, False, 100), (-64, 0, False, 4),
    (192, 128, False, 2**30 - 4), (0, 64, True, 36), (64, 0, True, 0),
]


@pytest.mark.parametrize("key0,row0,side,o", FRAGMENT_CASES)
@pytest.mark.parametrize("warp", [0, 3])
def test_fragment_keep_bits_are_the_shifted_ids(key0, row0, side, o, warp):
    """Every element of the fragment draws longattn._dropout's bits of (row i + o, key j + o): the lane pairs'
    groups and the shuffles do not depend on the offset (o % 4 == 0). Forward / dQ: rows = queries; dK/dV: rows =
    keys (the transposed products), element (n, e) of lane L at fragment row L / 4 (+ 8 for e >= 2), column
    n * 8 + (L % 4) * 2 + (e & 1) (tile_ops.h frag_row / frag_col)."""
    rng, bh = (0x1234_5678_9ABC_DEF1, 4 * 77), 5
    e = torch.arange(4)
    frag_row = (_LANES // 4)[:, None, None] + 8 * (e >= 2)[None, None]  # (32, 1, 4)
    frag_col = _NT[None, :, None] * 8 + (_LANES % 4)[:, None, None] * 2 + (e & 1)[None, None]  # (32, 8, 4)
    first = row0 + warp * 16  # the warp's 16 rows: queries (forward) or keys (dK/dV) of the tile
    got = _keep_words_query_rows(rng, bh, side, key0, first + _LANES // 4, o)
    want = _reference_bits(rng, bh, first + frag_row, key0 + frag_col, side, o)
    assert torch.equal(got, want)
    key_first = key0 + warp * 16
    got = _keep_words_key_rows(rng, bh, side, key_first + _LANES // 4, row0, o)
    want = _reference_bits(rng, bh, row0 + frag_col, key_first + frag_row, side, o)
    assert torch.equal(got, want)


def test_fragment_keep_bits_need_a_multiple_of_4():
    """The emulation can fail: an offset of 2 moves keys across the 4-key Philox groups of the lane pairs."""
    rng, bh, first = (99, 0), 0, 16
    e = torch.arange(4)
    rows = first + (_LANES // 4)[:, None, None] + 8 * (e >= 2)[None, None]
    cols = _NT[None, :, None] * 8 + (_LANES % 4)[:, None, None] * 2 + (e & 1)[None, None]
    got = _keep_words_query_rows(rng, bh, False, -64, first + _LANES // 4, 2)
    assert not torch.equal(got, _reference_bits(rng, bh, rows, -64 + cols, False, 2))
