"""The CUDA backend's packed Longformer band pass (issue 12, target 2): the kIndexed && kRanges kernels, side keys read
through the slots' tokens (``side_index``) with per-row key ranges and per-row slot ranges (``side_ranges``), one raw
op each way in place of the gathered composition (``_longformer.gathered_band_*``: gathers, masked_fill, scatter_add).

CPU: statement-level emulations of what the kernels do for it (csrc/band_side/ranges.h: the ranged tile walk and the
element masks; the forward's indexed side tiles and row masks; the dK/dV kernel's side CTAs over query chunks narrowed
by the slot ranges, then the finish kernel), against the torch backend's gathered band pass. GPU
(``@pytest.mark.gpu``): the whole packed op against the torch backend in float64 and the fp64 oracle.
"""

from __future__ import annotations

import pytest
import torch

from longattn import dispatch
from longattn.backends import _longformer
from tests import reference
from tests.conftest import grads
from tests.test_cuda_global_rows import TILE, _emulate_finish_side_keys, _load_rows_by_index
from tests.test_cuda_longformer import gpu_ready
from tests.tolerance import assert_within_rule

_INT_MAX, _INT_MIN = 2**31 - 1, -(2**31)


def _clip_tiles(lo, hi, ulo, uhi):
    """ranges.h clip_tiles -> (first, count) of the tiles of keys [lo, hi] meeting [ulo, uhi)."""
    if ulo >= uhi:
        return 0, 0
    lo, hi = max(lo, ulo), min(hi, uhi - 1)
    return lo // TILE, 0 if lo > hi else hi // TILE - lo // TILE + 1


def _union(ranges, b, rows):
    """RangeFold's union over ``rows`` (< S) and cta_min_max2: (min lo, max hi) of the non-empty ranges."""
    r = ranges[b, rows].tolist()
    nonempty = [(lo, hi) for lo, hi in r if lo < hi]
    return (min(lo for lo, _ in nonempty), max(hi for _, hi in nonempty)) if nonempty else (_INT_MAX, _INT_MIN)


def _ranged_walk(key_ranges, side_ranges, S_, G_, left, right, b, m0):
    """ranges.h query_tile_ranges (the kRanges walk, which dispatch_flags now runs with side_index too) -> the key
    tiles query tile m0 visits, as ("band" | "side", first key): band tiles of the window narrowed by the rows'
    key_ranges, side tiles of [0, G) narrowed by their side_ranges (slot indices)."""
    rows = list(range(m0, min(m0 + TILE, S_)))
    win_lo, win_hi = max(0, m0 - left), min(S_ - 1, min(S_ - 1, m0 + TILE - 1) + right)
    if key_ranges is not None:
        band = _clip_tiles(win_lo, win_hi, *_union(key_ranges, b, rows))
    else:
        band = win_lo // TILE, win_hi // TILE - win_lo // TILE + 1
    side = _clip_tiles(0, G_ - 1, *_union(side_ranges, b, rows)) if side_ranges is not None else (0, -(-G_ // TILE))
    return [("band", (band[0] + t) * TILE) for t in range(band[1])] + [
        ("side", (side[0] + t) * TILE) for t in range(side[1])]


def _range_mask(ranges, b, rows, key0, S_):
    """ranges.h QueryRanges::tile_mask for one warp's rows (forward / dQ) or the dK/dV kernel's sHolds + range_mask_key_
    rows (rows = a query tile's): all True when every row (< S) holds the whole tile, else each (row, key) tested;
    rows >= S get an empty range -> (len(rows), TILE) bool."""
    keys = torch.arange(key0, key0 + TILE)
    r = torch.tensor([ranges[b, i].tolist() if i < S_ else [0, 0] for i in rows])
    inside = [r[k, 0] <= key0 and key0 + TILE <= r[k, 1] for k, i in enumerate(rows) if i < S_]
    if all(inside):
        return torch.ones(len(rows), TILE, dtype=torch.bool)
    return (r[:, :1] <= keys) & (keys < r[:, 1:])


def _score_valid(kind, b, rows, key0, S_, G_, left, right, band_key_mask, side_mask):
    """tile_ops.h score_log2's masks (window, extent, key masks; no bias) -> (len(rows), TILE) bool."""
    keys = torch.arange(key0, key0 + TILE)
    i = torch.tensor(rows)[:, None]
    if kind == "band":
        valid = (keys >= i - left) & (keys <= i + right) & (keys < S_)
        return valid & band_key_mask[b, keys.clamp(max=S_ - 1)]
    return (keys < G_) & side_mask[b, keys.clamp(max=max(G_ - 1, 0))] & torch.ones_like(i, dtype=torch.bool)


def _kv_tile(kind, x, pos, b, h, key0):
    """The K or V tile: band rows key0 .. (zeros past S), or side slots through side_index (load_rows_by_index)."""
    if kind == "band":
        tile = torch.zeros(TILE, x.shape[-1], dtype=x.dtype)
        rows = x[b, key0:key0 + TILE, h]
        tile[:len(rows)] = rows
        return tile
    flat = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    return _load_rows_by_index(flat, x.stride()[:3], b, h, pos.reshape(-1), pos.stride(0), key0, pos.shape[1],
                               x.shape[1], x.shape[-1])


def _emulate_packed_band_forward(q, k, v, pos, used, band_rows, pad, left, right, scale, key_ranges, side_ranges):
    """band_side_fwd_kernel<kRanges = true, kIndexed = true> per (b, h, query tile, warp): the ranged walk, each tile's
    scores masked by score_log2 and the range mask, one softmax over the visited tiles (each key once), then
    longformer_row_masks (out = 0 off query_mask, lse = +inf off band_key_mask) -> (out, lse)."""
    B_, S_, H_, D_ = q.shape
    G_ = pos.shape[1]
    out, lse = torch.zeros_like(q), torch.full((B_, H_, S_), float("inf"), dtype=q.dtype)
    for b in range(B_):
        for h in range(H_):
            for m0 in range(0, S_, TILE):
                walk = _ranged_walk(key_ranges, side_ranges, S_, G_, left, right, b, m0)
                assert len(set(walk)) == len(walk), walk
                tiles = [(kind, key0, _kv_tile(kind, k, pos, b, h, key0), _kv_tile(kind, v, pos, b, h, key0))
                         for kind, key0 in walk]
                for w0 in range(m0, min(m0 + TILE, S_), 16):  # one warp's 16 rows
                    rows = list(range(w0, w0 + 16))
                    qt = torch.zeros(16, D_, dtype=q.dtype)
                    qt[:min(16, S_ - w0)] = q[b, w0:w0 + 16, h]
                    scores, values = [], []
                    for kind, key0, kt, vt in tiles:
                        ok = _score_valid(kind, b, rows, key0, S_, G_, left, right, band_rows, used)
                        ranges = key_ranges if kind == "band" else side_ranges
                        if ranges is not None:
                            ok = ok & _range_mask(ranges, b, rows, key0, S_)
                        scores.append((qt @ kt.T * scale).masked_fill(~ok, float("-inf")))
                        values.append(vt)
                    if not scores:
                        continue
                    s, vals = torch.cat(scores, 1), torch.cat(values)
                    top = s.amax(1, keepdim=True)
                    p = torch.exp(s - torch.where(top == float("-inf"), 0.0, top))
                    total = p.sum(1)
                    n = min(16, S_ - w0)
                    seen = total[:n] > 0
                    o = (p @ vals)[:n] / torch.where(seen, total[:n], 1.0)[:, None]
                    out[b, w0:w0 + n, h] = o * seen[:, None]
                    lse[b, h, w0:w0 + n] = torch.where(seen, top[:n, 0] + torch.log(total[:n]), float("inf"))
    out = out * pad[:, :, None, None]
    return out, lse.masked_fill(~band_rows[:, None, :], float("inf"))


def _emulate_packed_side_partials(dout, q, k, v, lse, delta, pos, used, scale, side_ranges, chunk_tiles):
    """band_side_bwd_dkdv_kernel's side CTAs with kRanges && kIndexed: side tile key0 x query chunk, its query tiles
    narrowed by narrow_query_tiles (side_ranges, limit G), K / V through side_index, P from the lse, masked by
    score_log2 and sHolds / range_mask_key_rows -> the float32-like partials (chunks, B, G, H, D) of dK (scaled) and
    dV, zeros for a chunk no row reaches (the kernel stores them all)."""
    B_, S_, H_, D_ = q.shape
    G_ = pos.shape[1]
    n_q = -(-S_ // TILE)
    chunks = -(-n_q // chunk_tiles)
    dsk, dsv = (torch.zeros(chunks, B_, G_, H_, D_, dtype=q.dtype) for _ in range(2))
    for b in range(B_):
        for h in range(H_):
            for key0 in range(0, G_, TILE):
                sk, sv = _kv_tile("side", k, pos, b, h, key0), _kv_tile("side", v, pos, b, h, key0)
                for chunk in range(chunks):
                    q_first = chunk * chunk_tiles
                    q_count = min(chunk_tiles, n_q - q_first)
                    rows = [i for i in range(q_first * TILE, min(S_, (q_first + q_count) * TILE))
                            if max(side_ranges[b, i, 0], key0) < min(side_ranges[b, i, 1], min(key0 + TILE, G_))]
                    tiles = range(rows[0] // TILE, rows[-1] // TILE + 1) if rows else range(0)
                    acc_k, acc_v = torch.zeros(TILE, D_, dtype=q.dtype), torch.zeros(TILE, D_, dtype=q.dtype)
                    for t in tiles:
                        qrows = list(range(t * TILE, t * TILE + TILE))
                        qt, dot = (torch.zeros(TILE, D_, dtype=q.dtype) for _ in range(2))
                        n = min(TILE, S_ - t * TILE)
                        qt[:n], dot[:n] = q[b, t * TILE:t * TILE + n, h], dout[b, t * TILE:t * TILE + n, h]
                        lse_t = torch.full((TILE,), float("inf"), dtype=q.dtype)
                        delta_t = torch.zeros(TILE, dtype=q.dtype)
                        lse_t[:n], delta_t[:n] = lse[b, h, t * TILE:t * TILE + n], delta[b, h, t * TILE:t * TILE + n]
                        ok = _score_valid("side", b, qrows, key0, S_, G_, 0, 0, None, used)
                        ok = ok & _range_mask(side_ranges, b, qrows, key0, S_)
                        s = torch.where(ok, qt @ sk.T * scale, float("-inf"))
                        p = torch.exp(s - lse_t[:, None])  # rows >= S, lse = +inf: 0
                        ds = p * (dot @ sv.T - delta_t[:, None])
                        acc_v += p.T @ dot
                        acc_k += ds.T @ qt
                    m = min(TILE, G_ - key0)
                    dsk[chunk, b, key0:key0 + m, h] = acc_k[:m] * scale
                    dsv[chunk, b, key0:key0 + m, h] = acc_v[:m]
    return dsk, dsv


def _packed_band_case(D_=16, device="cpu"):
    """-> (q, k, v, dout, pos, used, band_rows, pad, key_ranges, side_ranges, glob, raw key_ranges), float64 (B, S, H,
    D_) on ``device``: two batch rows of packed sequences with padding: row 0 = [0, 40), [40, 130) (its first 80 tokens
    global: two side tiles), [130, 185), padding [185, 200); row 1 = [0, 100), [100, 200), globals at sequence starts
    and ends. G = 90: row 1's unused slots point at band tokens (side_mask drops them)."""
    Bx, Sx, H_, G_ = 2, 200, 2, 90
    gen = torch.Generator().manual_seed(12)
    q, k, v, dout = (torch.randn(Bx, Sx, H_, D_, generator=gen, dtype=torch.float64) for _ in range(4))
    glob = torch.zeros(Bx, Sx, dtype=torch.bool)
    glob[0, [0, 39, 129, 130, 184, 190]] = True  # 190: padding, never global
    glob[0, 40:120] = True
    glob[1, [0, 99, 100, 199]] = True
    pad = torch.ones(Bx, Sx, dtype=torch.bool)
    pad[0, 185:] = False
    key_ranges = torch.zeros(Bx, Sx, 2, dtype=torch.int32)
    for b, cu in ((0, [0, 40, 130, 185, 200]), (1, [0, 100, 200])):
        for lo, hi in zip(cu, cu[1:]):
            key_ranges[b, lo:hi] = torch.tensor([lo, hi], dtype=torch.int32)
    q, k, v, dout, glob, pad, key_ranges = (x.to(device) for x in (q, k, v, dout, glob, pad, key_ranges))
    band_rows, pos, used = _longformer.global_slots(glob, pad, G_)
    band, _ = _longformer.slot_ranges(glob, pad, pos, used, G_, key_ranges)
    return q, k, v, dout, pos, used, band_rows, pad, band["key_ranges"], band["side_ranges"], glob, key_ranges


@pytest.mark.parametrize("window", [(20, 30), (70, 5)])
def test_packed_band_forward_emulation_matches_the_torch_band_pass(window):
    """The kIndexed && kRanges forward (the CUDA packed Longformer's band pass, which now runs in one launch instead of
    the gathered composition): its walk narrowed by the rows' key ranges and slot ranges, the side tiles read through
    side_index, the element masks and the Longformer row masks, emulated, equal the torch backend's gathered band pass
    with the same ranges (the spec). Window (70, 5): a query tile's window spans three band tiles."""
    from longattn.backends import torch_backend

    q, k, v, _, pos, used, band_rows, pad, key_ranges, side_ranges, _, _ = _packed_band_case()
    assert pos.shape[1] > TILE and not used.all()  # two side tiles; unused slots
    assert (side_ranges[..., 0] < side_ranges[..., 1]).any() and (side_ranges[..., 0] == side_ranges[..., 1]).any()
    want = _longformer.gathered_band_forward(torch_backend.band_side_forward, q, k, v, pos, used, band_rows, pad,
                                             *window, 0.25, key_ranges=key_ranges, side_ranges=side_ranges)
    got = _emulate_packed_band_forward(q, k, v, pos, used, band_rows, pad, *window, 0.25, key_ranges, side_ranges)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_tiles", [1, 2, 4])
def test_packed_side_grads_emulation_matches_the_scatter(chunk_tiles):
    """The kIndexed && kRanges backward's side keys: the dK/dV kernel's side CTAs (query chunks narrowed by the slot
    ranges, K / V read through side_index), then the finish kernel into rows side_index of zero dk / dv, equal the
    torch backend's side-key gradients of the gathered composition scattered into those rows (what the CUDA backend
    ran before)."""
    from longattn.backends import torch_backend

    q, k, v, dout, pos, used, band_rows, pad, key_ranges, side_ranges, _, _ = _packed_band_case()
    window, scale = (20, 30), 0.25
    out, lse = _longformer.gathered_band_forward(torch_backend.band_side_forward, q, k, v, pos, used, band_rows, pad,
                                                 *window, scale, key_ranges=key_ranges, side_ranges=side_ranges)
    index = pos[:, :, None, None].expand(*pos.shape, *q.shape[2:])
    grads = torch_backend.band_side_backward(dout, q, k, v, torch.gather(k, 1, index), torch.gather(v, 1, index), out,
                                             lse, band_rows, used, None, None, None, *window, scale,
                                             key_ranges=key_ranges, side_ranges=side_ranges)
    want = [torch.zeros_like(k).scatter_add_(1, index, g * used[:, :, None, None]) for g in grads[3:5]]
    delta = (dout * out).sum(-1).transpose(1, 2)
    partials = _emulate_packed_side_partials(dout, q, k, v, lse, delta, pos, used, scale, side_ranges, chunk_tiles)
    Bx, G_, H_, D_ = pos.shape[0], pos.shape[1], q.shape[2], q.shape[3]
    got = _emulate_finish_side_keys(partials, used, Bx, G_, H_, D_, torch.zeros_like(k), torch.zeros_like(v),
                                    side_index=pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cuda_packed_longformer_with_padding_matches_torch(dropout_p):
    """The whole packed Longformer composition (``_longformer.forward`` / ``backward``: slots, the band pass in one
    kIndexed && kRanges launch each way, the global rows with per-slot ranges) on a padded batch of several packed
    sequences per row, globals at sequence starts and ends, two side tiles, with and without dropout: out, dq, dk, dv
    within the rule against the torch backend in float64 (the spec; same dropout bits for the same rng), baseline the
    torch backend in float16."""
    q, k, v, dout, _, _, _, pad, _, _, glob, key_ranges = _packed_band_case(64, "cuda")
    rng = torch.tensor([1234, 8], dtype=torch.int64, device="cuda")
    drop = (dropout_p, rng if dropout_p else None)

    def run(backend, dtype):
        module = dispatch.get_backend(backend)
        x = [t.to(dtype) for t in (q, k, v)]
        out, lse, glse, band_rows, pos, used = _longformer.forward(module, *x, None, None, None, glob, pad, 20, 30,
                                                                   0.125, 90, *drop, key_ranges)
        grads = _longformer.backward(module, dout.to(dtype), *x, None, None, None, out, lse, glse, band_rows, pos,
                                     used, glob, pad, 20, 30, 0.125, *drop, key_ranges)
        return out, grads[:3]

    (ref, ref_grads), (out, got), (base, base_grads) = (run("torch", torch.float64), run("cuda", torch.float16),
                                                        run("torch", torch.float16))
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, ref_grads)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


@pytest.mark.gpu
@gpu_ready
def test_cuda_longformer_packed_within_rule():
    """Packed sequences through the varlen API (per-row key ranges: the CUDA band pass runs the kIndexed && kRanges
    kernels); against the fp64 oracle per sequence."""
    from longattn.varlen_api import longformer_attention_varlen

    cu = [0, 90, 200, 260]
    gen = torch.Generator().manual_seed(7)
    x64 = [torch.randn(cu[-1], 2, 64, generator=gen, dtype=torch.float64).cuda() for _ in range(3)]
    glob = torch.zeros(cu[-1], dtype=torch.bool)
    glob[[0, 45, 89, 150, 259]] = True
    glob, cu_t = glob.cuda(), torch.tensor(cu, dtype=torch.int32, device="cuda")

    def run(dtype, backend):
        leaves = [x.to(dtype).requires_grad_() for x in x64]
        out = longformer_attention_varlen(*leaves, cu_t, 110, (20, 30), glob, max_globals=5, backend=backend)
        return out, grads(out, leaves)

    leaves = [x.clone().requires_grad_() for x in x64]
    ref = torch.cat([reference.longformer_attention(*(x[None, a:b] for x in leaves), (20, 30), glob[None, a:b])[0]
                     for a, b in zip(cu, cu[1:])])
    want = grads(ref, leaves)
    (out, got), (base, base_grads) = run(torch.float16, "cuda"), run(torch.float16, "torch")
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)
