"""The custom ops as torch sees them: gradcheck, opcheck, torch.compile(fullgraph=True), autocast."""

from __future__ import annotations

import pytest
import torch

import longattn
from tests.conftest import make_case

OPS = torch.ops.longattn


def _tglobal_case(**kw):
    return make_case(B=2, S=13, H=2, D=8 if "D" not in kw else kw.pop("D"), window=(3, 2), G=3, bias=True,
                     padding="tail", side_padding=True, **kw)


def test_gradcheck_tglobal():
    case = _tglobal_case()
    fn = lambda q, k, v, sk, sv, rb, sb: longattn.tglobal_attention(  # noqa: E731
        q, k, v, sk, sv, case.window, case.query_block, key_padding_mask=case.key_padding_mask,
        side_mask=case.side_mask, rel_bias=rb, side_bias=sb, scale=0.5, backend="torch")
    assert torch.autograd.gradcheck(fn, tuple(case.leaves()), fast_mode=True)


def test_gradcheck_local():
    case = make_case(B=1, S=11, H=2, D=8, window=(2, 4), bias=True, padding="tail")
    fn = lambda q, k, v, rb: longattn.local_attention(  # noqa: E731
        q, k, v, case.window, key_padding_mask=case.key_padding_mask, rel_bias=rb, backend="torch")
    assert torch.autograd.gradcheck(fn, (case.q, case.k, case.v, case.rel_bias), fast_mode=True)


def test_gradcheck_longformer():
    case = make_case(B=2, S=12, H=2, D=8, padding="tail")
    glob = torch.zeros(2, 12, dtype=torch.bool)
    glob[0, [0, 7]] = True
    glob[1, 11] = True  # padding in row 1: never global
    qg, kg, vg = (torch.randn_like(case.q).requires_grad_() for _ in range(3))
    fn = lambda q, k, v, a, b, c: longattn.longformer_attention(  # noqa: E731
        q, k, v, 2, glob, key_padding_mask=case.key_padding_mask, q_global=a, k_global=b, v_global=c)
    assert torch.autograd.gradcheck(fn, (case.q, case.k, case.v, qg, kg, vg), fast_mode=True)


def test_gradcheck_block_aggregate():
    x = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1, -1, -1], [0, 1, 1, 2, 3, 3, 3, 3, 3, 3]])
    assert torch.autograd.gradcheck(lambda x, w: longattn.block_aggregate(x, ids, 4, weight=w), (x, w))
    assert torch.autograd.gradcheck(lambda x: longattn.block_aggregate(x, ids, 4), (x,))


def _band_side_args(case):
    q, k, v, sk, sv = case.q, case.k, case.v, case.side_k, case.side_v
    return (q, k, v, sk, sv, case.key_padding_mask, case.side_mask, case.query_block.to(torch.int32),
            case.rel_bias, case.side_bias, *case.window, 0.5, "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_band_side(dtype):
    case = _tglobal_case(dtype=dtype)
    torch.library.opcheck(OPS.band_side_attention.default, _band_side_args(case))
    out, lse = OPS.band_side_attention(*_band_side_args(case))
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in _band_side_args(case)]
    bwd_args = (torch.randn_like(out), *detached[:5], out.detach(), lse.detach(), *detached[5:])
    torch.library.opcheck(OPS.band_side_attention_backward.default, bwd_args)


def test_opcheck_band_side_without_side_keys():
    case = make_case(B=1, S=9, H=2, D=8, window=(1, 1), G=0, dtype=torch.float32)
    torch.library.opcheck(OPS.band_side_attention.default, _band_side_args(case))


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_block_aggregate(weighted):
    x = torch.randn(2, 10, 6, requires_grad=True)
    w = torch.randn(6, requires_grad=True) if weighted else None
    ids = torch.randint(-1, 3, (2, 10), dtype=torch.int32)
    torch.library.opcheck(OPS.block_aggregate.default, (x, ids, 3, w, 1e-6, "torch"))
    out, sums, rstd = OPS.block_aggregate(x.detach(), ids, 3, w if w is None else w.detach(), 1e-6, "torch")
    torch.library.opcheck(OPS.block_aggregate_backward.default,
                          (torch.randn_like(out), x.detach(), ids, 3, None if w is None else w.detach(), sums, rstd,
                           1e-6, "torch"))


def _compile_fwd_bwd(fn, leaves):
    """Eager vs torch.compile(fullgraph=True): same output and gradients."""
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    compiled_grads = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_local():
    case = make_case(B=1, S=20, H=2, D=8, window=(3, 1), bias=True, padding="tail", dtype=torch.float32)
    fn = lambda q, k, v, rb: longattn.local_attention(  # noqa: E731
        q, k, v, (3, 1), key_padding_mask=case.key_padding_mask, rel_bias=rb)
    _compile_fwd_bwd(fn, [case.q, case.k, case.v, case.rel_bias])


def test_compile_tglobal_with_inductor():
    case = _tglobal_case(dtype=torch.float32)
    fn = lambda q, k, v, sk, sv, rb, sb: longattn.tglobal_attention(  # noqa: E731
        q, k, v, sk, sv, case.window, case.query_block, key_padding_mask=case.key_padding_mask,
        side_mask=case.side_mask, rel_bias=rb, side_bias=sb)
    eager = fn(*case.leaves())
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(*case.leaves())
    torch.testing.assert_close(compiled, eager)
    compiled_grads = torch.autograd.grad(compiled.sum(), case.leaves())
    for a, b in zip(compiled_grads, torch.autograd.grad(eager.sum(), case.leaves())):
        torch.testing.assert_close(a, b)


def test_compile_longformer():
    case = make_case(B=2, S=16, H=2, D=8, padding="tail", dtype=torch.float32)
    glob = torch.zeros(2, 16, dtype=torch.bool)
    glob[0, 3] = True
    fn = lambda q, k, v: longattn.longformer_attention(  # noqa: E731
        q, k, v, 2, glob, key_padding_mask=case.key_padding_mask, max_globals=2)
    _compile_fwd_bwd(fn, [case.q, case.k, case.v])


def test_longformer_under_compile_needs_max_globals():
    q = torch.randn(1, 8, 1, 8)
    glob = torch.zeros(1, 8, dtype=torch.bool)
    torch._dynamo.reset()
    fn = torch.compile(lambda q: longattn.longformer_attention(q, q, q, 2, glob), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="max_globals"):
        fn(q)


def test_compile_block_aggregate():
    x = torch.randn(2, 12, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    ids = longattn.tglobal_block_ids(torch.ones(2, 12), 4)[0]
    _compile_fwd_bwd(lambda x, w: longattn.block_aggregate(x, ids, 3, weight=w), [x, w])


def test_autocast_runs_in_low_precision():
    case = make_case(B=1, S=16, H=2, D=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = longattn.local_attention(case.q, case.k, case.v, 3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert case.q.grad.dtype == torch.float32


@pytest.mark.parametrize("projections", [False, True], ids=["shared", "global-projections"])
def test_opcheck_longformer(projections):
    case = make_case(B=2, S=12, H=2, D=8, padding="tail")
    glob = torch.zeros(2, 12, dtype=torch.bool)
    glob[0, [0, 7]] = True
    glob[1, 3] = True
    extra = [torch.randn_like(case.q).requires_grad_() for _ in range(3)] if projections else [None] * 3
    args = (case.q, case.k, case.v, *extra, glob, case.key_padding_mask, 2, 1, 0.5, 3, "torch")
    torch.library.opcheck(OPS.longformer_attention, args)
