"""Grouped-query and multi-query attention (k, v with H_kv < H heads) in the band + side-keys ops.

Query head h reads K/V head ``h // (H // H_kv)`` (HF / flash-attn); side keys have k's H_kv heads. Every backend
is checked against the fp64 oracle (which repeats K/V; the backends must not) with the tolerance rule, the K/V
gradients have H_kv heads, and no op materialises a repeated copy of K or V (values checked under a
TorchDispatchMode). The Triton kernels run here under ``TRITON_INTERPRET=1`` (skipped otherwise on CPU).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import longattn
from longattn import dispatch
from longattn.backends import cuda_backend
from tests.conftest import check_backend_against_oracle, grads, make_case
from tests.test_ops import _band_side_args
from tests.tolerance import assert_close_to_oracle

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 in the "
                                  "environment to run on CPU (TRITON_INTERPRET=1 pytest tests/test_gqa.py)")


def gqa_case(H_kv, **kw):
    """``make_case`` with k, v, side_k, side_v cut to their first H_kv heads (contiguous)."""
    case = make_case(**kw)
    cut = {name: getattr(case, name)[:, :, :H_kv].detach().contiguous().requires_grad_()
           for name in ("k", "v", "side_k", "side_v")}
    return dataclasses.replace(case, **cut)


# (H_kv, make_case keywords): MQA and GQA, causal and symmetric windows, padding, biases, side keys.
CASES = {
    "mqa-causal-padded": (1, dict(B=2, S=37, H=4, D=16, window=(9, 0), G=0, padding="tail")),
    "gqa-symmetric-bias": (2, dict(B=2, S=40, H=6, D=16, window=(5, 5), G=0, bias=True, padding="rows")),
    "gqa-side-keys": (2, dict(B=2, S=35, H=6, D=16, window=(4, 3), G=3, bias=True, padding="tail",
                              side_padding=True)),
    "mqa-side-keys-wide": (1, dict(B=1, S=45, H=3, D=32, window=(33, 2), G=2, bias=True)),
}


@pytest.mark.parametrize("name", CASES)
def test_torch_backend_matches_oracle(name):
    H_kv, kw = CASES[name]
    case = gqa_case(H_kv, **kw)
    ref = case.run_oracle()
    ref_grads = grads(ref, case.leaves())
    for dtype in (torch.float64, torch.float32):
        run = case.cast(dtype)
        out = run.run("torch")
        assert_close_to_oracle("out", out, ref)
        for gname, g, r, leaf in zip(run.grad_names(), grads(out, run.leaves()), ref_grads, run.leaves()):
            assert g.shape == leaf.shape, gname  # dk, dv, dside_k, dside_v: H_kv heads
            assert_close_to_oracle(gname, g, r, scale=4.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_triton_matches_oracle(name, dtype):
    H_kv, kw = CASES[name]
    case = gqa_case(H_kv, **kw, device=DEVICE)
    _, _, got = check_backend_against_oracle(case, "triton", dtype)
    assert got[1].shape[2] == got[2].shape[2] == H_kv


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_gpu_tiles_deterministic(dtype):
    """GPU tile shapes (D = 128: 64 x 32 tiles), a long causal window, GQA with side keys: within the rule, and the
    dK/dV group sums bitwise reproducible (one program per K/V tile, no atomics)."""
    case = gqa_case(2, B=2, S=600, H=8, D=128, window=(255, 0), G=3, bias=True, padding="tail", device="cuda")
    test, out, got = check_backend_against_oracle(case, "triton", dtype)
    again = test.run("triton")
    assert torch.equal(again, out)
    for a, b in zip(grads(again, test.leaves()), got):
        assert torch.equal(a, b)


def test_local_attention_equals_repeated_kv():
    """The public local op with H_kv heads equals the same op on explicitly repeated K/V (sums of dK/dV)."""
    q = torch.randn(2, 30, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 30, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = longattn.local_attention(q, k, v, (4, 0), scale=0.7, backend="torch")
    rep = longattn.local_attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), (4, 0), scale=0.7,
                                   backend="torch")
    torch.testing.assert_close(out, rep, rtol=0, atol=1e-12)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(rep, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class _RepeatDetector(TorchDispatchMode):
    """Flags any op whose output holds only values of K (or V) (zeros aside) with some value appearing twice:
    a repeat of K/V, whole or per chunk, in any layout. K and V hold distinct values, so nothing else does."""

    def __init__(self, sources):
        super().__init__()
        self.sources = sources
        self.repeats = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        with _disable_current_modes():
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                    continue
                values = t.detach().flatten().double()
                values = values[values != 0]
                for name, src in self.sources.items():
                    if values.numel() and torch.isin(values, src).all() and values.unique().numel() < values.numel():
                        self.repeats.append(f"{func}: {name} values repeated in an output of shape {tuple(t.shape)}")
        return out


def _distinct(n, shape, offset):
    """float32 values all distinct and exact in float64 (multiples of 1/1024), none zero."""
    return ((torch.randperm(n)[: torch.Size(shape).numel()] + offset + 1).double() / 1024).float().reshape(shape)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_repeated_kv_in_memory(backend):
    B, S, H, H_kv, D, G = 1, 70, 6, 2, 16, 2
    q = torch.randn(B, S, H, D, device=DEVICE, requires_grad=True)
    k, v = (_distinct(4096, (B, S, H_kv, D), i * 4096).to(DEVICE).requires_grad_() for i in range(2))
    side_k, side_v = (_distinct(256, (B, G, H_kv, D), 8192 + i * 256).to(DEVICE).requires_grad_() for i in range(2))
    query_block = torch.zeros(B, S, dtype=torch.int32, device=DEVICE)
    sources = {name: x.detach().flatten().double() for name, x in
               (("k", k), ("v", v), ("side_k", side_k), ("side_v", side_v))}
    with _RepeatDetector(sources) as mode:
        out = longattn.tglobal_attention(q, k, v, side_k, side_v, (5, 5), query_block, scale=0.25, backend=backend)
        out.backward(torch.randn_like(out))
    assert not mode.repeats, mode.repeats
    assert k.grad.shape == k.shape and side_v.grad.shape == side_v.shape
    # The detector does see a repeat when there is one.
    with _RepeatDetector(sources) as mode:
        k.repeat_interleave(3, dim=2)
    assert mode.repeats


def test_opcheck_with_grouped_kv():
    case = gqa_case(2, B=2, S=13, H=4, D=8, window=(3, 2), G=3, bias=True, padding="tail", side_padding=True)
    ops = torch.ops.longattn
    torch.library.opcheck(ops.band_side_attention.default, _band_side_args(case))
    out, lse = ops.band_side_attention(*_band_side_args(case))
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in _band_side_args(case)]
    torch.library.opcheck(ops.band_side_attention_backward.default,
                          (torch.randn_like(out), *detached[:5], out.detach(), lse.detach(), *detached[5:]))
    local = gqa_case(1, B=1, S=9, H=3, D=8, window=(2, 0), G=0, dtype=torch.float32)
    torch.library.opcheck(ops.band_side_attention.default, _band_side_args(local))


def test_compile_fullgraph_with_grouped_kv():
    case = gqa_case(1, B=1, S=20, H=4, D=8, window=(3, 0), G=0, bias=True, padding="tail", dtype=torch.float32)
    leaves = [case.q, case.k, case.v, case.rel_bias]
    fn = lambda q, k, v, rb: longattn.local_attention(  # noqa: E731
        q, k, v, (3, 0), key_padding_mask=case.key_padding_mask, rel_bias=rb)
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), leaves), eager_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_bad_head_counts_raise():
    q = torch.randn(1, 8, 6, 16)
    kv4 = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match=r"k: its 4 heads \(H_kv\) must divide q's 6 heads"):
        longattn.local_attention(q, kv4, kv4, 2)
    k2, v3 = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="v: expected shape"):
        longattn.local_attention(q, k2, v3, 2)
    with pytest.raises(ValueError, match=r"k: expected shape \(B, S, H_kv, D\)"):
        longattn.local_attention(q, torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16), 2)
    side = torch.randn(1, 2, 6, 16)  # q's heads, but k has 2: side keys must have k's heads
    with pytest.raises(ValueError, match=r"side_k: expected shape \(B, G, H_kv, D\)"):
        longattn.tglobal_attention(q, k2, k2, side, side, 2, torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="k: expected shape"):  # Longformer keeps equal head counts
        longattn.longformer_attention(q, k2, k2, 2, torch.zeros(1, 8, dtype=torch.bool), max_globals=0)


def test_cuda_backend_refuses_grouped_kv(monkeypatch):
    monkeypatch.setattr(cuda_backend, "unavailable_reasons", lambda device: [])
    cuda = torch.device("cuda")
    assert cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side") == []
    assert cuda_backend.GROUPED_KV_REASON in cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side",
                                                                              features=("grouped_kv",))
    # The flag reaches the backend from the public op: an explicit request raises with the reason.
    seen = []
    real = dispatch.unsupported_reasons

    def spy(name, *args):
        seen.append((name, args[-1] if len(args) == 5 else ()))
        return real(name, *args)

    monkeypatch.setattr(dispatch, "unsupported_reasons", spy)
    dispatch.clear_cache()
    try:
        q, kv = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 1, 16)
        with pytest.raises(longattn.BackendUnavailableError, match=r"grouped-query attention \(H_kv < H\)"):
            longattn.local_attention(q, kv, kv, 2, backend="cuda")
        assert ("cuda", ("grouped_kv",)) in seen
    finally:
        dispatch.clear_cache()
