"""Triton-specific checks of per-row key ranges (packed variable-length batches, ``notes/ranges_contract.md``).

The backend functions are called directly (``key_ranges`` / ``side_ranges`` keywords) and compared with the fp64
oracle (``tests/reference.py``) in float32, where the interpreter's products are exact fp32; the cross-backend
tests of the public ops are in ``tests/test_ranges.py``. Here: forward and every gradient for packed and for
arbitrary (non-monotone, empty, reversed, out-of-range) ranges, bitwise equality of full ranges with no ranges,
and tile skipping: keys no row may see are filled with NaN, which any visited tile would spread (masked scores
give p = 0, but 0 * NaN = NaN in the P @ V and dO @ V^T products), so finite results prove those tiles were never
loaded. Interpreter-sized (16 x 16 tiles).
"""

from __future__ import annotations

import pytest
import torch

from longattn import _dropout
from tests import reference
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.conftest import needs_triton

pytestmark = needs_triton
NAN = float("nan")


def _tb():
    from longattn.backends import triton_backend

    return triton_backend


def packed_ranges(bounds_per_row: list[list[int]], S: int) -> torch.Tensor:
    """(B, S, 2) int32: row i of batch row b gets ``[c[s], c[s + 1])`` for the segment s of ``c = bounds_per_row[b]``
    holding it (``c`` cumulative, from 0 to S), the flash-attn ``cu_seqlens`` convention."""
    out = torch.zeros(len(bounds_per_row), S, 2, dtype=torch.int32)
    for b, c in enumerate(bounds_per_row):
        for s in range(len(c) - 1):
            out[b, c[s]:c[s + 1], 0], out[b, c[s]:c[s + 1], 1] = c[s], c[s + 1]
    return out.to(DEVICE)


def segment_ranges(row_bounds: list[list[int]], key_bounds: list[list[int]], S: int) -> torch.Tensor:
    """(B, S, 2) int32: rows of segment s (``row_bounds[b]``) get keys ``[key_bounds[b][s], key_bounds[b][s + 1])``
    (e.g. the side keys of each packed sequence)."""
    out = torch.zeros(len(row_bounds), S, 2, dtype=torch.int32)
    for b, (rc, kc) in enumerate(zip(row_bounds, key_bounds)):
        for s in range(len(rc) - 1):
            out[b, rc[s]:rc[s + 1], 0], out[b, rc[s]:rc[s + 1], 1] = kc[s], kc[s + 1]
    return out.to(DEVICE)


def arbitrary_ranges(B: int, R: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, R, 2) int32 ranges with any values: reversed, empty, negative, beyond n, huge."""
    r = torch.randint(-8, n + 8, (B, R, 2), generator=gen, dtype=torch.int32)
    r[:, ::7, 1] = 2**31 - 1
    r[:, 3::11, 0] = -(2**31)
    return r.contiguous().to(DEVICE)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def _band_case(B, S, H, H_kv, D, G, window, *, bias=False, masks=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    left, right = window
    c = dict(q=_randn(gen, B, S, H, D, dtype=dtype), k=_randn(gen, B, S, H_kv, D, dtype=dtype),
             v=_randn(gen, B, S, H_kv, D, dtype=dtype), side_k=_randn(gen, B, G, H_kv, D, dtype=dtype),
             side_v=_randn(gen, B, G, H_kv, D, dtype=dtype), band_key_mask=None, side_mask=None, query_block=None,
             band_bias=None, side_bias=None)
    if masks:
        c["band_key_mask"] = (torch.rand(B, S, generator=gen) > 0.2).to(DEVICE)
        c["side_mask"] = (torch.rand(B, G, generator=gen) > 0.2).to(DEVICE) if G else None
    if bias:
        c["band_bias"] = _randn(gen, H, left + right + 1, dtype=dtype)
        if G:
            c["side_bias"] = _randn(gen, H, 2 * G + 1, dtype=dtype)
            c["query_block"] = torch.randint(-1, G, (B, S), generator=gen, dtype=torch.int32).to(DEVICE)
    return c


_DIFF = ("q", "k", "v", "side_k", "side_v", "band_bias", "side_bias")
_ARGS = ("q", "k", "v", "side_k", "side_v", "band_key_mask", "side_mask", "query_block", "band_bias", "side_bias")


def run_band(c, window, scale, ranges, drop=None):
    """(out, lse, grads by _DIFF name) from the Triton backend; ``ranges``: (key_ranges, side_ranges) keywords."""
    tb = _tb()
    kw = {n: r for n, r in zip(("key_ranges", "side_ranges"), ranges) if r is not None}
    drop = drop or {}
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, scale, **drop, **kw)
    dout = _randn(torch.Generator().manual_seed(7), *out.shape, dtype=out.dtype)
    got = tb.band_side_backward(dout, c["q"], c["k"], c["v"], c["side_k"], c["side_v"], out, lse,
                                *(c[n] for n in _ARGS[5:]), *window, scale, **drop, **kw)
    return out, lse, dout, dict(zip(_DIFF, got))


def oracle_band(c, window, scale, ranges, dout, keep=None, dropout_p=0.0):
    """fp64 (out, grads by name) of the oracle."""
    leaves = {n: c[n].detach().double().requires_grad_(True) for n in _DIFF if c[n] is not None}
    args = {n: leaves.get(n, c[n]) for n in _ARGS}
    out = reference.band_side_attention(
        args["q"], args["k"], args["v"], args["side_k"], args["side_v"], window, band_key_mask=args["band_key_mask"],
        side_mask=args["side_mask"], query_block=args["query_block"], band_bias=args["band_bias"],
        side_bias=args["side_bias"], scale=scale, key_ranges=ranges[0], side_ranges=ranges[1], keep=keep,
        dropout_p=dropout_p)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.double(), allow_unused=True)
    return out, {n: torch.zeros_like(x) if g is None else g for (n, x), g in zip(leaves.items(), grads)}


def assert_close(name, got, want, atol=5e-5):
    if want.numel() == 0:
        assert got.numel() == 0, name
        return
    err = (got.double() - want.double()).abs().max().item()
    assert err <= atol * max(1.0, want.abs().max().item()), f"{name}: max error {err:.3e}"


def check_band(c, window, scale, ranges, drop=None, atol=5e-5):
    out, lse, dout, got = run_band(c, window, scale, ranges, drop)
    keep = None
    if drop:
        B, S, H, _ = c["q"].shape
        keep = _dropout.dense_keep_mask(drop["rng"], drop["dropout_p"], B, H, S, c["side_k"].shape[1],
                                        device=DEVICE)
    ref, ref_grads = oracle_band(c, window, scale, ranges, dout, keep, drop["dropout_p"] if drop else 0.0)
    assert_close("out", out, ref, atol)
    for name, want in ref_grads.items():
        assert got[name].shape == c[name].shape and got[name].dtype == c[name].dtype, name
        assert_close(name, got[name], want, atol)
    return out, lse, got


# (B, S, H, H_kv, D, G, window, options, ranges). Ranges: ("packed", cu_seqlens per batch row[, side bounds]) or
# "arbitrary". Sequence lengths include 1, shorter than the window and not multiples of the 16-row tiles.
CASES = {
    "local-packed": (1, 70, 2, 2, 16, 0, (9, 6), dict(bias=True), ("packed", [[0, 1, 6, 36, 70]])),
    "local-packed-gqa-interior": (2, 75, 2, 1, 16, 0, (40, 10), dict(bias=True),
                                  ("packed", [[0, 33, 75], [0, 5, 6, 60, 75]])),
    "tglobal-packed": (2, 60, 2, 2, 16, 12, (5, 4), dict(bias=True, masks=True),
                       ("packed", [[0, 1, 20, 60], [0, 30, 60]], [[0, 1, 4, 12], [0, 5, 12]])),
    "many-side-tiles-packed": (1, 64, 2, 2, 16, 40, (3, 3), dict(bias=True),
                               ("packed", [[0, 17, 40, 64]], [[0, 9, 30, 40]])),
    "arbitrary": (2, 45, 2, 2, 16, 20, (6, 9), dict(bias=True, masks=True), "arbitrary"),
    "arbitrary-gqa-wide": (1, 64, 2, 1, 16, 18, (33, 20), dict(bias=True), "arbitrary"),
}


def _ranges(spec, B, S, G, seed=3):
    if spec == "arbitrary":
        gen = torch.Generator().manual_seed(seed)
        return arbitrary_ranges(B, S, S, gen), arbitrary_ranges(B, S, G, gen) if G else None
    kr = packed_ranges(spec[1], S)
    return kr, (segment_ranges(spec[1], spec[2], S) if len(spec) > 2 else None)


@pytest.mark.parametrize("name", CASES)
def test_band_side_ranges_match_oracle(name):
    B, S, H, H_kv, D, G, window, opts, spec = CASES[name]
    c = _band_case(B, S, H, H_kv, D, G, window, **opts)
    check_band(c, window, D**-0.5, _ranges(spec, B, S, G))


def test_band_side_ranges_key_only_and_side_only():
    c = _band_case(1, 50, 2, 2, 16, 10, (7, 7), bias=True)
    kr, sr = _ranges(("packed", [[0, 13, 50]], [[0, 4, 10]]), 1, 50, 10)
    check_band(c, (7, 7), 0.3, (kr, None))
    check_band(c, (7, 7), 0.3, (None, sr))


def test_band_side_ranges_with_dropout():
    c = _band_case(1, 48, 2, 2, 16, 8, (6, 5), bias=True)
    ranges = _ranges(("packed", [[0, 7, 30, 48]], [[0, 2, 5, 8]]), 1, 48, 8)
    check_band(c, (6, 5), 0.25, ranges, drop=dict(dropout_p=0.3, rng=torch.tensor([1234, 8], dtype=torch.int64)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_full_ranges_bitwise_equal_no_ranges(dtype):
    # [0, S) / [0, G) for every row (and wider ones, clamped) must give exactly today's results.
    B, S, G, window = 1, 40, 6, (20, 5)
    c = _band_case(B, S, 2, 2, 16, G, window, bias=True, masks=True, dtype=dtype)
    kr = torch.tensor([0, S], dtype=torch.int32).expand(B, S, 2).contiguous().to(DEVICE)
    sr = torch.tensor([-5, G + 100], dtype=torch.int32).expand(B, S, 2).contiguous().to(DEVICE)
    base = run_band(c, window, 0.3, (None, None))
    ranged = run_band(c, window, 0.3, (kr, sr))
    assert torch.equal(base[0], ranged[0]) and torch.equal(base[1], ranged[1])
    for name in _DIFF:
        assert torch.equal(base[3][name], ranged[3][name]), name


def test_rows_without_keys_give_zero_and_inf():
    # Rows 16..31 (a whole query tile) and row 5 see nothing: out = 0, lse = +inf, no gradient through them.
    B, S, G, window = 1, 48, 4, (8, 8)
    c = _band_case(B, S, 2, 2, 16, G, window, bias=True)
    kr = packed_ranges([[0, 16, 32, 48]], S)
    sr = segment_ranges([[0, 16, 32, 48]], [[0, 2, 2, 4]], S)
    kr[0, 16:32] = torch.tensor([10, 10], dtype=torch.int32)  # empty
    kr[0, 5] = torch.tensor([9, 3], dtype=torch.int32)  # reversed
    sr[0, 5] = torch.tensor([3, 3], dtype=torch.int32)
    out, lse, got = check_band(c, window, 0.3, (kr, sr))
    for rows in (slice(16, 32), slice(5, 6)):
        assert torch.equal(out[0, rows], torch.zeros_like(out[0, rows]))
        assert torch.isinf(lse[0, :, rows]).all() and (lse[0, :, rows] > 0).all()
        assert torch.equal(got["q"][0, rows], torch.zeros_like(got["q"][0, rows]))


def test_band_and_side_tiles_outside_the_ranges_are_never_loaded():
    # Key window (0, 20): key tiles start at multiples of 16. Band keys [32, 48) and side keys [16, 32) are seen
    # by no row; without skipping, query tiles 0..2 would visit band tile [32, 48) (their windows reach it) and
    # every query tile every side tile.
    B, S, G, window = 1, 64, 48, (0, 20)
    c = _band_case(B, S, 2, 2, 16, G, window, bias=True)
    rows = [[0, 32, 48, 64]]  # rows 32..47 see nothing (a reversed range)
    kr = segment_ranges(rows, [[0, 32, 0, 0]], S)
    kr[0, 48:] = torch.tensor([48, 64], dtype=torch.int32)
    sr = segment_ranges(rows, [[0, 16, 0, 0]], S)
    sr[0, 48:] = torch.tensor([32, 48], dtype=torch.int32)
    clean = {n: (x.clone() if torch.is_tensor(x) else x) for n, x in c.items()}
    for n, sl in (("k", slice(32, 48)), ("v", slice(32, 48)), ("side_k", slice(16, 32)), ("side_v", slice(16, 32))):
        c[n][:, sl] = NAN
        clean[n][:, sl] = 0.0
    out, lse, dout, got = run_band(c, window, 0.3, (kr, sr))
    ref, ref_grads = oracle_band(clean, window, 0.3, (kr, sr), dout)
    assert_close("out", out, ref)
    for name, want in ref_grads.items():  # the never-seen keys get exactly zero gradients
        assert_close(name, got[name], want)
    assert torch.equal(got["k"][:, 32:48], torch.zeros_like(got["k"][:, 32:48]))
    assert torch.equal(got["side_v"][:, 16:32], torch.zeros_like(got["side_v"][:, 16:32]))


# --------------------------------------------------------------------------------------------------------
# Longformer: the band pass with global tokens read in place (side key g = slot g), and the global rows
# --------------------------------------------------------------------------------------------------------


def _slots(global_mask, G):
    from longattn.backends._longformer import global_slots

    return global_slots(global_mask, None, G)


def test_longformer_band_pass_ranges_match_oracle():
    tb = _tb()
    B, S, H, D, window = 1, 64, 2, 16, (6, 6)
    cu = [0, 9, 40, 64]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (_randn(gen, B, S, H, D) for _ in range(3))
    global_mask = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    global_mask[0, [0, 12, 39, 41, 63]] = True
    G = 6  # one unused slot
    band_rows, pos, used = _slots(global_mask, G)
    slot_bounds = [0, 1, 3, 5]  # slots of each sequence's globals (sequence order)
    kr = packed_ranges([cu], S)
    sr = segment_ranges([cu], [slot_bounds], S)
    dout = _randn(gen, B, S, H, D)
    out, lse = tb.longformer_band_forward(q, k, v, pos, used, band_rows, None, *window, 0.3, key_ranges=kr,
                                          side_ranges=sr)
    dq, dk, dv = tb.longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, *window, 0.3,
                                             key_ranges=kr, side_ranges=sr)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    index = pos[:, :, None, None].expand(B, G, H, D)
    ref = reference.band_side_attention(
        *leaves, torch.gather(leaves[1], 1, index), torch.gather(leaves[2], 1, index), window,
        band_key_mask=band_rows, side_mask=used, scale=0.3, key_ranges=kr, side_ranges=sr)
    rows = band_rows[:, :, None, None]  # global rows' band output is overwritten later: no gradient from them
    assert_close("out", out[rows.expand_as(out)], ref[rows.expand_as(ref)])
    ref_grads = torch.autograd.grad(ref, leaves, dout.double() * rows)
    for name, g, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_close(name, g, want)


def test_global_rows_ranges_match_oracle_and_skip_unseen_keys():
    # 40 slots (3 slot tiles): slots 0..15 see keys [0, 32), 16..31 see [48, 64), 32..39 nothing; keys [32, 48)
    # are seen by no slot (NaN: the split and dK/dV kernels must skip their tiles). Slot 7 is unused.
    tb = _tb()
    B, S, H, D, G = 1, 64, 2, 16, 40
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_randn(gen, B, S, H, D) for _ in range(3))
    pos = torch.randperm(S, generator=gen)[:G][None].to(DEVICE)
    used = torch.ones(B, G, dtype=torch.bool, device=DEVICE)
    used[0, 7] = False
    kr = segment_ranges([[0, 16, 32, 40]], [[0, 32, 0, 0]], G)
    kr[0, 16:32] = torch.tensor([48, 64], dtype=torch.int32)
    kr[0, 7] = torch.tensor([0, 32], dtype=torch.int32)
    key_mask = (torch.rand(B, S, generator=gen) > 0.1).to(DEVICE)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, 32:48], v_nan[:, 32:48] = NAN, NAN
    k[:, 32:48], v[:, 32:48] = 0.0, 0.0
    out = torch.zeros(B, S, H, D, device=DEVICE)
    glse = tb.global_rows_forward(q, k_nan, v_nan, pos, used, key_mask, 0.3, out, key_ranges=kr)
    dout = _randn(gen, B, S, H, D)
    dq, dk, dv = tb.global_rows_backward(dout, q, k_nan, v_nan, out, glse, pos, used, key_mask, 0.3, None, None, None,
                                         key_ranges=kr)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    index = pos[:, :, None, None].expand(B, G, H, D)
    ref_rows = reference.global_rows_attention(torch.gather(leaves[0], 1, index), leaves[1], leaves[2],
                                               key_mask=key_mask, key_ranges=kr, scale=0.3)
    ref_rows = ref_rows * used[:, :, None, None]
    got_rows = torch.gather(out, 1, index) * used[:, :, None, None]
    assert_close("out", got_rows, ref_rows)
    assert torch.isinf(glse[0, :, 32:]).all()
    ref_grads = torch.autograd.grad(ref_rows, leaves, torch.gather(dout.double(), 1, index))
    for name, g, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_close(name, g, want)
    assert torch.equal(dk[:, 32:48], torch.zeros_like(dk[:, 32:48]))


def test_range_arguments_are_checked():
    tb = _tb()
    c = _band_case(1, 20, 1, 1, 16, 0, (2, 2))
    bad = torch.zeros(1, 20, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="key_ranges"):
        tb.band_side_forward(*(c[n] for n in _ARGS), 2, 2, 0.3, key_ranges=bad)
    with pytest.raises(ValueError, match="side_ranges"):
        tb.band_side_forward(*(c[n] for n in _ARGS), 2, 2, 0.3, side_ranges=bad[:, :19].int())


def test_unsupported_reasons_accepts_ranges():
    tb = _tb()
    assert tb.unsupported_reasons(torch.device(DEVICE), torch.float32, 16, "band_side", features=("ranges",)) == []
    assert tb.unsupported_reasons(torch.device(DEVICE), torch.float32, 16, "band_side", features=("bogus",))


# --------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: the kernels with ranges on, compiled for sm_90 in bf16
# --------------------------------------------------------------------------------------------------------


def compile_ranges_for_sm90(dropouts=(False, True), rows_baseline=True):
    """Compile the attention kernels with ranges on (GPU tiles, bf16, every mask and bias on, with and without
    dropout; the Longformer band pass and the global rows, these also without ranges) for sm_90 and print their
    registers / spills (``tests.test_triton_backend.ptxas_usage``). Without ranges the band kernels are those of
    ``test_kernels_compile_for_sm90_bf16`` (the flags default off). ``dropouts``: the HAS_DROPOUT values built;
    ``rows_baseline``: also the global rows without ranges."""
    from longattn.triton_kernels import _common, band_side, global_rows

    from tests.test_triton_backend import compile_sm90

    types = {**dict.fromkeys(["KRange", "SRange", "Ranges", "TBounds"], "*i32"), "Pos": "*i64", "Used": "*u8",
             **dict.fromkeys(["GLse", "PartO", "PartL"], "*fp32")}

    def build(fn, constexprs, warps):
        compile_sm90(fn, constexprs, warps, types)

    on = dict(HAS_KRANGES=True, HAS_SRANGES=True)
    for D in (64, 128):
        bm, bn, warps = _common.attention_tiles(D)
        tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, DOT_PREC="tf32")
        for dropout in dropouts:
            flags = dict(HAS_KMASK=True, HAS_SMASK=True, HAS_BBIAS=True, HAS_SBIAS=True, HAS_DROPOUT=dropout, **tiles)
            lf = dict(flags, HAS_BBIAS=False, HAS_SBIAS=False, SIDE_INDEX=True)  # Longformer's band pass
            for backward in (False, True):
                build(band_side._rows_kernel, dict(BACKWARD=backward, **flags, **on), warps)
                build(band_side._rows_kernel, dict(BACKWARD=backward, **lf, **on, **(
                    {} if backward else dict(HAS_QMASK=True, KMASK_ROWS=True))), warps)
            for side in (False, True):
                build(band_side._keys_kernel, dict(SIDE=side, **flags, HAS_RANGES=True), warps)
            build(band_side._keys_kernel, dict(SIDE=True, **lf, HAS_RANGES=True), warps)
            for ranges in (False, True) if rows_baseline else (True,):  # not in test_kernels_compile_for_sm90
                rows = dict(HAS_KMASK=True, HAS_DROPOUT=dropout, HAS_RANGES=ranges, **tiles)
                for backward in (False, True):
                    build(global_rows._split_kernel, dict(BACKWARD=backward, **rows), warps)
                build(global_rows._keys_kernel, dict(ADD_DK=True, ADD_DV=True, **rows), warps)
    build(_common._tile_bounds_kernel, dict(HAS_K=True, HAS_S=True, HAS_USED=True, BLOCK_M=64), 4)


def compile_ranges_for_sm90_without_dropout():
    compile_ranges_for_sm90(dropouts=(False,), rows_baseline=False)


def test_range_kernels_compile_for_sm90_bf16():
    # The kernels with ranges on generate code for sm_90 (a subset, to keep CI short; run compile_ranges_for_sm90
    # for every variant and the figures).
    from tests.conftest import run_sm90_compile

    run_sm90_compile("tests.test_triton_ranges:compile_ranges_for_sm90_without_dropout")
