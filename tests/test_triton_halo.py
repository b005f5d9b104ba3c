"""Triton-specific checks of halo keys and the lse gradient (``notes/halo_contract.md``).

The backend functions are called directly (``halo_k`` / ``halo_v`` / ``halo_mask`` / ``halo_left`` and ``dlse``
keywords) and compared with the fp64 oracle on the extended sequence (``tests.reference.band_side_with_halo``: k, v
with the halo rows concatenated, q padded with zero rows, the local rows kept), within the tolerance rule; the
rule's baseline is the torch backend running today's op (no halo) on that extended sequence, the same
computation. Covered: halos on both sides, one side, none, wider than S; halo_mask and band_key_mask each given or
None; band bias (LongT5 local); side keys with side bias and query blocks (TGlobal); grouped K/V; strided halos;
every gradient including dhalo_k / dhalo_v and the bias tables'. Halo rows no query can reach hold NaN in one test
(a loaded row would spread it), and the halo kernels' sm_90 code generation is checked. Interpreter-sized
(16 x 16 tiles, S <= 80).
"""

from __future__ import annotations

import pytest
import torch

from longattn import _dropout
from tests import reference
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.conftest import needs_triton
from tests.tolerance import assert_within_rule

pytestmark = needs_triton
NAN = float("nan")

_ARGS = ("q", "k", "v", "side_k", "side_v", "band_key_mask", "side_mask", "query_block", "band_bias", "side_bias")
_GRADS = ("q", "k", "v", "side_k", "side_v", "band_bias", "side_bias", "halo_k", "halo_v")


def _backend(name):
    from longattn.backends import torch_backend, triton_backend

    return {"triton": triton_backend, "torch": torch_backend}[name]


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def halo_case(B, S, H, H_kv, D, G, window, HL, HR, *, bias=False, kmask=False, hmask=False, side=False, seed=0,
              dtype=torch.float32):
    """Inputs of one call by name (``_ARGS`` plus halo_k, halo_v, halo_mask, halo_left). ``side``: TGlobal's side
    keys (side mask, side bias, query blocks with -1 padding rows)."""
    gen = torch.Generator().manual_seed(seed)
    left, right = window
    n = HL + HR
    c = dict(q=_randn(gen, B, S, H, D, dtype=dtype), k=_randn(gen, B, S, H_kv, D, dtype=dtype),
             v=_randn(gen, B, S, H_kv, D, dtype=dtype), side_k=_randn(gen, B, G, H_kv, D, dtype=dtype),
             side_v=_randn(gen, B, G, H_kv, D, dtype=dtype), halo_k=_randn(gen, B, n, H_kv, D, dtype=dtype),
             halo_v=_randn(gen, B, n, H_kv, D, dtype=dtype), halo_left=HL, band_key_mask=None, side_mask=None,
             query_block=None, band_bias=None, side_bias=None, halo_mask=None)
    if kmask:
        c["band_key_mask"] = (torch.rand(B, S, generator=gen) > 0.25).to(DEVICE)
    if hmask:
        c["halo_mask"] = (torch.rand(B, n, generator=gen) > 0.25).to(DEVICE)
    if bias:
        c["band_bias"] = _randn(gen, H, left + right + 1, dtype=dtype)
    if side:
        c["side_mask"] = (torch.rand(B, G, generator=gen) > 0.2).to(DEVICE)
        c["side_bias"] = _randn(gen, H, 2 * G + 1, dtype=dtype)
        c["query_block"] = torch.randint(-1, G, (B, S), generator=gen, dtype=torch.int32).to(DEVICE)
    return c


def _halo_kw(c):
    return dict(halo_k=c["halo_k"], halo_v=c["halo_v"], halo_mask=c["halo_mask"], halo_left=c["halo_left"])


def run_triton(c, window, scale, dout, dlse=None, **extra):
    """(out, lse, grads by ``_GRADS`` name) of the Triton backend with the halo keywords."""
    tb = _backend("triton")
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, scale, **_halo_kw(c), **extra)
    got = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), out, lse, *(c[n] for n in _ARGS[5:]), *window,
                                scale, **_halo_kw(c), dlse=dlse, **extra)
    assert len(got) == 9
    return out, lse, dict(zip(_GRADS, got))


def _extended(c):
    """The inputs of today's op on the extended sequence (keys [halo left | k | halo right], zero query rows for the
    halo, -1 query blocks there) and the slice of its rows that are the local ones."""
    B, S = c["q"].shape[:2]
    hl, n = c["halo_left"], c["halo_k"].shape[1]

    def ext(x, halo):
        return torch.cat([halo[:, :hl], x, halo[:, hl:]], 1)

    def rows(x, fill):
        return torch.cat([x.new_full((B, hl, *x.shape[2:]), fill), x, x.new_full((B, n - hl, *x.shape[2:]), fill)], 1)

    e = dict(c, q=rows(c["q"], 0), k=ext(c["k"], c["halo_k"]), v=ext(c["v"], c["halo_v"]))
    if c["band_key_mask"] is not None or c["halo_mask"] is not None:
        ones = torch.ones(B, S + n, dtype=torch.bool, device=c["q"].device)
        e["band_key_mask"] = ext(ones[:, :S] if c["band_key_mask"] is None else c["band_key_mask"],
                                 ones[:, :n] if c["halo_mask"] is None else c["halo_mask"])
    if c["query_block"] is not None:
        e["query_block"] = rows(c["query_block"], -1)
    return e, slice(hl, hl + S)


def run_torch_extended(c, window, scale, dout, dlse=None):
    """The rule's baseline: the torch backend's op without a halo on the extended sequence, in c's dtype, cut back to
    the local rows; the halo gradients are the extended k/v gradients' halo rows."""
    tb = _backend("torch")
    e, rows = _extended(c)
    hl, S = c["halo_left"], c["q"].shape[1]
    out, lse = tb.band_side_forward(*(e[n] for n in _ARGS), *window, scale)
    pad = torch.zeros_like(out)
    pad[:, rows] = dout
    kw = {}
    if dlse is not None:
        kw["dlse"] = torch.zeros_like(lse)
        kw["dlse"][:, :, rows] = dlse
    got = dict(zip(_GRADS, tb.band_side_backward(pad, *(e[n] for n in _ARGS[:5]), out, lse, *(e[n] for n in _ARGS[5:]),
                                                 *window, scale, **kw)))
    dk, dv = got["k"], got["v"]
    got.update(q=got["q"][:, rows], k=dk[:, rows], v=dv[:, rows], halo_k=torch.cat([dk[:, :hl], dk[:, hl + S:]], 1),
               halo_v=torch.cat([dv[:, :hl], dv[:, hl + S:]], 1))
    return out[:, rows], lse[:, :, rows], got


def run_oracle(c, window, scale, dout, dlse=None, keep=None, dropout_p=0.0):
    """fp64 (out, lse, grads by name) of the oracle on the extended sequence; the loss is ``<out, dout>`` plus
    ``<lse, dlse>`` over the rows with a finite lse."""
    leaves = {n: c[n].detach().double().requires_grad_(True) for n in _GRADS if c[n] is not None}
    a = {**c, **leaves}
    out, lse = reference.band_side_with_halo(
        a["q"], a["k"], a["v"], a["halo_k"], a["halo_v"], a["halo_left"], halo_mask=a["halo_mask"],
        band_key_mask=a["band_key_mask"], query_block=a["query_block"], side_k=a["side_k"], side_v=a["side_v"],
        window=window, side_mask=a["side_mask"], band_bias=a["band_bias"], side_bias=a["side_bias"], scale=scale,
        keep=keep, dropout_p=dropout_p)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        finite = torch.isfinite(lse)
        loss = loss + torch.where(finite, lse, 0.0).mul(torch.where(finite, dlse.double(), 0.0)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out, lse, {n: torch.zeros_like(x) if g is None else g for (n, x), g in zip(leaves.items(), grads)}


def check_halo(c, window, scale=0.3, dlse=False, seed=7):
    """Forward, lse and every gradient of the Triton backend within the tolerance rule; returns (out, lse, grads)."""
    gen = torch.Generator().manual_seed(seed)
    B, S, H, D = c["q"].shape
    dout = _randn(gen, B, S, H, D, dtype=c["q"].dtype)
    dl = _randn(gen, B, H, S) if dlse else None
    # dlse with any strides (autograd hands expanded ones)
    got = run_triton(c, window, scale, dout, None if dl is None else dl.mT.contiguous().mT)
    assert_halo_within_rule(c, got, run_torch_extended(c, window, scale, dout, dl),
                            run_oracle(c, window, scale, dout, dl))
    return got


def assert_halo_within_rule(c, got, baseline, oracle):
    """(out, lse, grads by name) of the Triton backend vs the torch baseline and the fp64 oracle (the rule)."""
    out, lse, got = got
    base_out, base_lse, base = baseline
    ref_out, ref_lse, ref = oracle
    assert_within_rule("out", out, base_out, ref_out)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_within_rule("lse", lse[finite], base_lse[finite], ref_lse[finite])
    for name, want in ref.items():
        assert got[name].shape == c[name].shape and got[name].dtype == c[name].dtype, name
        assert got[name].is_contiguous(), name
        assert_within_rule(f"d{name}", got[name], base[name], want, grad=True)


# (B, S, H, H_kv, D, G, window, HL, HR, options). 16 x 16 interpreter tiles: a band has mask-free interior tiles
# only when W = left + right + 1 >= 31. Query tiles whose band stays inside [0, S) run the kernel's plain loop, the
# others its halo loop: S = 64, 70, 80 cases have both.
CASES = {
    "both-sides-interior-masks-bias": (2, 40, 2, 2, 16, 0, (20, 12), 20, 12, dict(bias=True, kmask=True, hmask=True)),
    "left-only": (1, 70, 2, 2, 16, 0, (9, 5), 7, 0, dict(bias=True, hmask=True)),
    "right-only": (1, 33, 2, 2, 16, 0, (3, 13), 0, 11, dict(bias=True, kmask=True)),
    "no-halo-rows": (1, 30, 2, 2, 16, 0, (5, 4), 0, 0, dict(bias=True, kmask=True)),
    "halos-wider-than-S": (1, 20, 2, 2, 16, 0, (45, 30), 40, 35, dict(bias=True, hmask=True)),
    "tglobal-side-keys": (2, 64, 2, 2, 16, 5, (6, 6), 6, 6, dict(bias=True, kmask=True, hmask=True, side=True)),
    "long-interior-tiles": (1, 80, 2, 2, 16, 0, (17, 15), 17, 15, dict(bias=True, kmask=True, hmask=True)),
    "gqa-side-keys": (1, 48, 4, 2, 16, 20, (17, 15), 17, 9, dict(bias=True, hmask=True, side=True)),
    "gqa-D32": (1, 45, 4, 1, 32, 0, (8, 23), 5, 23, dict(kmask=True)),
}


@pytest.mark.parametrize("name", CASES)
def test_band_side_halo_matches_oracle(name):
    B, S, H, H_kv, D, G, window, HL, HR, opts = CASES[name]
    check_halo(halo_case(B, S, H, H_kv, D, G, window, HL, HR, **opts), window)


def test_band_side_halo_fp16():
    window = (18, 14)
    check_halo(halo_case(1, 40, 2, 2, 16, 4, window, 18, 14, bias=True, hmask=True, side=True, dtype=torch.float16),
               window)


def test_strided_halo_buffers():
    # halo_k / halo_v: any strides but the last (views of a (B, H_kv, n, D) buffer here), read in place.
    window = (10, 10)
    c = halo_case(1, 34, 2, 2, 16, 0, window, 10, 10, bias=True, hmask=True)
    c["halo_k"] = c["halo_k"].transpose(1, 2).contiguous().transpose(1, 2)
    c["halo_v"] = c["halo_v"][:, :, :, :].clone().transpose(1, 2).contiguous().transpose(1, 2)
    assert not c["halo_k"].is_contiguous()
    check_halo(c, window)


def test_empty_halo_is_bitwise_today():
    # HL = HR = 0 runs the halo kernels (pointer-selected loads, halo masks) over exactly today's keys.
    window = (20, 12)
    c = halo_case(1, 40, 2, 2, 16, 3, window, 0, 0, bias=True, kmask=True, side=True)
    tb = _backend("triton")
    dout = _randn(torch.Generator().manual_seed(3), *c["q"].shape)
    out, lse, got = run_triton(c, window, 0.3, dout)
    base_out, base_lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, 0.3)
    base = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), base_out, base_lse, *(c[n] for n in _ARGS[5:]),
                                 *window, 0.3)
    assert torch.equal(out, base_out) and torch.equal(lse, base_lse)
    for name, want in zip(_GRADS, base):
        assert torch.equal(got[name], want), name
    assert got["halo_k"].shape == (1, 0, 2, 16)


def test_unreachable_halo_rows_are_never_loaded():
    # Window (5, 3), halos of 21 and 19 rows: left rows [0, 16) and right rows [21 + 3, 40) are beyond every query's
    # reach. They hold NaN, which any loaded row would spread (a masked score gives p = 0, but 0 * NaN = NaN in the
    # P @ V and dO @ V^T products); their gradients must be exactly zero.
    window, HL, HR = (5, 3), 21, 19
    c = halo_case(1, 35, 2, 2, 16, 0, window, HL, HR, bias=True, hmask=True)
    unreachable = torch.zeros(HL + HR, dtype=torch.bool)
    unreachable[:HL - window[0]] = True
    unreachable[HL + window[1]:] = True
    clean = dict(c)
    for n in ("halo_k", "halo_v"):
        clean[n] = c[n].masked_fill(unreachable[None, :, None, None].to(DEVICE), 0.0)
        c[n] = c[n].masked_fill(unreachable[None, :, None, None].to(DEVICE), NAN)
    dout = _randn(torch.Generator().manual_seed(5), *c["q"].shape)
    out, lse, got = run_triton(c, window, 0.3, dout)
    ref_out, _, ref = run_oracle(clean, window, 0.3, dout)
    base_out, _, base = run_torch_extended(clean, window, 0.3, dout)
    assert_within_rule("out", out, base_out, ref_out)
    for name, want in ref.items():
        assert_within_rule(f"d{name}", got[name], base[name], want, grad=True)
    for n in ("halo_k", "halo_v"):
        assert torch.equal(got[n][:, unreachable], torch.zeros_like(got[n][:, unreachable])), n


# --------------------------------------------------------------------------------------------------------
# the lse gradient (dlse): dS = P * (dP - delta + dlse)
# --------------------------------------------------------------------------------------------------------


def test_dlse_with_halo_side_keys_and_biases():
    window = (9, 7)
    check_halo(halo_case(2, 40, 2, 2, 16, 6, window, 9, 7, bias=True, kmask=True, hmask=True, side=True), window,
               dlse=True)


def test_dlse_gqa_without_halo_rows():
    window = (20, 12)
    check_halo(halo_case(1, 45, 4, 2, 16, 0, window, 0, 0, bias=True), window, dlse=True)


def test_dlse_rows_without_keys_get_no_gradient():
    # Rows 7..10 see no key (band keys 5..12 masked, no side keys): lse = +inf there. Their dlse is NaN, which must
    # not leak (delta - dlse is never formed there).
    window = (2, 2)
    c = halo_case(1, 24, 2, 2, 16, 0, window, 0, 0, kmask=True)
    c["band_key_mask"] = torch.ones_like(c["band_key_mask"])
    c["band_key_mask"][:, 5:13] = False
    tb = _backend("triton")
    gen = torch.Generator().manual_seed(2)
    dout, dlse = _randn(gen, *c["q"].shape), _randn(gen, 1, 2, 24)
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, 0.3)
    assert torch.isinf(lse[:, :, 7:11]).all()
    dlse[:, :, 7:11] = NAN
    got = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), out, lse, *(c[n] for n in _ARGS[5:]), *window, 0.3,
                                dlse=dlse)
    _, _, ref = run_oracle(c, window, 0.3, dout, dlse)
    _, _, base = run_torch_extended(c, window, 0.3, dout, dlse.nan_to_num())
    for name, g in zip(_GRADS[:3], got[:3]):
        assert torch.isfinite(g).all(), name
        assert_within_rule(f"d{name}", g, base[name], ref[name], grad=True)


def test_dlse_with_dropout():
    from longattn.backends import triton_backend as tb

    B, S, H, D, G, window, p = 1, 40, 2, 16, 4, (6, 5), 0.25
    c = halo_case(B, S, H, H, D, G, window, 0, 0, bias=True, side=True)
    rng = torch.tensor([99, 3], dtype=torch.int64)
    gen = torch.Generator().manual_seed(4)
    dout, dlse = _randn(gen, B, S, H, D), _randn(gen, B, H, S)
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, 0.3, p, rng)
    got = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), out, lse, *(c[n] for n in _ARGS[5:]), *window, 0.3,
                                p, rng, dlse=dlse)
    keep = _dropout.dense_keep_mask(rng, p, B, H, S, G, device=DEVICE)
    _, _, ref = run_oracle(c, window, 0.3, dout, dlse, keep=keep, dropout_p=p)
    for name, g in zip(_GRADS[:7], got):
        want = ref.get(name)
        if want is not None:  # fp32 products are exact in the interpreter: the fp32 floor, no torch baseline needed
            err = (g.double() - want).abs().max().item()
            assert err <= 2e-5 * max(1.0, want.abs().max().item()), f"d{name}: {err:.3e}"


def test_dlse_with_key_ranges():
    from longattn.backends import triton_backend as tb

    window = (8, 8)
    c = halo_case(1, 48, 2, 2, 16, 0, window, 0, 0, bias=True)
    kr = torch.zeros(1, 48, 2, dtype=torch.int32)
    kr[0, :20], kr[0, 20:] = torch.tensor([0, 20], dtype=torch.int32), torch.tensor([20, 48], dtype=torch.int32)
    kr = kr.to(DEVICE)
    gen = torch.Generator().manual_seed(8)
    dout, dlse = _randn(gen, 1, 48, 2, 16), _randn(gen, 1, 2, 48)
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, 0.3, key_ranges=kr)
    got = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), out, lse, *(c[n] for n in _ARGS[5:]), *window, 0.3,
                                key_ranges=kr, dlse=dlse)
    leaves = {n: c[n].double().requires_grad_(True) for n in ("q", "k", "v", "band_bias")}
    ref_out, ref_lse = reference.band_side_attention(leaves["q"], leaves["k"], leaves["v"], window=window,
                                                     band_bias=leaves["band_bias"], scale=0.3, key_ranges=kr,
                                                     with_lse=True)
    loss = (ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum()
    ref = torch.autograd.grad(loss, list(leaves.values()))
    for name, g, want in zip(("q", "k", "v", "band_bias"), (got[0], got[1], got[2], got[5]), ref):
        err = (g.double() - want).abs().max().item()
        assert err <= 2e-5 * max(1.0, want.abs().max().item()), f"d{name}: {err:.3e}"


# --------------------------------------------------------------------------------------------------------
# the dropout offset (notes/halo_contract.md section 3) and dropout with a halo
# --------------------------------------------------------------------------------------------------------

_P = 0.3


def _rng():
    return torch.tensor([1234, 8], dtype=torch.int64, device=DEVICE)


def _dropout_kw(p, offset):
    """The dropout keywords as the API passes them: ``dropout_offset`` only when non-zero."""
    return dict(dropout_p=p, rng=_rng(), **({"dropout_offset": offset} if offset else {}))


def halo_keep_mask(c, p, offset):
    """(B, H, n, n + G) keep mask of the oracle's extended problem (n = HL + S + HR rows and band keys, then the G side
    keys), straight from the counter layout: extended row / key e has row / key id ``e - HL + offset``, side key g
    ``SIDE_KEY_BASE + g``."""
    B, S, H, _ = c["q"].shape
    n, G = S + c["halo_k"].shape[1], c["side_k"].shape[1]
    ids = torch.arange(n, dtype=torch.int64, device=DEVICE) - c["halo_left"] + offset
    keys = torch.cat([ids, _dropout.SIDE_KEY_BASE + torch.arange(G, dtype=torch.int64, device=DEVICE)])
    return _dropout.keep_mask(_rng(), p, B, H, ids[:, None], keys[None, :])


# (B, S, H, H_kv, D, G, window, HL, HR, dropout_offset, options): offsets at the halo (the SP shard's), past it, and
# below it (halo keys with negative key ids; the API never passes that, the bits are still the reference's).
DROPOUT_CASES = {
    "tglobal-offset-at-halo": (1, 37, 2, 2, 16, 20, (10, 7), 8, 7, 8, dict(bias=True, kmask=True, hmask=True,
                                                                            side=True)),
    "gqa-offset-past-halo": (2, 30, 4, 2, 16, 0, (9, 20), 5, 18, 36, dict(bias=True, hmask=True)),
    "offset-below-halo": (1, 26, 2, 2, 16, 0, (12, 4), 12, 3, 4, dict(bias=True)),
    "no-offset": (1, 21, 2, 2, 16, 3, (6, 6), 6, 2, 0, dict(kmask=True, side=True)),
}


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_halo_with_dropout_matches_torch_backend(name):
    B, S, H, H_kv, D, G, window, HL, HR, offset, opts = DROPOUT_CASES[name]
    check_halo_dropout(halo_case(B, S, H, H_kv, D, G, window, HL, HR, **opts), window, offset)


def test_halo_with_dropout_fp16():
    window = (11, 9)
    check_halo_dropout(halo_case(1, 35, 2, 2, 16, 4, window, 11, 9, bias=True, hmask=True, side=True,
                                 dtype=torch.float16), window, 44)


def check_halo_dropout(c, window, offset, p=_P, scale=0.3):
    """Dropout with a halo and ``dropout_offset``: the Triton backend vs the torch backend given the same arguments
    (the baseline) and the fp64 oracle on the extended sequence with ``halo_keep_mask``, within the rule."""
    gen = torch.Generator().manual_seed(11)
    dout = _randn(gen, *c["q"].shape, dtype=c["q"].dtype)
    drop = _dropout_kw(p, offset)
    tb = _backend("torch")
    out, lse = tb.band_side_forward(*(c[n] for n in _ARGS), *window, scale, **_halo_kw(c), **drop)
    base = tb.band_side_backward(dout, *(c[n] for n in _ARGS[:5]), out, lse, *(c[n] for n in _ARGS[5:]), *window,
                                 scale, **_halo_kw(c), **drop)
    assert_halo_within_rule(c, run_triton(c, window, scale, dout, **drop), (out, lse, dict(zip(_GRADS, base))),
                            run_oracle(c, window, scale, dout, keep=halo_keep_mask(c, p, offset), dropout_p=p))


def _shard(c, a, b, window):
    """Rows [a, b) of the sequence ``c`` as a sequence-parallel shard: its rows, and its halo cut from the sequence
    as far as the window reaches around them (``halo_mask`` from ``band_key_mask``)."""
    S = c["q"].shape[1]
    hl, hr = min(window[0], a), min(window[1], S - b)

    def cut(x):
        return torch.cat([x[:, a - hl:a], x[:, b:b + hr]], 1)

    def rows(x):
        return None if x is None else x[:, a:b].contiguous()

    return dict(c, q=c["q"][:, a:b], k=c["k"][:, a:b], v=c["v"][:, a:b], band_key_mask=rows(c["band_key_mask"]),
                query_block=rows(c["query_block"]), halo_k=cut(c["k"]), halo_v=cut(c["v"]), halo_left=hl,
                halo_mask=None if c["band_key_mask"] is None else cut(c["band_key_mask"]))


# (a, b, window, side keys): the whole sequence as one shard, the first shard, an interior one whose length is not a
# multiple of 4 (the dK/dV kernel's right halo tiles start before S), the last one with a halo wider than it, and
# halos wider than the shard on both sides. S = 50, B = 2, GQA (H = 2, H_kv = 1); side keys: TGlobal's with
# side_mask, side_bias and random query blocks, G = 18 (so query tiles span more than bias_grad.SIDE_SPAN blocks:
# the dQ kernel's extra side-bias passes run, with their own dropout bits).
SHARDS = {
    "whole": (0, 50, (9, 6), True),
    "first": (0, 17, (9, 6), False),
    "interior-unaligned-end": (12, 31, (9, 6), True),
    "last-halo-wider-than-shard": (44, 50, (9, 6), True),
    "halos-wider-both-sides": (24, 30, (20, 14), False),
}


@pytest.mark.parametrize("name", SHARDS)
def test_shard_with_halo_and_dropout_offset_is_the_whole_sequence(name):
    """The sequence-parallel property: rows [a, b) run as a shard (its halo cut from the sequence, ``dropout_offset =
    a``, the same rng) give the rows [a, b) of the Triton op on the whole sequence: out, lse and every gradient
    (the whole sequence's dK/dV rows of the shard's keys and halo; side-key and bias gradients whole), up to fp32
    summation order."""
    a, b, window, side = SHARDS[name]
    c = halo_case(2, 50, 2, 1, 16, 18 if side else 0, window, 0, 0, bias=True, kmask=True, side=side, seed=3)
    tb = _backend("triton")
    whole = [c[n] for n in _ARGS]
    out, lse = tb.band_side_forward(*whole, *window, 0.3, _P, _rng())
    dout = torch.zeros_like(c["q"])
    dout[:, a:b] = _randn(torch.Generator().manual_seed(5), *c["q"][:, a:b].shape)
    want = dict(zip(_GRADS, tb.band_side_backward(dout, *whole[:5], out, lse, *whole[5:], *window, 0.3, _P, _rng())))
    s = _shard(c, a, b, window)
    got_out, got_lse, got = run_triton(s, window, 0.3, dout[:, a:b], **_dropout_kw(_P, a))

    def close(name, x, y):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")

    close("out", got_out, out[:, a:b])
    close("lse", got_lse, lse[:, :, a:b])
    hl, hr = s["halo_left"], s["halo_k"].shape[1] - s["halo_left"]
    reach = slice(a - hl, b + hr)  # every key rows [a, b) attend
    for n in ("k", "v"):
        close(f"d{n}", got[n], want[n][:, a:b])
        close(f"dhalo_{n}", got[f"halo_{n}"], torch.cat([want[n][:, a - hl:a], want[n][:, b:b + hr]], 1))
        rest = torch.ones(c["q"].shape[1], dtype=torch.bool)
        rest[reach] = False
        assert torch.equal(want[n][:, rest], torch.zeros_like(want[n][:, rest])), n  # the halo held every key
    close("dq", got["q"], want["q"][:, a:b])
    for n in ("side_k", "side_v", "band_bias", "side_bias"):
        close(f"d{n}", got[n], want[n])


def test_dropout_offset_changes_the_bits():
    # Without the offset a shard draws row 0's bits again: it must matter (so the shard test above can fail). Side keys
    # only here: the offset moves the rows' bits of side keys too.
    c = halo_case(1, 24, 2, 2, 16, 4, (5, 5), 5, 5, side=True)
    tb = _backend("triton")
    outs = [tb.band_side_forward(*(c[n] for n in _ARGS), 5, 5, 0.3, **_halo_kw(c), **_dropout_kw(0.5, o))[0]
            for o in (0, 8)]
    assert not torch.equal(outs[0], outs[1])
    c["band_key_mask"] = torch.zeros(1, 24, dtype=torch.bool, device=DEVICE)
    c["halo_mask"] = torch.zeros(1, 10, dtype=torch.bool, device=DEVICE)
    side_only = [tb.band_side_forward(*(c[n] for n in _ARGS), 5, 5, 0.3, **_halo_kw(c), **_dropout_kw(0.5, o))[0]
                 for o in (0, 8)]
    assert not torch.equal(side_only[0], side_only[1])


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_bad_dropout_offsets(backward):
    c = halo_case(1, 20, 2, 2, 16, 0, (3, 3), 3, 3)
    for offset in (-4, 6, 2, 8.0, True, 2**31, "8"):
        with pytest.raises(ValueError, match="dropout_offset"):
            _bad_call(c, backward=backward, dropout_p=0.1, rng=_rng(), dropout_offset=offset, **_halo_kw(c))


# --------------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, before any launch
# --------------------------------------------------------------------------------------------------------


def _bad_call(c, window=(3, 3), backward=False, **kw):
    tb = _backend("triton")
    args = [c[n] for n in _ARGS]
    if backward:
        out = torch.zeros_like(c["q"])
        lse = torch.zeros(c["q"].shape[0], c["q"].shape[2], c["q"].shape[1], device=DEVICE)
        return tb.band_side_backward(out, *args[:5], out, lse, *args[5:], *window, 0.3, **kw)
    return tb.band_side_forward(*args, *window, 0.3, **kw)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_halo_excludes_other_options(backward):
    c = halo_case(1, 20, 2, 2, 16, 0, (3, 3), 3, 3)
    halo = _halo_kw(c)
    kr = torch.zeros(1, 20, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="key_ranges"):
        _bad_call(c, backward=backward, key_ranges=kr, **halo)
    with pytest.raises(ValueError, match="side_ranges"):
        _bad_call(c, backward=backward, side_ranges=kr, **halo)
    from longattn.triton_kernels import band_side

    args = [c[n] for n in _ARGS]
    index = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="side_index"):
        band_side.forward(*args, 3, 3, 0.3, side_index=index, **halo)
    with pytest.raises(ValueError, match="query_mask"):
        band_side.forward(*args, 3, 3, 0.3, query_mask=torch.ones(1, 20, dtype=torch.bool), **halo)
    with pytest.raises(ValueError, match="band_rows_only"):
        band_side.forward(*args, 3, 3, 0.3, band_rows_only=True, **halo)


def test_bad_halo_arguments():
    c = halo_case(1, 20, 2, 2, 16, 0, (3, 3), 3, 3)
    halo = _halo_kw(c)
    cases = [
        ("halo_k", dict(halo, halo_k=c["halo_k"][..., :8])),
        ("halo_k", dict(halo, halo_k=c["halo_k"].half())),
        ("halo_k", dict(halo, halo_k=c["halo_k"][:, :, :1])),
        ("halo_v", dict(halo, halo_v=c["halo_v"][:, :5])),
        ("halo_left", dict(halo, halo_left=7)),
        ("halo_left", dict(halo, halo_left=-1)),
        ("halo_left", dict(halo, halo_left=True)),
        ("halo_mask", dict(halo, halo_mask=torch.ones(1, 6, dtype=torch.int32, device=DEVICE))),
        ("halo_mask", dict(halo, halo_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))),
        ("halo_v", dict(halo_v=c["halo_v"])),
        ("halo_mask", dict(halo_mask=torch.ones(1, 6, dtype=torch.bool, device=DEVICE))),
    ]
    for name, kw in cases:
        with pytest.raises(ValueError, match=name):
            _bad_call(c, **kw)
    for dlse in (torch.zeros(1, 2, 20, dtype=torch.float64), torch.zeros(1, 2, 19), torch.zeros(2, 20)):
        with pytest.raises(ValueError, match="dlse"):
            _bad_call(c, backward=True, dlse=dlse.to(DEVICE))


def test_unsupported_reasons_accepts_halo_lse_grad_and_dropout_offset():
    tb = _backend("triton")
    assert tb.unsupported_reasons(torch.device(DEVICE), torch.float32, 16, "band_side",
                                  features=("halo", "lse_grad", "dropout_offset", "grouped_kv", "dropout")) == []


# --------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: the halo and lse-gradient kernels compiled for sm_90 in bf16
# --------------------------------------------------------------------------------------------------------


def compile_halo_for_sm90(dims=(64,), baseline=False):
    """Compile the band kernels with a halo (GPU tiles, bf16, every mask and bias on, halo mask on), without and with
    dropout and a dropout offset (the dQ pass with dlse) for sm_90, printing registers / spills
    (``tests.test_triton_backend.ptxas_usage``); ``baseline``: also the same kernels without a halo, for comparison."""
    from longattn.triton_kernels import _common, band_side

    from tests.test_triton_backend import compile_sm90

    types = {**dict.fromkeys(["HK", "HV", "DHK", "DHV"], "*bf16"), "HMask": "*u8", "DLse": "*fp32",
             **dict.fromkeys(["KRange", "SRange", "Ranges", "TBounds"], "*i32")}

    def build(fn, constexprs, warps, on, offset=False):
        # the halo / dlse / dropout-offset arguments (default None) are None without them: compile-time constants
        none_args = [p.name for p in fn.params if not p.is_constexpr and p.has_default and not (
            on if p.name != "drop_offset" else offset)]
        compile_sm90(fn, constexprs, warps, types, none_args)

    for D in dims:
        bm, bn, warps = _common.attention_tiles(D)
        flags = dict(HAS_KMASK=True, HAS_SMASK=True, HAS_BBIAS=True, HAS_SBIAS=True, BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_D=D, DOT_PREC="tf32")
        for on in (True, False) if baseline else (True,):
            halo = dict(HAS_HALO=True, HAS_HMASK=True, HALO_ALIGN=16) if on else {}
            # no dropout; dropout with an offset (the sequence-parallel shard's case)
            for drop in (dict(HAS_DROPOUT=False), dict(HAS_DROPOUT=True, HAS_DOFFSET=True)):
                offset = drop.get("HAS_DOFFSET", False)
                for backward in (False, True):
                    build(band_side._rows_kernel, dict(BACKWARD=backward, **flags, **halo, **drop,
                                                       HAS_DLSE=on and backward), warps, on, offset)
                for side in (False, True) if offset else (False,):  # side keys' dK/dV: rows drawn with the offset
                    build(band_side._keys_kernel, dict(SIDE=side, **flags, **(halo if not side else {}), **drop), warps,
                          on and not side, offset)


def test_halo_kernels_compile_for_sm90_bf16():
    from tests.conftest import run_sm90_compile

    run_sm90_compile("tests.test_triton_halo:compile_halo_for_sm90")
