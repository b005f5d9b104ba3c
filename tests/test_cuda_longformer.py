"""The CUDA backend's fused Longformer band pass (``cuda_backend.longformer_band_forward`` / ``_backward``;
csrc/band_side, the kIndexed kernels and ``band_side_bwd_side_add_kernel``).

CPU part (always runs): the raw ops' checks of ``side_index`` / ``query_mask`` / ``band_rows_only`` (their CPU
registrations run the CUDA ones' checks, then say they need CUDA tensors), the fake shapes, and that the backend's
band pass goes straight to the raw op with the slot positions (no gather, scatter or masked_fill around it).

GPU part (``@pytest.mark.gpu``, skipped without a CUDA device the extension was built for): the CUDA Longformer op
(``longattn.longformer_attention(backend="cuda")``) against the fp64 oracle (``tests/reference.py``) under the
tolerance rule, the torch backend in the same dtype as the baseline: globals at the start, middle and end, many
globals (several side-key tiles), rows without globals, padding, separate global projections, dropout (the oracle
with ``longformer_keep_masks``), packed ranges (the gathered fallback); and determinism of every gradient.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.backends import cuda_backend
from tests import reference
from tests.conftest import grads
from tests.tolerance import assert_within_rule

BUILT = cuda_backend._C is not None
needs_build = pytest.mark.skipif(not BUILT, reason=f"longattn._C is not built ({cuda_backend._IMPORT_ERROR})")
gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for")

B, S, H, D, G, LEFT, RIGHT = 2, 10, 2, 32, 3, 3, 2
_DROP = {"dropout_p": 0.1, "rng": torch.zeros(2, dtype=torch.int64)}


# --------------------------------------------------------------------------------------------------------
# Raw-op checks (CPU registrations) and fake shapes.
# --------------------------------------------------------------------------------------------------------


def _raw_call(op_name, change=None):
    """Call raw op `op_name` on CPU with valid Longformer band-pass arguments changed by `change`, straight to the CPU
    kernel (a meta argument would otherwise select the fake)."""
    z = torch.zeros(B, S, H, D, dtype=torch.float16)
    args = dict(q=z, k=z, v=z, side_k=z, side_v=z, band_key_mask=torch.ones(B, S, dtype=torch.bool),
                side_mask=torch.ones(B, G, dtype=torch.bool), query_block=None, band_bias=None, side_bias=None,
                left=LEFT, right=RIGHT, scale=0.125, dropout_p=0.0, rng=None, dropout_global_rows=False,
                key_ranges=None, side_ranges=None, halo_k=None, halo_v=None, halo_mask=None, halo_left=0,
                dropout_offset=0, side_index=torch.arange(G).repeat(B, 1),
                query_mask=torch.ones(B, S, dtype=torch.bool), band_rows_only=True, dout=z, out=z,
                lse=torch.zeros(B, H, S), dlse=None)
    args.update(change or {})
    op = getattr(torch.ops.longattn, op_name).default
    positional = [args[x.name] for x in op._schema.arguments]
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *positional)


RAW_BAD = {  # change -> message pattern (after "<op>: "), for both ops
    "index-dtype": ({"side_index": torch.zeros(B, G, dtype=torch.int32)}, r"side_index must be Long"),
    "index-rank": ({"side_index": torch.zeros(B, G, 1, dtype=torch.int64)}, r"side_index must have shape \(B, G\)"),
    "index-B": ({"side_index": torch.zeros(B + 1, G, dtype=torch.int64)}, r"side_index must have shape \(B, G\)"),
    "index-strided": ({"side_index": torch.zeros(B, 2 * G, dtype=torch.int64)[:, ::2]},
                      r"side_index must have a unit last stride"),
    "index-device": ({"side_index": torch.zeros(B, G, dtype=torch.int64, device="meta")},
                     r"side_index must be on q's device"),
    "side_k-gathered": ({"side_k": torch.zeros(B, G, H, D, dtype=torch.float16)},
                        r"side_k must have shape .* with side_index"),
    "side_mask-shape": ({"side_mask": torch.ones(B, G + 1, dtype=torch.bool)}, r"side_mask must have shape"),
    "halo": ({"halo_k": torch.zeros(B, 2, H, D, dtype=torch.float16),
              "halo_v": torch.zeros(B, 2, H, D, dtype=torch.float16)}, r"halo_k must be None with side_index"),
    "ranges": ({"key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
               r"key_ranges / side_ranges must be None with side_index"),
    "global-rows": ({**_DROP, "dropout_global_rows": True},
                    r"dropout_offset / dropout_global_rows must be 0 / False with side_index"),
    "offset": ({**_DROP, "dropout_offset": 8}, r"dropout_offset / dropout_global_rows must be 0 / False"),
}
RAW_BAD_FWD = {  # the forward's row masks
    "query_mask-alone": ({"side_index": None, "band_rows_only": False}, r"query_mask needs side_index"),
    "band_rows_only-alone": ({"side_index": None, "query_mask": None}, r"band_rows_only needs side_index"),
    "band_rows_only-no-mask": ({"band_key_mask": None}, r"band_rows_only needs band_key_mask"),
    "query_mask-dtype": ({"query_mask": torch.ones(B, S, dtype=torch.uint8)}, r"query_mask must be Bool"),
    "query_mask-shape": ({"query_mask": torch.ones(B, S + 1, dtype=torch.bool)}, r"query_mask must have shape"),
    "query_mask-strided": ({"query_mask": torch.ones(S, B, dtype=torch.bool).T}, r"query_mask must be contiguous"),
}
RAW_CASES = [(op, case) for op in ("cuda_band_side_fwd", "cuda_band_side_bwd") for case in RAW_BAD] + [
    ("cuda_band_side_fwd", case) for case in RAW_BAD_FWD]


@needs_build
@pytest.mark.parametrize("op,case", RAW_CASES)
def test_raw_op_rejects_bad_longformer_arguments(op, case):
    change, pattern = {**RAW_BAD, **RAW_BAD_FWD}[case]
    with pytest.raises(RuntimeError, match=rf"^{op}: {pattern}") as info:
        _raw_call(op, change)
    assert not isinstance(info.value, NotImplementedError), info.value
    assert ", got " in str(info.value).split("\n")[0], info.value  # says what it was given


@needs_build
@pytest.mark.parametrize("op", ["cuda_band_side_fwd", "cuda_band_side_bwd"])
@pytest.mark.parametrize("change", [{}, {"query_mask": None}, {"band_rows_only": False}, {"side_mask": None},
                                    {"side_index": torch.zeros(B, 0, dtype=torch.int64),
                                     "side_mask": torch.ones(B, 0, dtype=torch.bool)},
                                    {"side_index": torch.tensor([[-5, S, 2**40]] * B)},  # any value is safe
                                    {"side_index": torch.zeros(B, S + 4, dtype=torch.int64)[:, 1:G + 1]},
                                    _DROP],
                         ids=["all", "no-query-mask", "lse-kept", "no-side-mask", "no-slots", "out-of-range",
                              "row-strided", "dropout"])
def test_raw_op_accepts_valid_longformer_arguments(op, change):
    with pytest.raises(NotImplementedError, match=f"{op}: needs CUDA tensors"):
        _raw_call(op, change)


@needs_build
def test_fake_shapes_with_side_index():
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(B, S, H, D, **meta)
    pos = torch.empty(B, G, dtype=torch.int64, device="meta")
    rows = torch.empty(B, S, dtype=torch.bool, device="meta")
    used = torch.empty(B, G, dtype=torch.bool, device="meta")
    ops = torch.ops.longattn
    out, lse = ops.cuda_band_side_fwd(q, q, q, q, q, rows, used, None, None, None, 3, 2, 0.125, side_index=pos,
                                      query_mask=rows, band_rows_only=True)
    assert out.shape == (B, S, H, D) and lse.shape == (B, H, S)
    g = ops.cuda_band_side_bwd(out, q, q, q, q, q, out, lse, rows, used, None, None, None, 3, 2, 0.125,
                               side_index=pos)
    assert [tuple(t.shape) for t in g] == [(B, S, H, D)] * 3 + [(0,)] * 6


@needs_build
def test_band_pass_goes_to_the_kernels_with_the_slot_positions():
    """Issue 12 target 2: the band pass is one raw-op call each way, given the slot positions (no gathered k/v,
    no masked_fill of out / lse, no scatter_add of the side keys' dK/dV around it)."""
    from tests.test_host_sync import OpLog

    z = torch.zeros(B, S, H, D, dtype=torch.float16)
    pos, used = torch.arange(G).repeat(B, 1), torch.ones(B, G, dtype=torch.bool)
    rows, pad = torch.ones(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    lse = torch.zeros(B, H, S)
    with OpLog() as fwd, pytest.raises(NotImplementedError, match="cuda_band_side_fwd: needs CUDA tensors"):
        cuda_backend.longformer_band_forward(z, z, z, pos, used, rows, pad, LEFT, RIGHT, 0.125)
    with OpLog() as bwd, pytest.raises(NotImplementedError, match="cuda_band_side_bwd: needs CUDA tensors"):
        cuda_backend.longformer_band_backward(z, z, z, z, z, lse, pos, used, rows, LEFT, RIGHT, 0.125)
    assert fwd.ops == ["longattn.cuda_band_side_fwd"] and bwd.ops == ["longattn.cuda_band_side_bwd"], (fwd.ops,
                                                                                                        bwd.ops)


# --------------------------------------------------------------------------------------------------------
# GPU: the CUDA Longformer op against the fp64 oracle.
# --------------------------------------------------------------------------------------------------------


def _globals(Bc, Sc, layout):
    glob = torch.zeros(Bc, Sc, dtype=torch.bool)
    if layout == "start-middle-end":
        glob[0, [0, Sc // 2, Sc - 1]] = True
        glob[1, Sc - 1] = True  # padding in row 1: never global
    elif layout == "many":
        glob[0, torch.arange(1, Sc, 2)[:80]] = True  # 80 globals: two side-key tiles
        glob[1, :20] = True
    return glob  # "none": no globals anywhere


# (S, D, window, layout, padding, separate projections, max_globals, dtype)
CASES = {
    "start-middle-end": (200, 64, (70, 60), "start-middle-end", True, False, 3, torch.float16),
    "start-middle-end-bf16-d128": (150, 128, (16, 40), "start-middle-end", True, False, None, torch.bfloat16),
    "projections-d32": (130, 32, (5, 9), "start-middle-end", False, True, 8, torch.float16),
    "many": (260, 64, (33, 33), "many", True, False, 96, torch.bfloat16),
    "no-globals": (190, 64, (20, 20), "none", True, False, 4, torch.float16),
    "no-slots": (100, 64, (20, 20), "none", True, False, 0, torch.float16),
}


def _case(name, dtype, device="cuda"):
    Sc, Dc, window, layout, padding, projections, max_globals, _ = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def leaf():
        return torch.randn(2, Sc, 2, Dc, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()

    q, k, v = leaf(), leaf(), leaf()
    qg, kg, vg = (leaf(), leaf(), leaf()) if projections else (None, None, None)
    pad = torch.ones(2, Sc, dtype=torch.bool)
    if padding:
        pad[1, Sc - 37:] = False
    kwargs = dict(key_padding_mask=pad.to(device), q_global=qg, k_global=kg, v_global=vg)
    leaves = [x for x in (q, k, v, qg, kg, vg) if x is not None]
    return (q, k, v, window, _globals(2, Sc, layout).to(device)), kwargs, leaves, max_globals


def _run(name, dtype, backend, dropout_p=0.0):
    """(out, gradients); with dropout the caller seeds torch's generator (the op draws its seed from it)."""
    args, kwargs, leaves, max_globals = _case(name, dtype)
    out = longattn.longformer_attention(*args, **kwargs, max_globals=max_globals, dropout_p=dropout_p,
                                        backend=backend)
    return out, grads(out, leaves)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name", CASES)
def test_cuda_longformer_within_rule(name):
    dtype = CASES[name][-1]
    args, kwargs, leaves, _ = _case(name, torch.float64)
    ref = reference.longformer_attention(*args, **kwargs)
    want = grads(ref, leaves)
    out, got = _run(name, dtype, "cuda")
    base, base_grads = _run(name, dtype, "torch")
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name", ["start-middle-end", "many"])
def test_cuda_longformer_dropout_matches_oracle(name):
    """The fused band pass draws the gathered path's bits (side key id = slot): out and every gradient against the
    oracle with ``longformer_keep_masks`` for the op's seed, within the rule (baseline: torch, same dtype)."""
    from tests.test_dropout import _rng_of, _seeded

    p, dtype = 0.2, CASES[name][-1]
    args, kwargs, leaves, _ = _case(name, torch.float64)
    rng = _rng_of(5, 2, 2, "cuda")
    keep = reference.longformer_keep_masks(rng.cpu(), p, args[4].cpu(), kwargs["key_padding_mask"].cpu(), 2)
    ref = reference.longformer_attention(*args, **kwargs, keep=tuple(x.to(args[0].device) for x in keep),
                                         dropout_p=p)
    want = grads(ref, leaves)
    (out, got), (base, base_grads) = (_seeded(lambda b=b: _run(name, dtype, b, p), 5) for b in ("cuda", "torch"))
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name, dropout_p", [("start-middle-end", 0.0), ("many", 0.0), ("projections-d32", 0.2)])
def test_cuda_longformer_backward_is_deterministic(name, dropout_p):
    from tests.test_dropout import _seeded

    runs = [_seeded(lambda: _run(name, CASES[name][-1], "cuda", dropout_p), 3) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu_ready
def test_fused_band_pass_equals_the_gathered_composition():
    """The kIndexed kernels against the same kernels on gathered side keys with torch masking: bitwise for out,
    lse, dq (same tiles, same order); dk / dv up to the order of the side keys' float32 partial sums."""
    from longattn.backends import _longformer

    name = "many"
    (q, k, v, window, glob), kwargs, _, G_ = _case(name, torch.bfloat16)
    q, k, v = (x.detach() for x in (q, k, v))
    pad = kwargs["key_padding_mask"]
    band_rows, pos, used = _longformer.global_slots(glob, pad, G_)
    out, lse = cuda_backend.longformer_band_forward(q, k, v, pos, used, band_rows, pad, *window, 0.125)
    side_k, side_v, index = cuda_backend._gather_side(k, v, pos)
    out2, lse2 = cuda_backend.band_side_forward(q, k, v, side_k, side_v, band_rows, used, None, None, None, *window,
                                                0.125)
    lse2.masked_fill_(~band_rows[:, None, :], float("inf"))
    out2.masked_fill_(~pad[:, :, None, None], 0.0)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn_like(out)
    dq, dk, dv = cuda_backend.longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, *window, 0.125)
    dq2, dk2, dv2, dsk, dsv, _, _ = cuda_backend.band_side_backward(dout, q, k, v, side_k, side_v, out, lse,
                                                                    band_rows, used, None, None, None, *window, 0.125)
    assert torch.equal(dq, dq2)
    # The side keys' float32 partials are summed by the side-add kernel here and by ATen there (order may differ).
    torch.testing.assert_close(dk, dk2.scatter_add(1, index, dsk))
    torch.testing.assert_close(dv, dv2.scatter_add(1, index, dsv))


@pytest.mark.gpu
@gpu_ready
def test_cuda_longformer_packed_within_rule():
    """Packed sequences (per-row key ranges): the CUDA band pass takes the gathered composition (the kIndexed
    kernels have no ranges); against the fp64 oracle per sequence."""
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
