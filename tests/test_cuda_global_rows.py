"""The CUDA backend's Longformer global rows without torch glue (issue 12, target 2): the raw band op's ``side_only``
(no band keys, so no all-False band mask), ``query_index`` (the slots' rows of q, dout and out read in place by every
key split, no copy of them per split), the backward's ``lse_split`` (every key split reads the merged glse, no
per-split copy) and ``dside_k_into`` / ``dside_v_into`` (the keys' dK/dV added into the band pass's dk / dv by the
dK/dV kernel's epilogue, no ``add_``), and ``cuda_longformer_rows_add``'s ``zero_fill`` (a new dq for separate global
projections, no ``zeros_like``).

CPU: the changed index arithmetic emulated statement by statement from csrc/band_side (the indexed query-tile loads,
the delta kernel and the forward's epilogue with ``query_index``, ``lse_at``, the side keys' destinations
(side_key_rows: the finish kernel's sum over chunks, the dK/dV epilogue's one-chunk add), the walk and the dK/dV grid
with ``side_only``) against the torch composition it replaces (``KeySplits.rows`` of the
gathered rows, ``KeySplits.stats`` / ``unkeys`` + ``add_``, ``scatter_add``); the raw ops' checks (their CPU
registrations), fakes, and the backend's call sequence on meta tensors. GPU (``@pytest.mark.gpu``): the raw ops
against the composition they replace.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longattn.backends import _longformer, cuda_backend
from tests.test_cuda_longformer import B, D, G, H, S, _emulate_rows, _raw_call, gpu_ready, needs_build

TILE = 64


# --------------------------------------------------------------------------------------------------------
# Emulations of the kernels' index arithmetic (csrc/band_side/bwd_kernel.h, tile_ops.h, ranges.h)
# --------------------------------------------------------------------------------------------------------


def _load_rows_by_index(flat, strides, b, h, index, index_stride, r0, limit, bound, D_, threads=128):
    """tile_ops.h load_rows_by_index_async thread by thread and chunk by chunk (``kChunksPerThread`` 16-byte chunks of
    ``D_ / 8`` per row): the (TILE, D_) tile of rows r0 .. r0 + 63 of x's (b, h) slice, row r being x's row
    ``index[b * index_stride + r0 + r]`` read from x's flat storage through its (batch, row, head) strides; rows >=
    limit and indices outside [0, bound) zeros. Every element written exactly once (checked)."""
    row_chunks = D_ // 8
    per_thread = TILE * row_chunks // threads
    smem = torch.full((TILE, D_), float("nan"), dtype=flat.dtype)
    xbase = b * strides[0] + h * strides[2]
    ibase = b * index_stride
    for tid in range(threads):
        for it in range(per_thread):
            chunk = tid + it * threads
            r, c = chunk // row_chunks, (chunk % row_chunks) * 8
            g = r0 + r
            row = int(index[ibase + g]) if g < limit else -1
            valid = 0 <= row < bound
            assert torch.isnan(smem[r, c:c + 8]).all()
            smem[r, c:c + 8] = flat[xbase + row * strides[1] + c:][:8] if valid else 0.0
    assert not torch.isnan(smem).any()
    return smem


def _emulate_query_rows(x, pos, C, D_):
    """load_query_tile_async with kQueryIndex for every (op batch row b, head h, query tile) of the global rows' band
    op: op batch row b = b_q * C + c reads tokens pos[b_q] of batch row b // C of ``x`` (any strides: its flat storage)
    -> the (B * C, G, H, D) rows the Q / dO tiles hold."""
    Bq, G_ = pos.shape
    H_ = x.shape[2]
    flat = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    strides = x.stride()[:3]
    index = pos.as_strided((pos.untyped_storage().nbytes() // pos.element_size(),), (1,), 0)
    rows = torch.empty(Bq * C, G_, H_, D_, dtype=x.dtype)
    for b in range(Bq * C):
        for h in range(H_):
            for row0 in range(0, G_, TILE):
                tile = _load_rows_by_index(flat, strides, b // C, h, index[pos.storage_offset():], pos.stride(0), row0,
                                           G_, x.shape[1], D_)
                rows[b, row0:row0 + TILE, h] = tile[:G_ - row0]
    return rows


def _gathered(x, pos, sp):
    """The old ``cuda_longformer_gather_rows``: the slots' rows of x (zeros for positions outside [0, S)), one copy per
    key split (``KeySplits.rows``)."""
    S_ = x.shape[1]
    real = (pos >= 0) & (pos < S_)
    index = pos.clamp(0, S_ - 1)[:, :, None, None].expand(*pos.shape, *x.shape[2:])
    return sp.rows(torch.gather(x, 1, index) * real[:, :, None, None])


@pytest.mark.parametrize("C, G_, D_", [(1, 5, 32), (3, 70, 32), (2, 9, 64)])
def test_query_index_tiles_match_the_gathered_rows(C, G_, D_):
    """``query_index``: the Q / dO tiles every key split loads in place (tokens ``pos`` of the unsplit, strided x; a
    row-strided pos; positions outside [0, S) read as zeros; 70 slots: two query tiles) are the rows the old
    gather kernel copied per split (``KeySplits.rows`` of the gathered rows)."""
    gen = torch.Generator().manual_seed(G_)
    Bq, S_, H_ = 2, 80, 2
    x = torch.randn(Bq, H_, S_, D_, generator=gen, dtype=torch.float64).transpose(1, 2)  # (B, S, H, D), strided
    wide = torch.stack([torch.randperm(S_, generator=gen)[:G_ + 3] for _ in range(Bq)])
    pos = wide[:, 1:G_ + 1]  # row stride G + 3, unit last stride: the raw op's contract
    pos[1, 0], pos[0, -1] = -4, S_ + 2
    sp = _longformer.KeySplits(5 * C, 5)
    assert sp.C == C
    torch.testing.assert_close(_emulate_query_rows(x, pos, C, D_), _gathered(x, pos, sp), rtol=0, atol=0)


def _emulate_delta(dout, out, lse, pos, C, dlse=None):
    """bwd_kernel.h band_side_bwd_delta_rows<T, kQueryIndex = true>, row by row (its lanes:
    tests/test_cuda_delta_emulation.py): dO and O of op row (b, s) are token pos[b // C, s] of batch row b // C; a
    token outside [0, S) gives delta = 0 and ignores dlse -> delta (B * C, H, G)."""
    Bq, G_ = pos.shape
    S_, H_ = dout.shape[1], dout.shape[2]
    delta = torch.full((Bq * C * H_ * G_,), float("nan"), dtype=torch.float64)
    for row in range(Bq * C * G_ * H_):
        h, s, b = row % H_, (row // H_) % G_, row // (H_ * G_)
        src_b, src_s = b // C, int(pos[b // C, s])
        real = 0 <= src_s < S_
        acc = float((dout[src_b, src_s, h] * out[src_b, src_s, h]).sum()) if real else 0.0
        at = (b * H_ + h) * G_ + s
        if dlse is not None and real and lse.reshape(-1)[at] < float("inf"):
            acc -= float(dlse.reshape(-1)[at])
        delta[at] = acc
    return delta.view(Bq * C, H_, G_)


@pytest.mark.parametrize("C", [1, 3])
def test_query_index_delta_matches_the_gathered_rows(C):
    """The delta kernel with ``query_index``: rowsum(dO * O) of the slots' tokens read in place, what it computed on the
    gathered copies; a position outside [0, S) gives 0 (its dlse ignored: the row then has dS = 0, so no dq and no key
    gradient whatever lse it is given)."""
    gen = torch.Generator().manual_seed(C)
    Bq, S_, H_, D_, G_ = 2, 11, 3, 4, 5
    sp = _longformer.KeySplits(4 * C, 4)
    dout, out = (torch.randn(Bq, S_, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.stack([torch.randperm(S_, generator=gen)[:G_] for _ in range(Bq)])
    pos[0, 2] = S_
    lse = torch.randn(Bq * C, H_, G_, generator=gen, dtype=torch.float64)
    lse[0, 1, 3] = float("inf")
    dlse = torch.randn(Bq * C, H_, G_, generator=gen, dtype=torch.float64)
    want = (_gathered(dout, pos, sp) * _gathered(out, pos, sp)).sum(-1).transpose(1, 2)  # (B * C, H, G)
    torch.testing.assert_close(_emulate_delta(dout, out, lse, pos, C), want, rtol=0, atol=1e-12)
    real = ((pos >= 0) & (pos < S_)).repeat_interleave(C, 0)[:, None, :]  # (B * C, 1, G)
    got = _emulate_delta(dout, out, lse, pos, C, dlse)
    torch.testing.assert_close(got, want - torch.where(real & (lse < float("inf")), dlse, 0.0), rtol=0, atol=1e-12)
    assert (got.view(Bq, C, H_, G_)[0, :, :, 2] == 0).all()


def _lse_at(b, h, i, C, H_, S_):
    """bwd_kernel.h, the delta kernel's lse_split copy: lse_expanded[(b * H + h) * S + i] = lse_merged[this]."""
    return ((b // C) * H_ + h) * S_ + i


@pytest.mark.parametrize("C", [1, 3])
def test_lse_split_index_matches_key_splits_stats(C):
    """The delta kernel's copy of the merged lse into every split's row (8 lanes per (b, s, h) row, its first lane
    writing lse_expanded, which the dQ / dK/dV kernels then read as lse_in): what ``KeySplits.stats`` copied per
    split."""
    Bx, H_, G_ = 2, 3, 5
    sp = _longformer.KeySplits(4 * C, 4)
    assert sp.C == C
    glse = torch.randn(Bx, H_, G_)
    want = sp.stats(glse)  # (B * C, H, G)
    flat = glse.reshape(-1)
    expanded = torch.full((Bx * C * H_ * G_,), float("nan"))
    for row in range(Bx * C * G_ * H_):  # the delta kernel's rows: (b, s, h), h fastest
        h, s, b = row % H_, (row // H_) % G_, row // (H_ * G_)
        expanded[(b * H_ + h) * G_ + s] = flat[_lse_at(b, h, s, C, H_, G_)]
    assert torch.equal(expanded.view(Bx * C, H_, G_), want)


def _side_key_rows(b, g, h, B_, G_, H_, D_, side_mask, *, side_index=None, S_=None, into=None, dside=None):
    """bwd_kernel.h side_key_rows: where side key g of batch row b (head h) puts its final dK / dV row -> (the flat
    storage offsets of the row's first element in the k and v destinations, add), or None (nothing). Destinations:
    rows side_index of (B, S, H, D) dk / dv (added), the split keys' rows of ``into`` = (dk_into, dv_into) (B / C, S',
    H, D) through their strides (added), else rows g of (B, G, H, D) ``dside`` (stored, masked slots included)."""
    if side_index is None and into is None:
        at = ((b * G_ + g) * H_ + h) * D_
        return at, at, False
    if side_mask is not None and not side_mask.reshape(-1)[b * G_ + g]:
        return None
    if into is None:
        row = int(side_index[b, g])
        if row < 0 or row >= S_:
            return None
        at = ((b * S_ + row) * H_ + h) * D_
        return at, at, True
    into_split, into_rows = B_ // into[0].shape[0], into[0].shape[1]
    row, kb = (b % into_split) * G_ + g, b // into_split
    if row >= into_rows:
        return None
    (kbs, krs, khs), (vbs, vrs, vhs) = (x.stride()[:3] for x in into)
    return (into[0].storage_offset() + kb * kbs + row * krs + h * khs,
            into[1].storage_offset() + kb * vbs + row * vrs + h * vhs, True)


def _flat(x):
    return x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)


def _put_pair(flat, at, pair, add):
    """bwd_kernel.h put_pair: two elements stored, or added to what is there (in the destination's dtype here)."""
    if add:
        flat[at:at + 2] += pair.to(flat.dtype)
    else:
        flat[at:at + 2] = pair.to(flat.dtype)


def _emulate_finish_side_keys(partials, side_mask, B_, G_, H_, D_, dk, dv, *, side_index=None, into=None):
    """band_side_bwd_finish_kernel's side-key warps thread by thread (one thread per (b, g, h, column pair), t = warp *
    32 + lane): ``partials`` (dsk, dsv) of (chunks, B, G, H, D) summed in chunk order and put where side_key_rows says:
    ``dk`` / ``dv`` (B, S, H, D) for the indexed band pass, or ``into`` = (dk_into, dv_into) (B / C, S', H, D), any
    even strides, updated through their flat storage with the kernel's stride arithmetic, or (neither) new (B, G, H, D)
    side-key gradients. Returns the destinations."""
    dsk, dsv = (p.reshape(p.shape[0], -1) for p in partials)
    pairs = D_ // 2
    if into is None and side_index is None:
        dk, dv = (torch.full((B_, G_, H_, D_), float("nan"), dtype=p.dtype) for p in partials)
    dests = into if into is not None else (dk, dv)
    flat = [_flat(x) for x in dests]
    S_ = dk.shape[1] if dk is not None else None
    for t in range(B_ * G_ * H_ * pairs):
        bgh, d = t // pairs, (t % pairs) * 2
        h, bg = bgh % H_, bgh // H_
        rows = _side_key_rows(bg // G_, bg % G_, h, B_, G_, H_, D_, side_mask, side_index=side_index, S_=S_,
                              into=into)
        if rows is None:
            continue
        at = bgh * D_ + d
        sk = dsk[:, at:at + 2].sum(0)  # chunk order: float32 adds in sequence (exact here: float64 data)
        sv = dsv[:, at:at + 2].sum(0)
        _put_pair(flat[0], rows[0] + d, sk, rows[2])
        _put_pair(flat[1], rows[1] + d, sv, rows[2])
    return dests


def _split_keys_case(seed, Sk, n, strided, masked, lead, H_, D_):
    """Two batch rows of Sk keys in splits of n -> (KeySplits, B * C, [dK, dV] values (*lead, B * C, n, H, D), the
    splits' key mask or None, the destinations' values, the destinations (``strided``: (B, H, S, D) storage seen as
    (B, S, H, D)))."""
    gen = torch.Generator().manual_seed(seed)
    Bx = 2
    sp = _longformer.KeySplits(Sk, n)
    BC = Bx * sp.C
    values = [torch.randn(*lead, BC, sp.n, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2)]
    key_mask = torch.rand(Bx, Sk, generator=gen) > 0.3
    side_mask = sp.key_mask(key_mask, Bx, "cpu") if masked else None
    base = [torch.randn(Bx, Sk, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2)]
    if strided:
        into = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in base]
    else:
        into = [x.clone() for x in base]
    return sp, BC, values, side_mask, base, into


@pytest.mark.parametrize("Sk, n, strided, masked", [(12, 4, False, True), (10, 4, True, True), (7, 7, False, True),
                                                     (10, 4, False, False)],
                         ids=["splits", "padded-strided", "one-split", "padded-no-mask"])
def test_finish_into_matches_unkeys_add(Sk, n, strided, masked):
    """The global rows' dside_*_into: split c of key batch row b lands on rows c n .. of batch b (the padding keys past
    S dropped, also without a mask to drop them; masked keys given nothing), through any even strides: what
    ``KeySplits.unkeys`` + ``add_`` did."""
    H_, D_ = 3, 4
    sp, BC, partials, side_mask, base, into = _split_keys_case(Sk, Sk, n, strided, masked, (3,), H_, D_)
    got = _emulate_finish_side_keys(partials, side_mask, BC, sp.n, H_, D_, None, None, into=into)
    for g, x, part in zip(got, base, partials):
        kept = part.sum(0) if side_mask is None else part.sum(0) * side_mask.reshape(BC, sp.n)[:, :, None, None]
        torch.testing.assert_close(g, x + sp.unkeys(kept), rtol=0, atol=1e-12)


def test_finish_indexed_matches_scatter_add():
    """The kIndexed band pass's branch of the same kernel: rows side_index of dk / dv (out of range skipped, unused
    slots given nothing), what ``scatter_add`` did."""
    gen = torch.Generator().manual_seed(0)
    Bx, Sx, H_, D_, G_, chunks = 2, 9, 2, 4, 4, 2
    partials = [torch.randn(chunks, Bx, G_, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2)]
    pos = torch.tensor([[7, 0, 3, 5], [2, 8, Sx + 1, -4]])
    used = torch.tensor([[True, False, True, True], [True, True, True, True]])
    dk, dv = (torch.randn(Bx, Sx, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2))
    want = []
    for x, part in zip((dk, dv), partials):
        keep = used & (pos >= 0) & (pos < Sx)
        summed = part.sum(0) * keep[:, :, None, None]
        want.append(x.scatter_add(1, pos.clamp(0, Sx - 1)[:, :, None, None].expand(Bx, G_, H_, D_), summed))
    got = _emulate_finish_side_keys(partials, used, Bx, G_, H_, D_, dk.clone(), dv.clone(), side_index=pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def _emulate_one_chunk_epilogue(acc, scale, B_, G_, H_, D_, side_mask, *, into=None, side_index=None, dk=None,
                                dv=None):
    """The dK/dV kernel's side-tile epilogue with one chunk (``dsk_partial == nullptr``), CTA by CTA, warp by warp,
    lane by lane: ``acc`` = (acc_dk, acc_dv) (B, G, H, D), the CTAs' unscaled accumulators by key row; thread (warp,
    lane) of the CTA on key tile key0 owns rows k0 = key0 + 16 warp + lane // 4 and k0 + 8, columns 8 n + 2 (lane % 4)
    (+1), and puts dK = acc_dk * scale, dV = acc_dv where side_key_rows says (``put_acc_row``: a batch's loads before
    its stores). Every destination element is written by at most one thread (checked) -> the destinations."""
    dests = into if into is not None else (dk, dv)
    if dests[0] is None:
        dests = tuple(torch.full((B_, G_, H_, D_), float("nan"), dtype=acc[0].dtype) for _ in range(2))
    flat = [_flat(x) for x in dests]
    S_ = dk.shape[1] if dk is not None else None
    written = set()
    for b in range(B_):
        for h in range(H_):
            for key0 in range(0, G_, TILE):  # side CTAs: one per key tile (one chunk)
                for warp in range(4):
                    for lane in range(32):
                        for half in range(2):
                            g = key0 + warp * 16 + lane // 4 + 8 * half
                            if g >= G_:
                                continue
                            rows = _side_key_rows(b, g, h, B_, G_, H_, D_, side_mask, side_index=side_index, S_=S_,
                                                  into=into)
                            if rows is None:
                                continue
                            # put_acc_row: the k row, then the v row, each in batches of up to 8 pairs whose
                            # loads all come before the batch's stores.
                            for which, (x, sc) in enumerate(((acc[0], scale), (acc[1], 1.0))):
                                batch = min(8, D_ // 8)
                                for n0 in range(0, D_ // 8, batch):
                                    ats = [rows[which] + n * 8 + (lane % 4) * 2 for n in range(n0, n0 + batch)]
                                    old = [flat[which][at:at + 2].clone() for at in ats] if rows[2] else None
                                    for i, at in enumerate(ats):
                                        assert (which, at) not in written
                                        written.add((which, at))
                                        col = at - rows[which]
                                        pair = (x[b, g, h, col:col + 2] * sc).to(flat[which].dtype)
                                        flat[which][at:at + 2] = old[i] + pair if rows[2] else pair
    return dests


@pytest.mark.parametrize("Sk, n, strided, masked", [(12, 4, False, True), (10, 4, True, True), (130, 130, False, True),
                                                     (10, 4, False, False)],
                         ids=["splits", "padded-strided", "one-split-two-tiles", "padded-no-mask"])
def test_one_chunk_epilogue_matches_unkeys_add(Sk, n, strided, masked):
    """``side_only`` runs one query chunk, and the dK/dV epilogue adds each side key's row into ``dside_*_into`` itself
    (no (chunks, B, S, H, D) float32 partials, no second kernel): what ``KeySplits.unkeys`` + ``add_`` did, and what
    the finish kernel gives the same accumulators as one chunk of partials."""
    H_, D_, scale = 2, 16, 0.25
    sp, BC, acc, side_mask, base, into = _split_keys_case(Sk + 1, Sk, n, strided, masked, (), H_, D_)
    want_finish = _emulate_finish_side_keys([acc[0][None] * scale, acc[1][None]], side_mask, BC, sp.n, H_, D_, None,
                                            None, into=[x.clone() for x in into])
    got = _emulate_one_chunk_epilogue(acc, scale, BC, sp.n, H_, D_, side_mask, into=into)
    for g, x, a, sc, f in zip(got, base, acc, (scale, 1.0), want_finish):
        kept = a * sc if side_mask is None else a * sc * side_mask.reshape(BC, sp.n)[:, :, None, None]
        torch.testing.assert_close(g, x + sp.unkeys(kept), rtol=0, atol=1e-12)
        assert torch.equal(g, f)


def test_one_chunk_epilogue_stores_every_returned_row():
    """Without ``dside_*_into`` (separate global k / v projections) the epilogue stores every side key's row of the
    returned (B, G, H, D) gradients, masked keys included (no NaN of the empty buffer survives)."""
    gen = torch.Generator().manual_seed(3)
    Bx, G_, H_, D_ = 2, 70, 2, 16
    acc = [torch.randn(Bx, G_, H_, D_, generator=gen, dtype=torch.float64) for _ in range(2)]
    side_mask = torch.rand(Bx, G_, generator=gen) > 0.5
    got = _emulate_one_chunk_epilogue(acc, 0.5, Bx, G_, H_, D_, side_mask)
    assert torch.equal(got[0], acc[0] * 0.5) and torch.equal(got[1], acc[1])


def _walk(S_, G_, left, right, m0, side_only, ranges):
    """launch_template.h dispatch_flags (side_only runs the kRanges kernels), then tile_ops.h full_key_walk or ranges.h
    query_tile_ranges (no key_ranges, side_ranges unrestricted) -> the key tiles query tile m0 visits, as
    ("band" | "side", first key)."""
    k_ranges = ranges or side_only
    lo, hi = max(0, m0 - left), min(S_ - 1, min(S_ - 1, m0 + TILE - 1) + right)
    band_first, band_count = lo // TILE, hi // TILE - lo // TILE + 1
    if k_ranges and side_only:  # query_tile_ranges, after the window's span
        band_count = 0
    side_count = -(-G_ // TILE)
    return [("band", (band_first + t) * TILE) for t in range(band_count)] + [
        ("side", t * TILE) for t in range(side_count)]


def _dkdv_grid(S_, G_, side_only, side_chunks):
    """band_side_api.cpp prepare (n_band_tiles, the grid's band CTAs) and the dK/dV kernel's CTA decode (n_band_ctas,
    0 with side_only in the kRanges kernels that run it) -> the CTAs' (kind, key0, chunk)."""
    n_band_tiles = 0 if side_only else -(-S_ // TILE)
    k_ranges = side_only  # dispatch_flags
    n_band_ctas = 0 if k_ranges and side_only else -(-S_ // TILE)
    assert n_band_ctas == n_band_tiles  # the kernel's split of the grid is the host's
    side_ctas = -(-G_ // TILE) * side_chunks
    ctas = []
    for x in range(n_band_tiles + side_ctas):
        if x < n_band_ctas:
            ctas.append(("band", x * TILE, 0))
        else:
            side_cta = x - n_band_ctas
            ctas.append(("side", (side_cta // side_chunks) * TILE, side_cta % side_chunks))
    return ctas


@pytest.mark.parametrize("S_, G_", [(5, 1), (64, 100), (130, 1024), (200, 70)])
@pytest.mark.parametrize("ranges", [False, True])
def test_side_only_walks_side_tiles_only(S_, G_, ranges):
    """``side_only``: every query tile walks exactly the side tiles it walked before (the band tiles, all masked by the
    old all-False band mask, are gone), and the dK/dV grid is exactly the old side CTAs, each (tile, chunk) once."""
    for m0 in range(0, S_, TILE):
        before = _walk(S_, G_, 0, 0, m0, False, ranges)
        after = _walk(S_, G_, 0, 0, m0, True, ranges)
        assert after == [t for t in before if t[0] == "side"] and after, (m0, before, after)
    for chunks in (1, 3):
        before = _dkdv_grid(S_, G_, False, chunks)
        after = _dkdv_grid(S_, G_, True, chunks)
        assert after == [c for c in before if c[0] == "side"]
        assert sorted(after) == sorted({c for c in after}) and len(after) == -(-G_ // TILE) * chunks


def test_rows_add_zero_fill_is_zeros_then_add():
    """``zero_fill``: one memset of dq, then the add kernel: the old ``zeros_like`` + add."""
    gen = torch.Generator().manual_seed(1)
    Bx, Sx, H_, D_, C = 2, 9, 3, 4, 3
    pos = torch.tensor([[7, 0, 3, 5], [2, 8, 4, 1]])
    used = torch.tensor([[True, True, True, False], [True, True, False, False]])
    parts = torch.randn(Bx * C, 4, H_, D_, generator=gen, dtype=torch.float64) * used.repeat_interleave(C, 0)[..., None,
                                                                                                              None]
    garbage = torch.full((Bx, Sx, H_, D_), float("nan"), dtype=torch.float64)  # torch.empty_like's contents
    memset = torch.zeros_like(garbage)
    got = _emulate_rows("add", memset, pos, used, C, parts)
    want = _emulate_rows("add", torch.zeros_like(garbage), pos, used, C, parts)
    assert torch.equal(got, want) and torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------------------
# Raw-op checks (CPU registrations), fakes, and the backend's call sequence on meta tensors
# --------------------------------------------------------------------------------------------------------

_SIDE_ONLY = {"side_index": None, "query_mask": None, "band_rows_only": False, "band_key_mask": None,
              "side_only": True, "side_k": torch.zeros(B, G, H, D, dtype=torch.float16),
              "side_v": torch.zeros(B, G, H, D, dtype=torch.float16), "left": 0, "right": 0}
_Z2 = torch.zeros(B * 2, S, H, D, dtype=torch.float16)  # two splits per batch row of a (B, ...) key tensor
_SPLIT = {**_SIDE_ONLY, "q": _Z2, "k": _Z2, "v": _Z2, "dout": _Z2, "out": _Z2,
          "side_k": torch.zeros(B * 2, G, H, D, dtype=torch.float16),
          "side_v": torch.zeros(B * 2, G, H, D, dtype=torch.float16),
          "side_mask": torch.ones(B * 2, G, dtype=torch.bool), "lse_split": 2, "lse": torch.zeros(B, H, S),
          "dside_k_into": torch.zeros(B, 2 * G - 1, H, D, dtype=torch.float16),
          "dside_v_into": torch.zeros(B, 2 * G - 1, H, D, dtype=torch.float16)}
SIDE_ONLY_BAD = {  # (ops, change, message pattern after "<op>: ")
    "band-mask": (("fwd", "bwd"), {**_SIDE_ONLY, "band_key_mask": torch.ones(B, S, dtype=torch.bool)},
                  r"band_key_mask / band_bias / key_ranges must be None with side_only"),
    "band-bias": (("fwd", "bwd"), {**_SIDE_ONLY, "band_bias": torch.zeros(H, 1)},
                  r"band_key_mask / band_bias / key_ranges must be None with side_only"),
    "key-ranges": (("fwd", "bwd"), {**_SIDE_ONLY, "key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
                   r"band_key_mask / band_bias / key_ranges must be None with side_only"),
    "side-index": (("fwd", "bwd"), {**_SIDE_ONLY, "side_index": torch.zeros(B, G, dtype=torch.int64),
                                    "side_k": torch.zeros(B, S, H, D, dtype=torch.float16),
                                    "side_v": torch.zeros(B, S, H, D, dtype=torch.float16)},
                   r"side_index / halo_k must be None with side_only"),
    "lse-split-divides": (("bwd",), {**_SPLIT, "lse_split": 3}, r"lse_split must be in \[1, 65535\] and divide"),
    "lse-split-zero": (("bwd",), {**_SPLIT, "lse_split": 0}, r"lse_split must be in \[1, 65535\]"),
    "lse-shape": (("bwd",), {**_SPLIT, "lse_split": 1}, r"lse must have shape \(B / lse_split, H, S\)"),
    "dlse-split": (("bwd",), {**_SPLIT, "dlse": torch.zeros(2 * B, H, S)}, r"dlse must be None with lse_split > 1"),
    "into-alone": (("bwd",), {**_SPLIT, "dside_v_into": None}, r"dside_k_into and dside_v_into must be given together"),
    "into-index": (("bwd",), {"dside_k_into": torch.zeros(B, S, H, D, dtype=torch.float16),
                              "dside_v_into": torch.zeros(B, S, H, D, dtype=torch.float16)},
                   r"dside_k_into must be None with side_index"),
    "into-dtype": (("bwd",), {**_SPLIT, "dside_k_into": torch.zeros(B, 2 * G, H, D)},
                   r"dside_k_into must have q's dtype"),
    "into-batch": (("bwd",), {**_SPLIT, "dside_k_into": torch.zeros(3, 2 * G, H, D, dtype=torch.float16),
                              "dside_v_into": torch.zeros(3, 2 * G, H, D, dtype=torch.float16)},
                   r"dside_k_into must have shape \(B / C, S', H, D\)"),
    "into-unlike": (("bwd",), {**_SPLIT, "dside_v_into": torch.zeros(B, 2 * G, H, D, dtype=torch.float16)},
                    r"dside_v_into must have shape .* like dside_k_into"),
    "into-odd-stride": (("bwd",), {**_SPLIT, "dside_k_into": torch.zeros(B, 2 * G - 1, H, D + 1,
                                                                         dtype=torch.float16)[..., :D],
                                   "dside_v_into": torch.zeros(B, 2 * G - 1, H, D + 1, dtype=torch.float16)[..., :D]},
                        r"dside_k_into must keep element pairs 4-byte aligned"),
}
# query_index: the slots' rows of the unsplit q / dout / out (B, S, H, D) read in place by 2 splits of 4 keys each (the
# op's batch 2 B, its rows the G slots).
_F16 = dict(dtype=torch.float16)
_QI = {**_SIDE_ONLY, "query_index": torch.arange(G).repeat(B, 1), "side_k": torch.zeros(B * 2, 4, H, D, **_F16),
       "side_v": torch.zeros(B * 2, 4, H, D, **_F16), "side_mask": torch.ones(B * 2, 4, dtype=torch.bool),
       "lse_split": 2, "lse": torch.zeros(B, H, G), "dside_k_into": torch.zeros(B, 7, H, D, **_F16),
       "dside_v_into": torch.zeros(B, 7, H, D, **_F16)}
SIDE_ONLY_BAD.update({
    "qi-no-side-only": (("fwd", "bwd"), {**_QI, "side_only": False}, r"query_index needs side_only"),
    "qi-dtype": (("fwd", "bwd"), {**_QI, "query_index": torch.zeros(B, G, dtype=torch.int32)},
                 r"query_index must be Long"),
    "qi-B": (("fwd", "bwd"), {**_QI, "query_index": torch.zeros(B + 1, G, dtype=torch.int64)},
             r"query_index must have shape \(B_q, G\) with B_q = q's B = 2"),
    "qi-rank": (("fwd", "bwd"), {**_QI, "query_index": torch.zeros(B, G, 1, dtype=torch.int64)},
                r"query_index must have shape \(B_q, G\)"),
    "qi-strided": (("fwd", "bwd"), {**_QI, "query_index": torch.zeros(B, 2 * G, dtype=torch.int64)[:, ::2]},
                   r"query_index must have a unit last stride"),
    "qi-device": (("fwd", "bwd"), {**_QI, "query_index": torch.zeros(B, G, dtype=torch.int64, device="meta")},
                  r"query_index must be on q's device"),
    "qi-side-index": (("fwd", "bwd"), {**_QI, "side_index": torch.zeros(B, G, dtype=torch.int64)},
                      r"side_index must be None with query_index"),
    "qi-batch": (("fwd", "bwd"), {**_QI, "side_k": torch.zeros(B * 2 + 1, 4, H, D, **_F16)},
                 r"side_k's B must be a multiple of q's B_q = 2 with query_index"),
    "qi-batch-limit": (("fwd", "bwd"), {**_QI, "side_k": torch.zeros(D, **_F16).expand(65536, 4, H, D)},
                       r"side_k's B must be <= 65535 with query_index"),
    "qi-side_v": (("fwd", "bwd"), {**_QI, "side_v": torch.zeros(B, 4, H, D, **_F16)}, r"side_v must have shape"),
    "qi-side_mask": (("fwd", "bwd"), {**_QI, "side_mask": torch.ones(B, 4, dtype=torch.bool)},
                     r"side_mask must have shape \(B, G\) = \[4, 4\]"),
    "qi-ranges": (("fwd", "bwd"), {**_QI, "side_ranges": torch.zeros(B, G, 2, dtype=torch.int32)},
                  r"side_ranges must have shape \(B, S, 2\) = \[4, 3, 2\]"),
    "qi-dout-copy": (("bwd",), {**_QI, "dout": torch.zeros(B * 2, G, H, D, **_F16)},
                     r"dout must have shape \(B, S, H, D\) = \[2, 10, 2, 32\]"),
    "qi-out-copy": (("bwd",), {**_QI, "out": torch.zeros(B * 2, G, H, D, **_F16)}, r"out must have shape"),
    "qi-lse": (("bwd",), {**_QI, "lse": torch.zeros(B, H, S)}, r"lse must have shape \(B / lse_split, H, S\)"),
})
_QI_VALID = {
    "qi-split": _QI,
    "qi-one-split": {**_QI, "side_k": torch.zeros(B, 4, H, D, **_F16), "side_v": torch.zeros(B, 4, H, D, **_F16),
                     "side_mask": None, "lse_split": 1, "dside_k_into": None, "dside_v_into": None},
    "qi-out-of-range": {**_QI, "query_index": torch.tensor([[-5, S, 2**40]] * B)},  # any value is safe
    "qi-row-strided": {**_QI, "query_index": torch.zeros(B, G + 4, dtype=torch.int64)[:, 1:G + 1]},
    "qi-no-slots": {**_QI, "query_index": torch.zeros(B, 0, dtype=torch.int64), "lse": torch.zeros(B, H, 0)},
    "qi-ranges": {**_QI, "side_ranges": torch.zeros(B * 2, G, 2, dtype=torch.int32)},
    "qi-dropout": {**_QI, "dropout_p": 0.1, "rng": torch.zeros(2, dtype=torch.int64), "dropout_global_rows": True},
}
_OPS = {"fwd": "cuda_band_side_fwd", "bwd": "cuda_band_side_bwd"}


@needs_build
@pytest.mark.parametrize("op,case", [(op, case) for case, (ops, _, _) in SIDE_ONLY_BAD.items() for op in ops])
def test_raw_op_rejects_bad_global_rows_arguments(op, case):
    _, change, pattern = SIDE_ONLY_BAD[case]
    with pytest.raises(RuntimeError, match=rf"^{_OPS[op]}: {pattern}") as info:
        _raw_call(_OPS[op], change)
    assert not isinstance(info.value, NotImplementedError), info.value


@needs_build
@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("case", ["side-only", "split", "split-no-into", "strided-into", "dropout", *_QI_VALID])
def test_raw_op_accepts_valid_global_rows_arguments(op, case):
    change = _QI_VALID.get(case) or {
        "side-only": {**_SIDE_ONLY, "side_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
        "split": _SPLIT,
        "split-no-into": {**_SPLIT, "dside_k_into": None, "dside_v_into": None},
        "strided-into": {**_SPLIT, "dside_k_into": torch.zeros(B, H, 2 * G, D, dtype=torch.float16).transpose(
            1, 2), "dside_v_into": torch.zeros(B, H, 2 * G, D, dtype=torch.float16).transpose(1, 2)},
        "dropout": {**_SIDE_ONLY, "dropout_p": 0.1, "rng": torch.zeros(2, dtype=torch.int64),
                    "dropout_global_rows": True},
    }[case]
    if op == "fwd":
        change = {k: val for k, val in change.items() if k not in ("lse_split", "dside_k_into", "dside_v_into")}
    with pytest.raises(NotImplementedError, match=f"{_OPS[op]}: needs CUDA tensors"):
        _raw_call(_OPS[op], change)


@needs_build
def test_fake_shapes_of_the_global_rows_pass():
    meta = dict(device="meta", dtype=torch.float16)
    ops = torch.ops.longattn
    C, n = 3, 4
    qs = torch.empty(B * C, G, H, D, **meta)
    sk = torch.empty(B * C, n, H, D, **meta)
    out, lse = ops.cuda_band_side_fwd(qs, qs, qs, sk, sk, None, None, None, None, None, 0, 0, 0.125, side_only=True)
    assert out.shape == qs.shape and lse.shape == (B * C, H, G)
    glse = torch.empty(B, H, G, device="meta")
    into = torch.empty(B, C * n - 1, H, D, **meta)
    g = ops.cuda_band_side_bwd(qs, qs, qs, qs, sk, sk, out, glse, None, None, None, None, None, 0, 0, 0.125,
                               side_only=True, lse_split=C, dside_k_into=into, dside_v_into=into.clone())
    assert [tuple(t.shape) for t in g] == [tuple(qs.shape)] + [(0,)] * 8
    g = ops.cuda_band_side_bwd(qs, qs, qs, qs, sk, sk, out, glse, None, None, None, None, None, 0, 0, 0.125,
                               side_only=True, lse_split=C)
    assert [tuple(t.shape) for t in g] == [tuple(qs.shape), (0,), (0,), tuple(sk.shape), tuple(sk.shape)] + [(0,)] * 4
    dq = torch.empty(B, S, H, D, **meta)
    assert ops.cuda_longformer_rows_add(qs, torch.empty(B, G, dtype=torch.int64, device="meta"),
                                        torch.empty(B, G, dtype=torch.bool, device="meta"), dq, zero_fill=True) is None
    # query_index: q / dout / out are the unsplit (B, S, H, D) tensors; out, lse, dq keep the op's (B * C, G, ...)
    pos = torch.empty(B, G, dtype=torch.int64, device="meta")
    out, lse = ops.cuda_band_side_fwd(dq, dq, dq, sk, sk, None, None, None, None, None, 0, 0, 0.125, side_only=True,
                                      query_index=pos)
    assert out.shape == qs.shape and lse.shape == (B * C, H, G)
    g = ops.cuda_band_side_bwd(dq, dq, dq, dq, sk, sk, dq, glse, None, None, None, None, None, 0, 0, 0.125,
                               side_only=True, lse_split=C, dside_k_into=into, dside_v_into=into.clone(),
                               query_index=pos)
    assert [tuple(t.shape) for t in g] == [tuple(qs.shape)] + [(0,)] * 8


@needs_build
@pytest.mark.parametrize("split_keys", [None, 5], ids=["one-split", "splits"])
@pytest.mark.parametrize("shared", ["kv", "none", "k-only"])
def test_global_rows_run_no_torch_glue(split_keys, shared, monkeypatch):
    """Contiguous inputs, S a multiple of the split size: the global rows' forward and backward dispatch only longattn's
    raw ops (allocations aside); ``shared`` names the band pass's gradients the backward adds into (k / v shared,
    separate global projections, or only k shared: then the v-gradient's ``add_`` is the one glue op left)."""
    from tests.test_host_sync import OpLog

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    t = dict(device="meta", dtype=torch.float16)
    q, k, v, out = (torch.empty(B, S, H, D, **t) for _ in range(4))
    pos, used = torch.empty(B, G, dtype=torch.int64, device="meta"), torch.empty(B, G, dtype=torch.bool, device="meta")
    pad = torch.empty(B, S, dtype=torch.bool, device="meta")
    with OpLog() as fwd:
        glse = cuda_backend.global_rows_forward(q, k, v, pos, used, pad, 0.125, out)
    into = {"kv": (q.clone(), k.clone(), v.clone()), "none": (None, None, None), "k-only": (None, k.clone(), None)}
    with OpLog() as bwd:
        dq, dk, dv = cuda_backend.global_rows_backward(out, q, k, v, out, glse, pos, used, pad, 0.125, *into[shared])
    assert dq.shape == dk.shape == dv.shape == q.shape and dq.is_contiguous()
    allocations = ("aten.empty", "aten.empty_like", "aten.empty.memory_format", "aten.empty_like.default")
    glue_f = [op for op in fwd.ops if op.startswith("aten.") and not op.startswith(allocations)]
    glue_b = [op for op in bwd.ops if op.startswith("aten.") and not op.startswith(allocations)]
    assert glue_f == [], fwd.ops
    assert glue_b == (["aten.add_"] if shared == "k-only" else []), bwd.ops
    ours = "longattn.cuda_longformer_"
    assert [op for op in fwd.ops if op.startswith("longattn.")] == ["longattn.cuda_band_side_fwd",
                                                                    f"{ours}rows_merge"], fwd.ops
    assert [op for op in bwd.ops if op.startswith("longattn.")] == ["longattn.cuda_band_side_bwd",
                                                                    f"{ours}rows_add"], bwd.ops


@needs_build
@pytest.mark.parametrize("split_keys, Sx, into", [(None, S, True), (5, 10, True), (4, 11, True), (5, 10, False)],
                         ids=["one-split", "splits", "padded", "splits-returned"])
def test_global_rows_arguments_pass_the_raw_op_checks(split_keys, Sx, into, monkeypatch):
    """The backend's global-rows calls, on CPU tensors, get through every check of the raw band op's CPU registration
    (the CUDA one's checks) to its "needs CUDA tensors": q / dout / out in place with query_index, the splits' keys,
    mask and (padded) shapes, lse_split and the dk / dv destinations are all what the op accepts."""
    from tests.test_cuda_longformer import _global_rows_args

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    q, k, v, out, pos, used, pad = _global_rows_args("cpu", Sx)
    with pytest.raises(NotImplementedError, match="cuda_band_side_fwd: needs CUDA tensors"):
        cuda_backend.global_rows_forward(q, k, v, pos, used, pad, 0.125, out)
    dk_into, dv_into = (k.clone(), v.clone()) if into else (None, None)
    with pytest.raises(NotImplementedError, match="cuda_band_side_bwd: needs CUDA tensors"):
        cuda_backend.global_rows_backward(out, q, k, v, out, torch.zeros(B, H, G), pos, used, pad, 0.125, None,
                                          dk_into, dv_into)


class _RawArgs(TorchDispatchMode):
    """The (op, args, kwargs) of every longattn raw op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket).startswith("longattn."):
            self.calls.append((str(func.overloadpacket), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _bound(func_name, args, kwargs):
    op = getattr(torch.ops.longattn, func_name.split(".")[-1]).default
    names = [a.name for a in op._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


@needs_build
@pytest.mark.parametrize("split_keys", [None, 5], ids=["one-split", "splits"])
def test_global_rows_band_op_reads_the_rows_in_place(split_keys, monkeypatch):
    """The global rows' band op is given q (and in the backward dout and out) themselves with ``query_index = pos``,
    not copies of their slots' rows: its batch is the key splits' (side_k's B * C), its rows the G slots."""
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    t = dict(device="meta", dtype=torch.float16)
    q, k, v, out, dout = (torch.empty(B, S, H, D, **t) for _ in range(5))
    pos, used = torch.empty(B, G, dtype=torch.int64, device="meta"), torch.empty(B, G, dtype=torch.bool, device="meta")
    with _RawArgs() as fwd:
        glse = cuda_backend.global_rows_forward(q, k, v, pos, used, None, 0.125, out)
    with _RawArgs() as bwd:
        cuda_backend.global_rows_backward(dout, q, k, v, out, glse, pos, used, None, 0.125, None, k.clone(),
                                          v.clone())
    C = 1 if split_keys is None else S // split_keys
    (name_f, args_f, kw_f), _ = fwd.calls
    (name_b, args_b, kw_b), _ = bwd.calls
    f, b = _bound(name_f, args_f, kw_f), _bound(name_b, args_b, kw_b)
    assert f["q"] is q and f["query_index"] is pos and f["side_only"] and f["side_k"].shape[0] == B * C
    assert b["q"] is q and b["dout"] is dout and b["out"] is out and b["query_index"] is pos
    assert b["lse"] is glse and b["lse_split"] == C


# --------------------------------------------------------------------------------------------------------
# GPU: the raw ops against the composition they replace
# --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("Sk, n, dtype", [(300, 100, torch.float16), (250, 64, torch.bfloat16),
                                          (90, 1024, torch.float16)], ids=["splits", "padded", "one-split"])
def test_side_only_split_rows_match_the_masked_composition(Sk, n, dtype):
    """The global rows' band op with ``side_only`` / ``lse_split`` / ``dside_*_into`` against the old call (an all-False
    band mask, the merged lse copied per split, the split gradients un-split and added): out, lse and dq bitwise
    (the masked band tile only ever added zeros), dk / dv within one rounding (the partial sums are no longer
    rounded before the add). ``merged`` starts finite: the merge leaves the unused slots' token rows as they are (the
    band pass's out in the op), and an uninitialised row there (``empty_like``: any bits, inf / NaN included) made that
    slot's delta = rowsum(dout * out) non-finite, hence its dS = P * (dP - delta) = 0 * NaN and its dq row NaN in
    both calls: ``torch.equal`` is False on NaN (the H200 failure of the 'splits' case)."""
    ops, dev = torch.ops.longattn, "cuda"
    gen = torch.Generator().manual_seed(Sk)
    Bx, H_, D_, G_ = 2, 3, 64, 5
    sp = _longformer.KeySplits(Sk, n)
    q, k, v = (torch.randn(Bx, Sk, H_, D_, generator=gen).to(dev, dtype) for _ in range(3))
    pos = torch.stack([torch.randperm(Sk, generator=gen)[:G_] for _ in range(Bx)]).to(dev)
    used = torch.ones(Bx, G_, dtype=torch.bool, device=dev)
    used[1, -1] = False
    key_mask = (torch.rand(Bx, Sk, generator=gen) > 0.2).to(dev)
    qs = _gathered(q, pos, sp)
    side = (sp.keys(k), sp.keys(v))
    side_mask = sp.key_mask(key_mask, Bx, dev)
    no_band = torch.zeros(qs.shape[:2], dtype=torch.bool, device=dev)
    args = (None, side_mask, None, None, None, 0, 0, D_**-0.5)
    old_args = (no_band, *args[1:])
    out_old, lse_old = ops.cuda_band_side_fwd(qs, qs, qs, *side, *old_args, dropout_global_rows=True)
    out_new, lse_new = ops.cuda_band_side_fwd(qs, qs, qs, *side, *args, dropout_global_rows=True, side_only=True)
    assert torch.equal(out_new, out_old) and torch.equal(lse_new, lse_old)
    merged = torch.randn(Bx, Sk, H_, D_, generator=gen).to(dev, dtype)  # finite where the merge writes nothing
    glse = ops.cuda_longformer_rows_merge(out_new, lse_new, pos, used, merged)
    dout = torch.randn(Bx, Sk, H_, D_, generator=gen).to(dev, dtype)
    douts, outs = _gathered(dout, pos, sp), _gathered(merged, pos, sp)
    old = ops.cuda_band_side_bwd(douts, qs, qs, qs, *side, outs, sp.stats(glse), *old_args, dropout_global_rows=True)
    dk_base, dv_base = (torch.randn(Bx, Sk, H_, D_, generator=gen).to(dev, dtype) for _ in range(2))
    dk_into, dv_into = dk_base.clone(), dv_base.clone()
    new = ops.cuda_band_side_bwd(douts, qs, qs, qs, *side, outs, glse, *args, dropout_global_rows=True,
                                 side_only=True, lse_split=sp.C, dside_k_into=dk_into, dside_v_into=dv_into)
    assert torch.isfinite(old[0]).all() and torch.equal(new[0], old[0])
    assert new[1].numel() == new[2].numel() == new[3].numel() == new[4].numel() == 0
    for got, base, split_grad in ((dk_into, dk_base, old[3]), (dv_into, dv_base, old[4])):
        want = base.float() + sp.unkeys(split_grad).float()
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    returned = ops.cuda_band_side_bwd(douts, qs, qs, qs, *side, outs, glse, *args, dropout_global_rows=True,
                                      side_only=True, lse_split=sp.C)
    assert torch.equal(returned[0], old[0]) and torch.equal(returned[3], old[3]) and torch.equal(returned[4], old[4])


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("Sk, n, D_, dtype, dropout", [(300, 100, 64, torch.float16, 0.0),
                                                       (250, 64, 128, torch.bfloat16, 0.0),
                                                       (90, 1024, 32, torch.float16, 0.2)],
                         ids=["splits", "padded-d128", "one-split-dropout"])
def test_query_index_matches_the_gathered_rows(Sk, n, D_, dtype, dropout):
    """``query_index`` (the slots' rows of the unsplit, strided q / dout / out read in place by every split) against the
    same op on the rows gathered per split (``KeySplits.rows``, the old gather kernel's copies): out, lse, dq and the
    keys' gradients bitwise (the same tiles in the same order) for the slots whose position is in [0, S), and 70 slots
    (two query tiles); a position outside [0, S) gives out = 0, lse = +inf and dq = 0."""
    ops, dev = torch.ops.longattn, "cuda"
    gen = torch.Generator().manual_seed(Sk)
    Bx, H_, G_ = 2, 3, 70
    sp = _longformer.KeySplits(Sk, n)
    q, k, v, dout, merged = (torch.randn(Bx, H_, Sk, D_, generator=gen).to(dev, dtype).transpose(1, 2)
                             for _ in range(5))
    pos = torch.stack([torch.randperm(Sk, generator=gen)[:G_] for _ in range(Bx)]).to(dev)
    pos[1, 3], pos[0, 69] = -2, Sk + 9
    real = ((pos >= 0) & (pos < Sk)).repeat_interleave(sp.C, 0)  # (B * C, G)
    side = (sp.keys(k), sp.keys(v))
    side_mask = sp.key_mask((torch.rand(Bx, Sk, generator=gen) > 0.2).to(dev), Bx, dev)
    args = (None, side_mask, None, None, None, 0, 0, D_**-0.5)
    kw = {"dropout_global_rows": True, "side_only": True}
    if dropout:
        kw.update(dropout_p=dropout, rng=torch.tensor([3, 4], dtype=torch.int64, device=dev))
    qs = _gathered(q, pos, sp)
    out_old, lse_old = ops.cuda_band_side_fwd(qs, qs, qs, *side, *args, **kw)
    out_new, lse_new = ops.cuda_band_side_fwd(q, q, q, *side, *args, **kw, query_index=pos)
    assert out_new.shape == out_old.shape and lse_new.shape == lse_old.shape
    assert torch.equal(out_new[real], out_old[real]) and (out_new[~real] == 0).all()
    assert torch.equal(lse_new.transpose(1, 2)[real], lse_old.transpose(1, 2)[real])
    assert torch.isinf(lse_new.transpose(1, 2)[~real]).all()
    glse = torch.randn(Bx, H_, G_, generator=gen).to(dev)  # any merged statistics: both read the same
    douts, outs = _gathered(dout, pos, sp), _gathered(merged, pos, sp)
    old = ops.cuda_band_side_bwd(douts, qs, qs, qs, *side, outs, glse, *args, **kw, lse_split=sp.C)
    new = ops.cuda_band_side_bwd(dout, q, q, q, *side, merged, glse, *args, **kw, lse_split=sp.C, query_index=pos)
    assert torch.equal(new[0][real], old[0][real]) and (new[0][~real] == 0).all()
    # The keys' gradients: the masked rows' zero q / dout rows contributed exactly 0 there; here they contribute
    # nothing at all (delta = 0, so dS = 0).
    for got, want in zip(new[3:5], old[3:5]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(ops.cuda_band_side_fwd.default, (q, q, q, *side, *args), {**kw, "query_index": pos})


@pytest.mark.gpu
@gpu_ready
def test_rows_add_zero_fill_matches_zeros_then_add():
    ops, dev = torch.ops.longattn, "cuda"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 3, 64, generator=gen).to(dev, torch.bfloat16)
    pos = torch.tensor([[7, 0, 299, 5, -3], [2, 8, 4, 1, 2**40]], device=dev)
    used = torch.ones(2, 5, dtype=torch.bool, device=dev)
    parts = torch.randn(8, 5, 3, 64, generator=gen).to(dev, torch.bfloat16)
    want = torch.zeros_like(x)
    ops.cuda_longformer_rows_add(parts, pos, used, want)
    got = torch.full_like(x, float("nan"))
    ops.cuda_longformer_rows_add(parts, pos, used, got, zero_fill=True)
    assert torch.equal(got, want)
    torch.library.opcheck(ops.cuda_longformer_rows_add.default, (parts, pos, used, x.clone()), {"zero_fill": True})
