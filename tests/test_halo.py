"""Halo keys and the lse gradient through the band + side op (contract: ``longattn.backends``).

A sequence-parallel shard's band reaches keys on its neighbours: the op takes them as ``halo_k`` / ``halo_v``
(B, HL + HR, H_kv, D) and reads them in place. These tests run the op (``longattn.api._band_side`` with ``halo=``
and ``with_lse=True``: the custom op, its autograd formula, fakes and compile) against the fp64 dense oracle on the
extended sequence (``tests.reference.band_side_with_halo``), outputs, lse and every gradient, including the lse's
own gradient (the split-KV merge of the sequence-parallel global rows needs it). The Triton kernels' own cases are
in ``test_triton_halo.py``, CUDA's in ``test_cuda_halo.py``.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import api

from . import reference
from .tolerance import assert_within_rule

OPS = torch.ops.longattn


def _case(S=12, HL=3, HR=4, H=2, H_kv=2, D=8, G=3, dtype=torch.float64, masks=True, biases=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    B = 2
    c = dict(q=rand(B, S, H, D), k=rand(B, S, H_kv, D), v=rand(B, S, H_kv, D), halo_k=rand(B, HL + HR, H_kv, D),
             halo_v=rand(B, HL + HR, H_kv, D), halo_left=HL, side_k=rand(B, G, H_kv, D), side_v=rand(B, G, H_kv, D))
    c["band_key_mask"] = (torch.rand(B, S, generator=g) > 0.25) if masks else None
    c["halo_mask"] = (torch.rand(B, HL + HR, generator=g) > 0.25) if masks else None
    c["side_mask"] = torch.rand(B, G, generator=g) > 0.3 if masks else None
    c["query_block"] = torch.randint(-1, G, (B, S), generator=g, dtype=torch.int32)
    c["band_bias"] = rand(H, 5 + 4 + 1) if biases else None
    c["side_bias"] = rand(H, 2 * G + 1) if biases else None
    return c


def _run(c, window, backend, scale=0.4):
    halo = (c["halo_k"], c["halo_v"], c["halo_mask"], c["halo_left"])
    return api._band_side(c["q"], c["k"], c["v"], c["side_k"], c["side_v"], *window, band_key_mask=c["band_key_mask"],
                          side_mask=c["side_mask"], query_block=c["query_block"], band_bias=c["band_bias"],
                          side_bias=c["side_bias"], scale=scale, backend=backend, halo=halo, with_lse=True)


def _oracle(c, window, scale=0.4):
    return reference.band_side_with_halo(
        c["q"], c["k"], c["v"], c["halo_k"], c["halo_v"], c["halo_left"], halo_mask=c["halo_mask"],
        band_key_mask=c["band_key_mask"], query_block=c["query_block"], side_k=c["side_k"], side_v=c["side_v"],
        window=window, side_mask=c["side_mask"], band_bias=c["band_bias"], side_bias=c["side_bias"], scale=scale)


LEAVES = ("q", "k", "v", "halo_k", "halo_v", "side_k", "side_v", "band_bias", "side_bias")


def _loss_and_grads(out, lse, c, seed=1):
    """A loss reading both outputs (the lse where finite), and its gradients w.r.t. every leaf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    u = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = lse.detach().isfinite()
    loss = (out.double() * w).sum() + (torch.where(finite, lse.double(), 0.0) * u).sum()
    leaves = [n for n in LEAVES if c[n] is not None]
    return dict(zip(leaves, torch.autograd.grad(loss, [c[n] for n in leaves])))


WINDOWS = {"5/4": (5, 4), "wider than S": (20, 17), "causal": (5, 0), "none": (0, 0)}
HALOS = {"both": (3, 4), "left only": (5, 0), "right only": (0, 6), "empty": (0, 0), "wider than S": (15, 13)}


@pytest.mark.parametrize("halo", list(HALOS))
@pytest.mark.parametrize("window", list(WINDOWS))
def test_torch_backend_matches_oracle(halo, window):
    HL, HR = HALOS[halo]
    left, right = WINDOWS[window]
    c = _case(HL=HL, HR=HR)
    c["band_bias"] = torch.randn(2, left + right + 1, dtype=torch.float64).requires_grad_()
    out, lse = _run(c, (left, right), "torch")
    ref_out, ref_lse = _oracle(c, (left, right))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)
    grads, ref = _loss_and_grads(out, lse, c), _loss_and_grads(ref_out, ref_lse, c)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-10, rtol=0, msg=name)


def test_grouped_kv_and_no_masks():
    c = _case(H=4, H_kv=2, masks=False)
    out, lse = _run(c, (5, 4), "torch")
    ref_out, ref_lse = _oracle(c, (5, 4))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    grads, ref = _loss_and_grads(out, lse, c), _loss_and_grads(ref_out, ref_lse, c)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-10, rtol=0, msg=name)


def test_empty_halo_equals_no_halo_bitwise():
    c = _case(HL=0, HR=0, dtype=torch.float32)
    out, lse = _run(c, (5, 4), "torch")
    plain, plain_lse = api._band_side(c["q"], c["k"], c["v"], c["side_k"], c["side_v"], 5, 4,
                                      band_key_mask=c["band_key_mask"], side_mask=c["side_mask"],
                                      query_block=c["query_block"], band_bias=c["band_bias"],
                                      side_bias=c["side_bias"], scale=0.4, backend="torch", with_lse=True)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)


def test_lse_gradient_without_halo():
    """``with_lse`` alone: the lse's gradient reaches q, k, v, the side keys and the biases (oracle, fp64)."""
    c = _case()
    kw = dict(side_k=c["side_k"], side_v=c["side_v"], band_key_mask=c["band_key_mask"], side_mask=c["side_mask"],
              query_block=c["query_block"], band_bias=c["band_bias"], side_bias=c["side_bias"], scale=0.4)
    out, lse = api._band_side(c["q"], c["k"], c["v"], left=5, right=4, backend="torch", with_lse=True, **kw)
    ref_out, ref_lse = reference.band_side_attention(c["q"], c["k"], c["v"], window=(5, 4), with_lse=True, **kw)
    grads = _loss_and_grads(out, lse, {**c, "halo_k": None, "halo_v": None})
    ref = _loss_and_grads(ref_out, ref_lse, {**c, "halo_k": None, "halo_v": None})
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-10, rtol=0, msg=name)


def _triton_param():
    reasons = longattn.available_backends("cpu")["triton"]
    return pytest.param("triton", marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))


@pytest.mark.parametrize("backend", [_triton_param()])
def test_kernel_backend_within_tolerance_rule(backend):
    """The op on a kernel backend (Triton under TRITON_INTERPRET=1 here), float32, against the oracle with the
    tolerance rule (baseline: the torch backend in float32)."""
    c = _case(S=20, HL=6, HR=5, D=16, dtype=torch.float32)
    out, lse = _run(c, (5, 4), backend)
    base_out, base_lse = _run(c, (5, 4), "torch")
    ref_out, ref_lse = _oracle(c, (5, 4))
    assert_within_rule("out", out, base_out, ref_out)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    assert_within_rule("lse", lse[finite], base_lse[finite], ref_lse[finite])
    grads, base, ref = (_loss_and_grads(*r, c) for r in ((out, lse), (base_out, base_lse), (ref_out, ref_lse)))
    for name in grads:
        assert_within_rule(name, grads[name], base[name], ref[name], grad=True)


def _op_args(c, left=5, right=4):
    return (c["q"], c["k"], c["v"], c["side_k"], c["side_v"], c["band_key_mask"], c["side_mask"], c["query_block"],
            c["band_bias"], c["side_bias"], left, right, 0.4, "torch", 0.0, None, None, None, c["halo_k"], c["halo_v"],
            c["halo_mask"], c["halo_left"])


def test_opcheck_with_halo_and_lse_gradient():
    c = _case(dtype=torch.float32)
    torch.library.opcheck(OPS.band_side_attention.default, _op_args(c))
    out, lse = OPS.band_side_attention(*_op_args(c))
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(c)]
    bwd = (torch.randn_like(out), *args[:5], out.detach(), lse.detach(), *args[5:], 0, torch.randn_like(lse))
    torch.library.opcheck(OPS.band_side_halo_attention_backward.default, bwd)
    # Without a halo: the plain backward op with an lse gradient (and a dropout offset's slot).
    plain = (*bwd[:21], 0, bwd[-1])
    torch.library.opcheck(OPS.band_side_attention_backward.default, plain)


def test_compile_fullgraph_with_halo():
    c = _case(dtype=torch.float32)

    def f(q, k, v, halo_k, halo_v):
        out, lse = api._band_side(q, k, v, c["side_k"], c["side_v"], 5, 4, band_key_mask=c["band_key_mask"],
                                  side_mask=c["side_mask"], query_block=c["query_block"], band_bias=None,
                                  side_bias=None, scale=0.4, backend="torch",
                                  halo=(halo_k, halo_v, c["halo_mask"], c["halo_left"]), with_lse=True)
        return out.sum() + torch.where(lse.isfinite(), lse, 0.0).sum()

    leaves = [c[n] for n in ("q", "k", "v", "halo_k", "halo_v")]
    eager = torch.autograd.grad(f(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_halo_refuses_ranges():
    c = _case(dtype=torch.float32)
    ranges = torch.zeros(2, 12, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="key_ranges"):
        longattn.backends.torch_backend.band_side_forward(
            c["q"], c["k"], c["v"], c["side_k"], c["side_v"], None, None, None, None, None, 2, 2, 0.4,
            key_ranges=ranges, halo_k=c["halo_k"], halo_v=c["halo_v"], halo_left=3)


@pytest.mark.parametrize("a, b", [(8, 20), (0, 12), (12, 28), (4, 8)])
@pytest.mark.parametrize("side", [False, True], ids=["local", "tglobal"])
def test_shard_with_halo_and_dropout_offset_is_the_whole_sequence(a, b, side):
    """Rows [a, b) of a 28-token sequence, run as a shard: its halo keys cut from the sequence and
    ``dropout_offset = a``, give exactly the rows of the op on the whole sequence with the same dropout seed
    (the sequence-parallel contract), outputs and gradients (fp64)."""
    S, left, right, p = 28, 5, 6, 0.3
    c = _case(S=S, HL=0, HR=0, seed=4)
    c["band_bias"] = torch.randn(2, left + right + 1, dtype=torch.float64).requires_grad_()
    qb = c["query_block"] if side else None
    kw = dict(side_mask=c["side_mask"] if side else None, band_bias=c["band_bias"],
              side_bias=c["side_bias"] if side else None, scale=0.4, backend="torch", dropout_p=p)
    sk, sv = (c["side_k"], c["side_v"]) if side else (None, None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        whole = api._band_side(c["q"], c["k"], c["v"], sk, sv, left, right, band_key_mask=c["band_key_mask"],
                               query_block=qb, **kw)
    hl, hr = min(left, a), min(right, S - b)
    halo = (torch.cat([c["k"][:, a - hl:a], c["k"][:, b:b + hr]], 1), torch.cat([c["v"][:, a - hl:a],
            c["v"][:, b:b + hr]], 1), torch.cat([c["band_key_mask"][:, a - hl:a], c["band_key_mask"][:, b:b + hr]], 1),
            hl)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        shard = api._band_side(c["q"][:, a:b], c["k"][:, a:b], c["v"][:, a:b], sk, sv, left, right,
                               band_key_mask=c["band_key_mask"][:, a:b], query_block=None if qb is None else qb[:, a:b],
                               halo=halo, dropout_offset=a, **kw)
    torch.testing.assert_close(shard, whole[:, a:b], atol=1e-12, rtol=0)
    w = torch.randn_like(shard)
    leaves = [c["q"], c["k"], c["v"], c["band_bias"]] + ([c["side_k"], c["side_v"]] if side else [])
    g_whole = torch.autograd.grad((whole[:, a:b] * w).sum(), leaves)
    g_shard = torch.autograd.grad((shard * w).sum(), leaves)
    for name, x, y in zip(["q", "k", "v", "band_bias", "side_k", "side_v"], g_shard, g_whole):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0, msg=name)


def test_dropout_offset_changes_the_bits():
    """Without the offset a shard would draw row 0's bits again: the offset must matter (the test above can fail)."""
    c = _case(S=16, HL=0, HR=0, dtype=torch.float32)
    outs = []
    for offset in (0, 8):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            outs.append(api._band_side(c["q"], c["k"], c["v"], None, None, 3, 3, band_key_mask=None, side_mask=None,
                                       query_block=None, band_bias=None, side_bias=None, scale=0.4, backend="torch",
                                       dropout_p=0.5, dropout_offset=offset))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("offset", [6, 4])
def test_dropout_offset_must_be_a_multiple_of_4_past_the_halo(offset):
    c = _case(HL=5, HR=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="dropout_offset"):
        api._band_side(c["q"], c["k"], c["v"], None, None, 3, 3, band_key_mask=None, side_mask=None, query_block=None,
                       band_bias=None, side_bias=None, scale=0.4, backend="torch", dropout_p=0.5,
                       dropout_offset=offset, halo=(c["halo_k"], c["halo_v"], None, 5))
