"""The CUDA backward's delta launch (csrc/band_side/bwd_kernel.h ``band_side_bwd_delta_rows``, launched by
``band_side_bwd_delta_kernel`` and Longformer's fused delta launch; layout constants in band_side/launch.h), emulated
lane by lane on the CPU, against rowsum(dO * O) in float64.

The kernel gives each (b, s, h) row 8 lanes of a warp (4 rows a warp, 8 warps a CTA); lane l of a row reads the
row's 16-byte chunks l and l + 8 (those below D / 8), and the row's partial sums meet in a butterfly of xor offsets
4, 2, 1. The emulation follows it statement by statement and checks, for D = 32, 64 and 128, strided (loadable:
16-byte aligned row starts) dO / O, Longformer's global rows (query_index: rows read at the slots' tokens, a token
outside the sequence giving 0), dlse and lse_split: every stored value, that every chunk of every real row is read
exactly once and is 16-byte aligned inside its row, that every row is stored once by its first lane, and that no
lane reads or stores for a row past the end.
"""

from __future__ import annotations

import sys

import pytest
import torch

LANES_PER_ROW, ROWS_PER_WARP, WARPS_PER_CTA = 8, 4, 8  # launch.h kDeltaLanesPerRow, kDeltaRowsPerWarp, ...
MAX_CHUNKS = 128 // 8 // LANES_PER_ROW  # bwd_kernel.h kMaxChunks: D <= 128
BUTTERFLY_FIRST = LANES_PER_ROW // 2  # the first xor offset of the row's sum


def _chunk_dot(x, y):
    """bwd_kernel.h chunk_dot: 8 elements, fmaf pair by pair in float32 (the emulation's float32 is torch's)."""
    acc = torch.zeros((), dtype=torch.float32)
    for a, b in zip(x.float(), y.float()):
        acc = acc + a * b  # one rounding per fmaf: a * b of two 16-bit values is exact in float32
    return acc


class _Pass:
    """The params a delta pass reads: dO / O (B', S', H, D) 16-bit views (any loadable strides), the pass's (B, S, H)
    rows, and the optional query_index (B / query_split, S) with query_tokens, dlse / lse_in (B, H, S), lse_split with
    lse_merged (B / lse_split, H, S)."""

    def __init__(self, dout, out, B, S, H, *, query_index=None, query_split=1, dlse=None, lse_in=None, lse_split=1,
                 lse_merged=None):
        self.dout, self.out, self.B, self.S, self.H, self.D = dout, out, B, S, H, dout.shape[-1]
        self.query_index, self.query_split = query_index, query_split
        self.dlse, self.lse_in, self.lse_split, self.lse_merged = dlse, lse_in, lse_split, lse_merged
        self.delta = torch.full((B, H, S), float("nan"))
        self.lse_expanded = torch.full((B, H, S), float("nan"))
        self.reads = []  # (tensor, b, s, h, chunk) of every 16-byte load
        self.stores = []  # (b, s, h) of every delta store

    def load_chunk(self, name, b, s, h, c):
        t = getattr(self, name)
        assert 0 <= c and (c + 1) * 8 <= self.D, f"chunk {c} outside a row of {self.D}"
        offset = b * t.stride(0) + s * t.stride(1) + h * t.stride(2) + c * 8  # elements from the 16-byte-aligned base
        assert offset % 8 == 0, f"{name} chunk at element {offset}: not 16-byte aligned"
        self.reads.append((name, b, s, h, c))
        return t[b, s, h, c * 8:(c + 1) * 8]


def _warp(p, warp):
    """band_side_bwd_delta_rows for one warp of the pass (its warps counted from the pass's first)."""
    acc = [torch.zeros((), dtype=torch.float32) for _ in range(32)]
    lane_rows = []
    for lane in range(32):
        part = lane % LANES_PER_ROW
        row = warp * ROWS_PER_WARP + lane // LANES_PER_ROW
        in_rows = row < p.B * p.S * p.H
        h, s, b = row % p.H, (row // p.H) % p.S, row // (p.H * p.S)
        src_b, src_s, real = b, s, in_rows
        if p.query_index is not None:
            src_b = b // p.query_split
            if in_rows:
                src_s = int(p.query_index[src_b, s])
            real = in_rows and 0 <= src_s < p.dout.shape[1]  # query_tokens: the tokens of dout / out
        if real:
            for i in range(MAX_CHUNKS):
                c = part + i * LANES_PER_ROW
                if c < p.D // 8:
                    acc[lane] = acc[lane] + _chunk_dot(p.load_chunk("dout", src_b, src_s, h, c),
                                                       p.load_chunk("out", src_b, src_s, h, c))
        lane_rows.append((in_rows, real, part, b, s, h))
    off = BUTTERFLY_FIRST
    while off > 0:  # __shfl_xor_sync: every lane reads its partner's value before any adds
        acc = [acc[lane] + acc[lane ^ off] for lane in range(32)]
        off //= 2
    for lane, (in_rows, real, part, b, s, h) in enumerate(lane_rows):
        if in_rows and part == 0:
            value = acc[lane]
            if p.lse_split > 1:
                p.lse_expanded[b, h, s] = p.lse_merged[b // p.lse_split, h, s]
            if p.dlse is not None and real and p.lse_in[b, h, s] < float("inf"):
                value = value - p.dlse[b, h, s]
            p.delta[b, h, s] = value
            p.stores.append((b, s, h))


def _delta_warps(rows):  # launch.h delta_warps
    return -(-rows // ROWS_PER_WARP)


def _run(p):
    """band_side_bwd_delta_kernel's grid (launch.cu): every warp of its ceil(delta_warps / 8) CTAs."""
    for warp in range(-(-_delta_warps(p.B * p.S * p.H) // WARPS_PER_CTA) * WARPS_PER_CTA):
        _warp(p, warp)
    return p


def _loadable(B, S, H, D, dtype, gen, pad_head=0, pad_row=0):
    """A (B, S, H, D) view with row starts on 8-element boundaries (band_side_api.cpp loadable): heads padded by
    pad_head elements, tokens by pad_row (multiples of 8)."""
    base = torch.randn(B, S, H * (D + pad_head) + pad_row, generator=gen).to(dtype)
    return base[:, :, :H * (D + pad_head)].unflatten(-1, (H, D + pad_head))[..., :D]


def _rowsum(dout, out):  # (B, S, H, D) -> (B, H, S), float64
    return (dout.double() * out.double()).sum(-1).transpose(1, 2)


def _assert_reads_once(p, rows):
    """Every chunk of every (b, s, h) in rows read once from each tensor, nothing else read."""
    want = sorted((name, b, s, h, c) for name in ("dout", "out") for (b, s, h) in rows for c in range(p.D // 8))
    assert sorted(p.reads) == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("B, S, H, pad_head, pad_row", [(1, 1, 1, 0, 0), (2, 5, 3, 8, 16), (1, 11, 2, 0, 8)])
def test_delta_rows(dtype, D, B, S, H, pad_head, pad_row):
    """Band pass rows: delta = rowsum(dO * O) for every row, each chunk read once and aligned, each row stored once
    (row counts that leave a warp partly past the end: B * S * H = 1, 30, 22)."""
    gen = torch.Generator().manual_seed(D + S)
    dout, out = (_loadable(B, S, H, D, dtype, gen, pad_head, pad_row) for _ in range(2))
    p = _run(_Pass(dout, out, B, S, H))
    torch.testing.assert_close(p.delta.double(), _rowsum(dout, out), rtol=1e-6, atol=1e-5)
    assert sorted(p.stores) == sorted((b, s, h) for b in range(B) for s in range(S) for h in range(H))
    _assert_reads_once(p, [(b, s, h) for b in range(B) for s in range(S) for h in range(H)])


def test_global_rows_with_query_index_and_lse_split():
    """Longformer's global rows (kQueryIndex, lse_split = C): rows (b * C + c, g, h) read token query_index[b, g] of
    batch row b; a token outside [0, S) gives delta 0 and reads nothing; every split's lse_in row is the merged one."""
    Bx, C, G, H, S, D = 2, 3, 4, 2, 9, 64
    gen = torch.Generator().manual_seed(0)
    dout, out = (_loadable(Bx, S, H, D, torch.float16, gen, 8) for _ in range(2))
    query_index = torch.tensor([[0, 8, -1, 3], [9, 2, 2, 5]])  # -1 and 9: outside the sequence
    lse_merged = torch.randn(Bx, H, G, generator=gen)
    p = _run(_Pass(dout, out, Bx * C, G, H, query_index=query_index, query_split=C, lse_split=C,
                   lse_merged=lse_merged))
    sums = _rowsum(dout, out)  # (Bx, H, S)
    for bc in range(Bx * C):
        for g in range(G):
            token = int(query_index[bc // C, g])
            want = sums[bc // C, :, token] if 0 <= token < S else torch.zeros(H, dtype=torch.float64)
            torch.testing.assert_close(p.delta[bc, :, g].double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(p.lse_expanded, lse_merged.repeat_interleave(C, 0))
    real = [(bc // C, int(query_index[bc // C, g]), h) for bc in range(Bx * C) for g in range(G) for h in range(H)
            if 0 <= int(query_index[bc // C, g]) < S]
    want = sorted((name, b, s, h, c) for name in ("dout", "out") for (b, s, h) in real for c in range(D // 8))
    assert sorted(p.reads) == want


def test_dlse_only_where_the_row_has_keys():
    """delta - dlse where lse_in < +inf; a row with lse = +inf (no key: P = 0) keeps rowsum(dO * O), its dlse (NaN
    here) never read into it."""
    B, S, H, D = 1, 6, 2, 32
    gen = torch.Generator().manual_seed(1)
    dout, out = (_loadable(B, S, H, D, torch.float16, gen) for _ in range(2))
    lse_in = torch.randn(B, H, S, generator=gen)
    lse_in[0, 1, 2] = float("inf")
    dlse = torch.randn(B, H, S, generator=gen)
    dlse[0, 1, 2] = float("nan")
    p = _run(_Pass(dout, out, B, S, H, dlse=dlse, lse_in=lse_in))
    want = _rowsum(dout, out) - torch.where(lse_in < float("inf"), dlse, 0.0).double()
    torch.testing.assert_close(p.delta.double(), want, rtol=1e-6, atol=1e-5)


def test_fused_launch_splits_warps_between_the_passes():
    """longformer_bwd_delta_kernel: the first delta_warps(band rows) warps are the band pass's, the rest the global
    rows' from their own warp 0, so a band pass whose rows end inside a warp leaves no global row uncovered."""
    gen = torch.Generator().manual_seed(2)
    B, S, H, D, C, G = 1, 7, 3, 32, 2, 3  # 21 band rows: the band's last warp holds 1 row
    dout, out = (_loadable(B, S, H, D, torch.float16, gen) for _ in range(2))
    band = _Pass(dout, out, B, S, H)
    rows = _Pass(dout, out, B * C, G, H, query_index=torch.tensor([[4, 0, 6]]), query_split=C)
    band_warps, rows_warps = _delta_warps(B * S * H), _delta_warps(B * C * G * H)
    for w in range(-(-(band_warps + rows_warps) // WARPS_PER_CTA) * WARPS_PER_CTA):
        if w < band_warps:
            _warp(band, w)
        else:
            _warp(rows, w - band_warps)
    assert len(band.stores) == B * S * H and len(set(band.stores)) == B * S * H
    assert len(rows.stores) == B * C * G * H and len(set(rows.stores)) == B * C * G * H
    assert not torch.isnan(band.delta).any() and not torch.isnan(rows.delta).any()


def test_the_emulation_can_fail(monkeypatch):
    """A butterfly reaching across rows (xor offsets from 16: the whole warp's sum in every row) fails the check."""
    monkeypatch.setattr(sys.modules[__name__], "BUTTERFLY_FIRST", 16)
    gen = torch.Generator().manual_seed(3)
    dout, out = (_loadable(1, 4, 2, 64, torch.float16, gen) for _ in range(2))
    p = _run(_Pass(dout, out, 1, 4, 2))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(p.delta.double(), _rowsum(dout, out), rtol=1e-6, atol=1e-5)
