"""The torch backend (the reference) against the fp64 dense oracle over the shapes of DESIGN.md section 4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longattn
from tests import reference
from tests.conftest import grads, make_case
from tests.tolerance import FLOORS, assert_close_to_oracle

# (B, S, H, D, window, G, extras): the DESIGN.md section 4 shape list.
SHAPES = {
    "odd-S": dict(B=2, S=37, H=2, D=16, window=(4, 3), G=3),
    "S-below-window": dict(B=1, S=9, H=2, D=32, window=(12, 12), G=2),
    "S=1": dict(B=2, S=1, H=3, D=16, window=(2, 2), G=1),
    "window-0": dict(B=2, S=29, H=2, D=16, window=(0, 0), G=0),
    "window>=S": dict(B=1, S=23, H=2, D=16, window=(40, 23), G=0),
    "asymmetric": dict(B=1, S=64, H=2, D=16, window=(9, 2), G=2),
    "causal": dict(B=2, S=70, H=1, D=16, window=(15, 0), G=0),
    "anti-causal": dict(B=1, S=33, H=2, D=16, window=(0, 7), G=4),
    "many-side-keys": dict(B=2, S=48, H=2, D=16, window=(3, 3), G=24),
    "D=64": dict(B=1, S=40, H=2, D=64, window=(5, 5), G=2),
    "D=128": dict(B=1, S=21, H=1, D=128, window=(3, 8), G=1),
    "multi-chunk": dict(B=1, S=300, H=2, D=16, window=(40, 10), G=5),
}
OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "padded": dict(padding="tail", side_padding=True, bias=True),
    "all-padding-row": dict(padding="rows", side_padding=True),
    "non-contiguous": dict(layout="bhsd", bias=True),
}


def _check(case, dtype, floor_scale=1.0):
    ref = case.run_oracle()
    ref_grads = grads(ref, case.leaves())
    test = case.cast(dtype)
    out = test.run("torch")
    assert out.dtype == dtype and out.shape == case.q.shape
    assert torch.isfinite(out).all()
    assert_close_to_oracle("out", out, ref, scale=floor_scale)
    for name, got, want in zip(case.grad_names(), grads(out, test.leaves()), ref_grads):
        assert torch.isfinite(got).all(), name
        assert_close_to_oracle(name, got, want, scale=10 * floor_scale)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle_float64(shape, option):
    _check(make_case(**SHAPES[shape], **OPTIONS[option]), torch.float64)


@pytest.mark.parametrize("shape", ["odd-S", "multi-chunk", "many-side-keys", "window>=S"])
def test_matches_oracle_float32(shape):
    _check(make_case(**SHAPES[shape], bias=True, padding="tail", side_padding=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_close(dtype):
    # CPU half matmuls: only the dtype's rounding is expected (the floor); outputs and grads stay finite.
    case = make_case(B=2, S=45, H=2, D=32, window=(6, 2), G=3, bias=True, padding="tail")
    _check(case, dtype, floor_scale=2.0)


def test_fully_masked_rows_give_zero_and_zero_grads():
    case = make_case(B=2, S=20, H=2, D=16, window=(2, 2), G=2, padding="rows")
    case.side_mask = torch.tensor([[False, False], [True, False]])
    out = case.run("torch")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dq = grads(out, case.leaves())[0]
    assert torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_covering_sequence_equals_dense_sdpa(dtype):
    case = make_case(B=2, S=31, H=2, D=16, window=(31, 31), G=0, dtype=dtype)
    out = longattn.local_attention(case.q, case.k, case.v, 31, backend="torch")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (case.q, case.k, case.v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=FLOORS[dtype], rtol=0)


def test_causal_window_equals_causal_sdpa():
    case = make_case(B=1, S=26, H=2, D=16, window=(26, 0), G=0)
    out = longattn.local_attention(case.q, case.k, case.v, (100, 0), backend="torch")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (case.q, case.k, case.v)),
                                           is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=0)


def test_oversized_window_slices_bias_table():
    # The public API clamps (50, 60) to (S-1, S-1) and slices rel_bias; gradients land in the used rows only.
    case = make_case(B=1, S=12, H=2, D=16, window=(50, 60), G=0, bias=True)
    out = longattn.local_attention(case.q, case.k, case.v, (50, 60), rel_bias=case.rel_bias, backend="torch")
    ref = case.run_oracle()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    (dbias,) = torch.autograd.grad(out.sum(), [case.rel_bias])
    assert torch.all(dbias[:, : 50 - 11] == 0) and torch.all(dbias[:, 50 + 12 :] == 0)


def test_longformer_matches_oracle_with_globals_everywhere():
    B, S, H, D = 3, 57, 2, 16
    case = make_case(B=B, S=S, H=H, D=D, G=0)
    q, k, v = case.q, case.k, case.v
    qg, kg, vg = (torch.randn(B, S, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[0, [0, 28, 56]] = True  # start, middle, end
    glob[1, :20] = True  # many
    # row 2: none
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, 50:] = False
    pad[2, 30:] = False
    kwargs = dict(key_padding_mask=pad, q_global=qg, k_global=kg, v_global=vg)
    out = longattn.longformer_attention(q, k, v, 5, glob, **kwargs, backend="torch")
    ref = reference.longformer_attention(q, k, v, 5, glob, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.equal(out[2, 30:], torch.zeros_like(out[2, 30:]))
    for bound in (20, S + 7):  # the exact maximum, and a bound beyond S (as many slots as tokens)
        loose = longattn.longformer_attention(q, k, v, 5, glob, **kwargs, max_globals=bound, backend="torch")
        torch.testing.assert_close(loose, out, atol=1e-12, rtol=0)
    leaves = [q, k, v, qg, kg, vg]
    for got, want in zip(grads(out, leaves), grads(ref, leaves)):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=0)


def test_longformer_without_globals_is_local_attention():
    case = make_case(B=2, S=40, H=2, D=16, padding="tail")
    none = torch.zeros(2, 40, dtype=torch.bool)
    out = longattn.longformer_attention(case.q, case.k, case.v, 3, none, key_padding_mask=case.key_padding_mask)
    local = longattn.local_attention(case.q, case.k, case.v, 3, key_padding_mask=case.key_padding_mask)
    torch.testing.assert_close(out, local * case.key_padding_mask[:, :, None, None], atol=0, rtol=0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_aggregate_matches_oracle(weighted, dtype):
    gen = torch.Generator().manual_seed(0)
    B, S, C, G = 3, 50, 24, 7
    x = torch.randn(B, S, C, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    ids = torch.randint(-1, G, (B, S), generator=gen)
    weight = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if weighted else None
    out = longattn.block_aggregate(x, ids, G, weight=weight, backend="torch")
    ref = reference.block_aggregate(x, ids, G, weight=weight)
    assert_close_to_oracle("out", out, ref)
    leaves = [x] + ([weight] if weighted else [])
    for name, got, want in zip(["dx", "dweight"], grads(out, leaves), grads(ref, leaves)):
        assert_close_to_oracle(name, got, want, scale=10)


def test_block_aggregate_empty_blocks_and_no_blocks():
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 0, -1, -1, 2, 2, 2, -1]])
    out = longattn.block_aggregate(x, ids, 4)
    assert torch.equal(out[0, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out[0, 3], torch.zeros(4, dtype=torch.float64))
    none = longattn.block_aggregate(x, torch.full((1, 8), -1), 0, weight=torch.ones(4, dtype=torch.float64))
    assert none.shape == (1, 0, 4)
