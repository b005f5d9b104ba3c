"""The CUDA backend's fused Longformer band pass (``cuda_backend.longformer_band_forward`` / ``_backward``;
csrc/band_side, the kIndexed kernels and ``band_side_bwd_finish_kernel``).

CPU part (always runs): the raw ops' checks of ``side_index`` / ``query_mask`` / ``band_rows_only`` (their CPU
registrations run the CUDA ones' checks, then say they need CUDA tensors), the fake shapes, and that the backend's
band pass goes straight to the raw op with the slot positions (no gather, scatter or masked_fill around it).

GPU part (``@pytest.mark.gpu``, skipped without a CUDA device the extension was built for): the CUDA Longformer op
(``longattn.longformer_attention(backend="cuda")``) against the fp64 oracle (``tests/reference.py``) under the
tolerance rule, the torch backend in the same dtype as the baseline: globals at the start, middle and end, many
globals (several side-key tiles), rows without globals, padding, separate global projections, dropout (the oracle
with ``longformer_keep_masks``), packed ranges (the band pass's kIndexed && kRanges kernels: the varlen API, and a
padded batch of packed sequences with dropout against the torch backend) and the fused band pass against the gathered
composition it replaced; and determinism of every gradient.
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
# A packed batch's band-pass ranges (any values are safe: the kernels only mask with them): band keys and slots.
_RANGES = {"key_ranges": torch.tensor([[0, 6]] * 6 + [[6, S]] * (S - 6), dtype=torch.int32).repeat(B, 1, 1),
           "side_ranges": torch.tensor([[0, 1]] * 6 + [[1, G + 5]] * (S - 6), dtype=torch.int32).repeat(B, 1, 1)}


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
                lse=torch.zeros(B, H, S), dlse=None, side_only=False, lse_split=1, dside_k_into=None,
                dside_v_into=None, query_index=None)
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
    "halo-and-ranges": ({"halo_k": torch.zeros(B, 2, H, D, dtype=torch.float16),
                         "halo_v": torch.zeros(B, 2, H, D, dtype=torch.float16),
                         "key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
                        r"halo_k must be None with side_index"),
    "ranges-and-offset": ({**_DROP, "dropout_offset": 8, "side_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
                          r"dropout_offset / dropout_global_rows must be 0 / False"),
    # The packed band pass's ranges get the checks of any ranges: (B, S, 2) int32, contiguous.
    "key_ranges-dtype": ({"key_ranges": torch.zeros(B, S, 2, dtype=torch.int64)}, r"key_ranges must be Int"),
    "side_ranges-slots": ({"side_ranges": torch.zeros(B, G, 2, dtype=torch.int32)},
                          r"side_ranges must have shape \(B, S, 2\)"),
    "side_ranges-strided": ({"side_ranges": torch.zeros(B, 2, S, dtype=torch.int32).transpose(1, 2)},
                            r"side_ranges must be contiguous"),
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
                                    _DROP, _RANGES, {**_RANGES, **_DROP}, {"key_ranges": _RANGES["key_ranges"]},
                                    {"side_ranges": _RANGES["side_ranges"]},
                                    {**_RANGES, "side_index": torch.zeros(B, 0, dtype=torch.int64),
                                     "side_mask": torch.ones(B, 0, dtype=torch.bool)}],
                         ids=["all", "no-query-mask", "lse-kept", "no-side-mask", "no-slots", "out-of-range",
                              "row-strided", "dropout", "ranges", "ranges-dropout", "key-ranges-only",
                              "side-ranges-only", "ranges-no-slots"])
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
@pytest.mark.parametrize("ranges", [{}, _RANGES, {"key_ranges": _RANGES["key_ranges"]}],
                         ids=["padded", "packed", "key-ranges-only"])
def test_band_pass_goes_to_the_kernels_with_the_slot_positions(ranges, monkeypatch):
    """Issue 12 target 2: the band pass is one raw-op call each way, given the slot positions and, packed, the ranges
    (no gathered k/v, no masked_fill of out / lse, no scatter_add of the side keys' dK/dV around it; no fallback to
    ``_longformer.gathered_band_*``)."""
    from longattn.backends import _longformer
    from tests.test_host_sync import OpLog

    def no_fallback(*args, **kwargs):
        raise AssertionError("the gathered composition ran")

    monkeypatch.setattr(_longformer, "gathered_band_forward", no_fallback)
    monkeypatch.setattr(_longformer, "gathered_band_backward", no_fallback)
    seen = []

    class Log(OpLog):  # also the raw ops' range arguments, bound to their schema names
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).startswith("longattn."):
                bound = {**dict(zip([a.name for a in func._schema.arguments], args)), **(kwargs or {})}
                seen.append((str(func.overloadpacket), [bound.get(k) for k in ("key_ranges", "side_ranges")]))
            return super().__torch_dispatch__(func, types, args, kwargs)

    z = torch.zeros(B, S, H, D, dtype=torch.float16)
    pos, used = torch.arange(G).repeat(B, 1), torch.ones(B, G, dtype=torch.bool)
    rows, pad = torch.ones(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    lse = torch.zeros(B, H, S)
    with Log() as fwd, pytest.raises(NotImplementedError, match="cuda_band_side_fwd: needs CUDA tensors"):
        cuda_backend.longformer_band_forward(z, z, z, pos, used, rows, pad, LEFT, RIGHT, 0.125, **ranges)
    with Log() as bwd, pytest.raises(NotImplementedError, match="cuda_band_side_bwd: needs CUDA tensors"):
        cuda_backend.longformer_band_backward(z, z, z, z, z, lse, pos, used, rows, LEFT, RIGHT, 0.125, **ranges)
    assert fwd.ops == ["longattn.cuda_band_side_fwd"] and bwd.ops == ["longattn.cuda_band_side_bwd"], (fwd.ops,
                                                                                                        bwd.ops)
    passed = [ranges.get("key_ranges"), ranges.get("side_ranges")]
    assert [name for name, _ in seen] == ["longattn.cuda_band_side_fwd", "longattn.cuda_band_side_bwd"], seen
    for _, given in seen:
        assert all(a is b for a, b in zip(given, passed)), (given, passed)


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


def _check_within_rule(name):
    """Case ``name`` on the CUDA backend: out and every gradient against the fp64 oracle within the rule (baseline:
    the torch backend in the same dtype) -> (out, gradients)."""
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
    return out, got


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name", CASES)
def test_cuda_longformer_within_rule(name):
    _check_within_rule(name)


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


def _band_pass_inputs(name):
    """(q, k, v, pos, used, band_rows, pad, window, ranges) on the GPU: the padded case "many" (bf16), or "packed"
    (fp16, tests.test_cuda_packed_longformer._packed_band_case: several sequences per row, padding, two side tiles, slot
    ranges)."""
    from longattn.backends import _longformer
    from tests.test_cuda_packed_longformer import _packed_band_case

    if name == "packed":
        q, k, v, _, pos, used, band_rows, pad, key_ranges, side_ranges, _, _ = _packed_band_case(64, "cuda")
        q, k, v = (x.half() for x in (q, k, v))
        return q, k, v, pos, used, band_rows, pad, (20, 30), {"key_ranges": key_ranges, "side_ranges": side_ranges}
    (q, k, v, window, glob), kwargs, _, G_ = _case(name, torch.bfloat16)
    pad = kwargs["key_padding_mask"]
    band_rows, pos, used = _longformer.global_slots(glob, pad, G_)
    return (*(x.detach() for x in (q, k, v)), pos, used, band_rows, pad, window, {})


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name", ["many", "packed"])
def test_fused_band_pass_equals_the_gathered_composition(name):
    """The kIndexed kernels (packed: kIndexed && kRanges) against the same kernels on gathered side keys with torch
    masking and scatter (``_longformer.gathered_band_*``, what the packed band pass ran before): bitwise for out, lse,
    dq (same tiles, same order); dk / dv up to the order of the side keys' float32 partial sums."""
    from longattn.backends import _longformer

    q, k, v, pos, used, band_rows, pad, window, ranges = _band_pass_inputs(name)
    out, lse = cuda_backend.longformer_band_forward(q, k, v, pos, used, band_rows, pad, *window, 0.125, **ranges)
    out2, lse2 = _longformer.gathered_band_forward(cuda_backend.band_side_forward, q, k, v, pos, used, band_rows, pad,
                                                   *window, 0.125, **ranges)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn_like(out)
    dq, dk, dv = cuda_backend.longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, *window, 0.125,
                                                       **ranges)
    dq2, dk2, dv2 = _longformer.gathered_band_backward(cuda_backend.band_side_backward, dout, q, k, v, out, lse, pos,
                                                       used, band_rows, *window, 0.125, **ranges)
    assert torch.equal(dq, dq2)
    # The side keys' float32 partials are summed by the finish kernel here and by ATen there (order may differ).
    torch.testing.assert_close(dk, dk2)
    torch.testing.assert_close(dv, dv2)


# --------------------------------------------------------------------------------------------------------
# The glue kernels of csrc/longformer (raw ops cuda_longformer_*): slot layout, the global rows' merge into out and
# the dq rows' sum into dq (the global rows' band op reads the slots' rows in place: tests/test_cuda_global_rows.py).
# CPU: the raw ops' checks, fakes, the backend's call sequence, and statement-level emulations of the kernels' index
# arithmetic against the torch composition they replace.
# --------------------------------------------------------------------------------------------------------

C_SPLITS = 3
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _glue_call(op_name, change=None):
    """Call glue raw op `op_name` on CPU with valid arguments (B, S, H, D, G above; C_SPLITS splits) changed by
    `change`, straight to the CPU kernel."""
    z = torch.zeros(B, S, H, D, dtype=torch.float16)
    parts = torch.zeros(B * C_SPLITS, G, H, D, dtype=torch.float16)
    args = dict(global_mask=torch.zeros(B, S, dtype=torch.bool), key_padding_mask=torch.ones(B, S, dtype=torch.bool),
                G=G, x=z, pos=torch.arange(G).repeat(B, 1), C=C_SPLITS, out_parts=parts, dq_parts=parts,
                lse_parts=torch.zeros(B * C_SPLITS, H, G), used=torch.ones(B, G, dtype=torch.bool), out=z.clone(),
                dq=z.clone(), zero_fill=False, zero=None)
    args.update(change or {})
    op = getattr(torch.ops.longattn, f"cuda_longformer_{op_name}").default
    return op.redispatch(_CPU, *[args[a.name] for a in op._schema.arguments])


_F16, _META = dict(dtype=torch.float16), dict(dtype=torch.int64, device="meta")
_SLOT_BAD = {  # (ops, change, message pattern after "<op>: "); pos / used as the rows ops read them
    "pos-dtype": ({"pos": torch.zeros(B, G, dtype=torch.int32)}, r"pos must be Long"),
    "pos-B": ({"pos": torch.zeros(B + 1, G, dtype=torch.int64)}, r"pos must have shape \(B, G\)"),
    "pos-strided": ({"pos": torch.zeros(B, 2 * G, dtype=torch.int64)[:, ::2]}, r"pos must have a unit last stride"),
    "pos-device": ({"pos": torch.zeros(B, G, **_META)}, r"pos must be on (out|dq)'s device"),
}
GLUE_BAD = {
    "global_slots": {
        "mask-dtype": ({"global_mask": torch.zeros(B, S, dtype=torch.uint8)}, r"global_mask must be Bool"),
        "mask-rank": ({"global_mask": torch.zeros(B, S, 1, dtype=torch.bool)}, r"global_mask must have shape"),
        "pad-dtype": ({"key_padding_mask": torch.ones(B, S, dtype=torch.uint8)}, r"key_padding_mask must be Bool"),
        "pad-shape": ({"key_padding_mask": torch.ones(B, S + 1, dtype=torch.bool)},
                      r"key_padding_mask must have shape \(B, S\)"),
        "pad-device": ({"key_padding_mask": torch.ones(B, S, dtype=torch.bool, device="meta")},
                       r"key_padding_mask must be on global_mask's device"),
        "G-negative": ({"G": -1}, r"G must be in \[0, S\]"),
        "G-above-S": ({"G": S + 1}, r"G must be in \[0, S\]"),
        "zero-dtype": ({"zero": torch.zeros(4, dtype=torch.int64)}, r"zero must be Int"),
        "zero-strided": ({"zero": torch.zeros(8, dtype=torch.int32)[::2]}, r"zero must be contiguous"),
        "zero-device": ({"zero": torch.zeros(4, dtype=torch.int32, device="meta")},
                        r"zero must be on global_mask's device"),
        "zero-no-ctas": ({"global_mask": torch.zeros(0, S, dtype=torch.bool), "key_padding_mask": None,
                          "zero": torch.zeros(4, dtype=torch.int32)}, r"zero must be empty when B or S is 0"),
    },
    "rows_merge": {
        **_SLOT_BAD,
        "out-dtype": ({"out": torch.zeros(B, S, H, D, dtype=torch.int32)}, r"out must be float32, float16"),
        "out-strided": ({"out": torch.zeros(B, S, H, 2 * D, **_F16)[..., ::2]}, r"out must have a contiguous last"),
        "parts-dtype": ({"out_parts": torch.zeros(B * C_SPLITS, G, H, D)}, r"out_parts must have out's dtype"),
        "parts-shape": ({"out_parts": torch.zeros(B * C_SPLITS + 1, G, H, D, **_F16)},
                        r"out_parts must have shape \(B \* C, G, H, D\)"),
        "parts-G": ({"out_parts": torch.zeros(B * C_SPLITS, G + 1, H, D, **_F16)}, r"out_parts must have shape"),
        "parts-strided": ({"out_parts": torch.zeros(B * C_SPLITS, G, D, H, **_F16).transpose(2, 3)},
                          r"out_parts must be contiguous"),
        "lse-dtype": ({"lse_parts": torch.zeros(B * C_SPLITS, H, G, **_F16)}, r"lse_parts must be Float"),
        "lse-shape": ({"lse_parts": torch.zeros(B, H, G)}, r"lse_parts must have shape \(B \* C, H, G\)"),
        "used-dtype": ({"used": torch.ones(B, G, dtype=torch.uint8)}, r"used must be Bool"),
        "used-shape": ({"used": torch.ones(B, G + 1, dtype=torch.bool)}, r"used must have shape \(B, G\)"),
    },
    "rows_add": {
        **_SLOT_BAD,
        "dq-rank": ({"dq": torch.zeros(B, S, H * D, **_F16)}, r"dq must have shape \(B, S, H, D\)"),
        "parts-shape": ({"dq_parts": torch.zeros(B * C_SPLITS, G, H, D + 1, **_F16)}, r"dq_parts must have shape"),
        "used-strided": ({"used": torch.ones(B, 2 * G, dtype=torch.bool)[:, ::2]}, r"used must have a unit last"),
    },
}
GLUE_CASES = [(op, case) for op, cases in GLUE_BAD.items() for case in cases]


@needs_build
@pytest.mark.parametrize("op,case", GLUE_CASES)
def test_glue_op_rejects_bad_arguments(op, case):
    change, pattern = GLUE_BAD[op][case]
    with pytest.raises(RuntimeError, match=rf"^cuda_longformer_{op}: {pattern}") as info:
        _glue_call(op, change)
    assert not isinstance(info.value, NotImplementedError), info.value
    assert ", got " in str(info.value).split("\n")[0], info.value


GLUE_VALID = {
    "global_slots": {"no-pad": {"key_padding_mask": None}, "no-slots": {"G": 0}, "all-slots": {"G": S},
                     "zero": {"zero": torch.ones(B * H, dtype=torch.int32)},
                     "strided": {"global_mask": torch.zeros(S, B, dtype=torch.bool).T,
                                 "key_padding_mask": torch.ones(B, 2 * S, dtype=torch.bool)[:, ::2]}},
    "rows_merge": {"bf16": {"out": torch.zeros(B, S, H, D, dtype=torch.bfloat16),
                            "out_parts": torch.zeros(B * C_SPLITS, G, H, D, dtype=torch.bfloat16)}},
    "rows_add": {"float32": {"dq": torch.zeros(B, S, H, D), "dq_parts": torch.zeros(B * C_SPLITS, G, H, D)}},
}
_ROWS_VALID = {"out-of-range": {"pos": torch.tensor([[-5, S, 2**40]] * B)},  # any value is safe
               "row-strided": {"pos": torch.zeros(B, S + 4, dtype=torch.int64)[:, 1:G + 1]},
               "no-slots": {"pos": torch.zeros(B, 0, dtype=torch.int64), "used": torch.ones(B, 0, dtype=torch.bool),
                            "out_parts": torch.zeros(B * C_SPLITS, 0, H, D, **_F16),
                            "dq_parts": torch.zeros(B * C_SPLITS, 0, H, D, **_F16),
                            "lse_parts": torch.zeros(B * C_SPLITS, H, 0)}}
GLUE_VALID_CASES = [(op, case) for op in GLUE_VALID for case in ["default", *GLUE_VALID[op]]
                    + ([] if op == "global_slots" else list(_ROWS_VALID))]


@needs_build
@pytest.mark.parametrize("op,case", GLUE_VALID_CASES)
def test_glue_op_accepts_valid_arguments(op, case):
    change = {**GLUE_VALID[op], **_ROWS_VALID}.get(case, {})
    with pytest.raises(NotImplementedError, match=f"cuda_longformer_{op}: needs CUDA tensors"):
        _glue_call(op, change)


@needs_build
def test_glue_op_fake_shapes():
    ops = torch.ops.longattn
    glob = torch.empty(B, S, dtype=torch.bool, device="meta")
    band_rows, pos, used = ops.cuda_longformer_global_slots(glob, None, G)
    assert (band_rows.shape, band_rows.dtype) == ((B, S), torch.bool)
    assert (pos.shape, pos.dtype, used.shape, used.dtype) == ((B, G), torch.int64, (B, G), torch.bool)
    x = torch.empty(B, S, H, D, device="meta", dtype=torch.bfloat16)
    rows = torch.empty(B * C_SPLITS, G, H, D, device="meta", dtype=torch.bfloat16)
    lse = torch.empty(B * C_SPLITS, H, G, device="meta")
    glse = ops.cuda_longformer_rows_merge(rows, lse, pos, used, x)
    assert (glse.shape, glse.dtype) == ((B, H, G), torch.float32)
    assert ops.cuda_longformer_rows_add(rows, pos, used, x) is None


@pytest.mark.parametrize("call, pattern", [
    (lambda m, p: cuda_backend.global_slots(m.to(torch.uint8), p, G), r"global_mask: expected a bool \(B, S\)"),
    (lambda m, p: cuda_backend.global_slots(m, p[:, 1:], G), r"key_padding_mask: expected a bool \(2, 10\)"),
    (lambda m, p: cuda_backend.global_slots(m, p, S + 1), r"G: expected an int in \[0, S\] = \[0, 10\]"),
    (lambda m, p: cuda_backend.global_slots(m, p, True), r"G: expected an int"),
], ids=["mask-dtype", "pad-shape", "G-range", "G-bool"])
def test_global_slots_rejects_bad_arguments_before_the_launch(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.zeros(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool))


@pytest.mark.parametrize("fn", ["global_rows_forward", "global_rows_backward"])
@pytest.mark.parametrize("change, pattern", [
    ({"pos": torch.zeros(B, G, dtype=torch.int32)}, r"pos: expected an int64 \(B, G\) tensor with B = 2"),
    ({"pos": torch.zeros(B + 1, G, dtype=torch.int64)}, r"pos: expected an int64 \(B, G\)"),
    ({"used": torch.ones(B, G + 1, dtype=torch.bool)}, r"used: expected a bool \(2, 3\) tensor"),
], ids=["pos-dtype", "pos-B", "used-shape"])
def test_global_rows_reject_bad_slots_before_the_launch(fn, change, pattern):
    from tests.test_host_sync import OpLog

    q, k, v, out, pos, used, pad = _global_rows_args("cpu")
    slots = {"pos": pos, "used": used, **change}
    args = (q, k, v, slots["pos"], slots["used"], pad, 0.125, out) if fn == "global_rows_forward" else (
        out, q, k, v, out, torch.zeros(B, H, G), slots["pos"], slots["used"], pad, 0.125, None, None, None)
    with OpLog() as log, pytest.raises(ValueError, match=pattern):
        getattr(cuda_backend, fn)(*args)
    assert log.ops == []


def _global_rows_args(device, Sx=S):
    t = dict(device=device, dtype=torch.float16)
    q, k, v, out = (torch.zeros(B, Sx, H, D, **t) for _ in range(4))
    pos, used = torch.arange(G, device=device).repeat(B, 1), torch.ones(B, G, dtype=torch.bool, device=device)
    return q, k, v, out, pos, used, torch.ones(B, Sx, dtype=torch.bool, device=device)


@needs_build
@pytest.mark.parametrize("split_keys, Sx", [(None, S), (5, 10), (4, 11)], ids=["one-split", "splits", "padded"])
def test_global_rows_go_to_the_glue_kernels(split_keys, Sx, monkeypatch):
    """Issue 12 target 2: the global rows are their band op and one longattn kernel each way (the merge of the splits
    into out; the sum of the splits' dq rows into dq): no gather, copy, where, scatter, masked_fill, or the merge's
    elementwise ops. The band op reads the slots' rows of q (and dout, out) in place (query_index), needs no band mask
    (side_only), reads the merged glse for every split (lse_split) and adds the keys' dk / dv into the band's itself
    (dside_*_into). What torch still runs: with padded splits the pads of k / v / the key mask. On meta tensors (the
    raw ops' fakes)."""
    from longattn.backends import _longformer
    from tests.test_host_sync import OpLog

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    q, k, v, out, pos, used, pad = _global_rows_args("meta", Sx)
    with OpLog() as fwd:
        glse = cuda_backend.global_rows_forward(q, k, v, pos, used, pad, 0.125, out)
    dq_into, dk_into, dv_into = q.clone(), k.clone(), v.clone()
    with OpLog() as bwd:
        dq, dk, dv = cuda_backend.global_rows_backward(out, q, k, v, out, glse, pos, used, pad, 0.125, dq_into,
                                                       dk_into, dv_into)
    assert glse.shape == (B, H, G) and dq.shape == dk.shape == dv.shape == q.shape
    ours = "longattn.cuda_longformer_"
    assert [op for op in fwd.ops if op.startswith("longattn.")] == ["longattn.cuda_band_side_fwd",
                                                                    f"{ours}rows_merge"], fwd.ops
    assert [op for op in bwd.ops if op.startswith("longattn.")] == ["longattn.cuda_band_side_bwd",
                                                                    f"{ours}rows_add"], bwd.ops
    pads = ["aten.constant_pad_nd"] * 3 if Sx % (split_keys or Sx) else []
    assert sorted(op for op in fwd.ops if op.startswith("aten.")) == sorted(pads), fwd.ops
    assert sorted(op for op in bwd.ops if op.startswith("aten.")) == sorted(pads), bwd.ops


def _emulate_global_slots(glob, pad, G_, threads=4, items=2):
    """csrc/longformer/slots.cu statement by statement (one CTA per row; `threads` x `items` tokens per chunk, small
    here so that rows cross chunks) -> (band_rows, pos, used), every slot written exactly once (checked)."""
    Bx, Sx = glob.shape
    band_rows = torch.full((Bx, Sx), -1, dtype=torch.int8)
    pos, used = torch.full((Bx, G_), -1, dtype=torch.int64), torch.full((Bx, G_), -1, dtype=torch.int8)
    chunk = threads * items

    def load(b, s0, end):  # -> [(is_global, real)] of tokens s0 .. s0 + items - 1 inside [0, end)
        toks = []
        for s in range(s0, min(s0 + items, end)):
            real = pad is None or bool(pad[b, s])
            toks.append((real and bool(glob[b, s]), real))
        return toks

    def scan(counts):  # block_exclusive_scan
        return [sum(counts[:t]) for t in range(threads)], sum(counts)

    for b in range(Bx):
        n = 0
        for c0 in range(0, Sx, chunk):
            toks = [load(b, c0 + t * items, Sx) for t in range(threads)]
            for t in range(threads):
                for i, (is_global, real) in enumerate(toks[t]):
                    band_rows[b, c0 + t * items + i] = int(real and not is_global)
            before, total = scan([sum(gl for gl, _ in tk) for tk in toks])
            if n < G_ and total > 0:
                for t in range(threads):
                    rank = n + before[t]
                    for i, (is_global, _) in enumerate(toks[t]):
                        if is_global:
                            if rank < G_:
                                assert pos[b, rank] == -1
                                pos[b, rank], used[b, rank] = c0 + t * items + i, 1
                            rank += 1
            n += total
        placed, end, c0 = 0, min(G_, Sx), 0
        while c0 < end and n + placed < G_:
            toks = [load(b, c0 + t * items, end) for t in range(threads)]
            before, total = scan([sum(not gl for gl, _ in tk) for tk in toks])
            for t in range(threads):
                slot = n + placed + before[t]
                for i, (is_global, _) in enumerate(toks[t]):
                    if not is_global:
                        if slot < G_:
                            assert pos[b, slot] == -1
                            pos[b, slot], used[b, slot] = c0 + t * items + i, 0
                        slot += 1
            placed += total
            c0 += chunk
    assert (band_rows >= 0).all() and (pos >= 0).all() and (used >= 0).all(), "a slot or row left unwritten"
    return band_rows.bool(), pos, used.bool()


def _random_slot_masks(seed, Bx, Sx, device="cpu"):
    """Rows with few, many, all and no globals, with padding (which may cover globals); a row's density varies."""
    gen = torch.Generator().manual_seed(seed)
    density = torch.tensor([0.05, 0.5, 1.0, 0.0])[torch.arange(Bx) % 4][:, None]
    glob = torch.rand(Bx, Sx, generator=gen) < density
    pad = torch.rand(Bx, Sx, generator=gen) < 0.8
    pad[0] = True
    return glob.to(device), pad.to(device)


@pytest.mark.parametrize("Sx, G_", [(1, 1), (7, 0), (13, 5), (29, 29), (40, 12), (64, 40)])
@pytest.mark.parametrize("padded", [True, False])
def test_slots_kernel_emulation_matches_global_slots(Sx, G_, padded):
    """The slot kernel's algorithm (chunked prefix counts, the short second walk over [0, G) for the non-global slots)
    equals ``_longformer.global_slots`` bitwise, and writes every slot once."""
    from longattn.backends import _longformer

    glob, pad = _random_slot_masks(Sx * 7 + G_, 6, Sx)
    pad = pad if padded else None
    want = _longformer.global_slots(glob, pad, G_)
    for threads, items in ((4, 2), (3, 1)):
        got = _emulate_global_slots(glob, pad, G_, threads, items)
        for name, a, w in zip(("band_rows", "pos", "used"), got, want):
            assert torch.equal(a, w), (name, threads, items, a, w)


def _offsets(Bx, G_, H_, D_, C, b, g):
    """rows.cu's index arithmetic for slot (b, g): element e = h * D + d of split c of `parts` at
    part_offset + c * split_stride + e, and lse_parts of (h, c) at lse_base + h * G + c * lse_stride; glse at
    (b * H + h) * G + g. -> (parts index (C, H * D), lse index (C, H * D), glse index (H * D,), h, d)."""
    e = torch.arange(H_ * D_)
    h, d = e // D_, e % D_
    part_offset, split_stride = (b * C * G_ + g) * H_ * D_, G_ * H_ * D_
    c = torch.arange(C)[:, None]
    lse_index = (b * C * H_ + h) * G_ + g + c * (H_ * G_)
    return part_offset + c * split_stride + e, lse_index, (b * H_ + h) * G_ + g, h, d


def _emulate_rows(kind, x, pos, used, C, parts=None, lse_parts=None):
    """rows.cu's two kernels on flat tensors, through ``_offsets``, in float64 (this checks indexing, not
    rounding): "merge" -> (x updated, glse); "add" -> x updated."""
    Bx, Sx, H_, D_ = x.shape
    G_ = pos.shape[1]
    x = x.clone()
    flat_parts = None if parts is None else parts.reshape(-1).double()
    glse = torch.full((Bx * H_ * G_,), float("nan"))
    for b in range(Bx):
        for g in range(G_):
            part, lse_index, glse_index, h, d = _offsets(Bx, G_, H_, D_, C, b, g)
            row = int(pos[b, g])
            in_range = 0 <= row < Sx
            write = bool(used[b, g]) and in_range
            if kind == "add":
                if write:
                    x[b, row, h, d] += flat_parts[part].sum(0).to(x.dtype)
                continue
            if not used[b, g]:
                glse[glse_index[d == 0]] = float("inf")
                continue
            lse = lse_parts.reshape(-1)[lse_index].double()  # (C, H * D)
            finite = torch.where(lse == float("inf"), -float("inf"), lse)
            top = finite.amax(0)
            w = torch.exp(finite - torch.where(top == -float("inf"), 0.0, top))
            total = w.sum(0)
            seen = total > 0
            glse[glse_index[d == 0]] = torch.where(seen, top + torch.log(total), float("inf"))[d == 0].float()
            if write:
                x[b, row, h, d] = ((w * flat_parts[part]).sum(0) / torch.where(seen, total, 1.0)).to(x.dtype)
    return (x, glse.view(Bx, H_, G_)) if kind == "merge" else x


@pytest.mark.parametrize("C", [1, 3])
def test_rows_kernels_emulation_matches_the_torch_composition(C):
    """The index arithmetic of the merge / add kernels against what they replace: ``KeySplits.merge`` + masked_fill +
    where / scatter into out, ``KeySplits.sum_rows`` + scatter_add into dq. With unused slots, an out-of-range position
    (skipped), empty splits and a row with no key at all."""
    from longattn.backends import _longformer

    gen = torch.Generator().manual_seed(C)
    Bx, Sx, H_, D_, G_ = 2, 9, 3, 4, 4
    x = torch.randn(Bx, Sx, H_, D_, generator=gen, dtype=torch.float64)
    pos = torch.tensor([[7, 0, 3, 5], [2, 8, 4, 1]])
    used = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sp = _longformer.KeySplits(3 * C, 3)
    assert sp.C == C
    index = pos[:, :, None, None].expand(Bx, G_, H_, D_)
    # merge
    parts = torch.randn(Bx * C, G_, H_, D_, generator=gen, dtype=torch.float64)
    lse = torch.randn(Bx * C, H_, G_, generator=gen, dtype=torch.float64).float()
    lse[0, 1, 0] = float("inf")  # an empty split (all of them when C = 1)
    lse.view(Bx, C, H_, G_)[1, :, 2, 1] = float("inf")  # slot (1, 1), head 2: no key in any split
    no_key = (lse.view(Bx, C, H_, G_) == float("inf")).all(1).transpose(1, 2)  # (B, G, H)
    parts.view(Bx, C, G_, H_, D_)[no_key[:, None].expand(Bx, C, G_, H_)] = 0.0  # the band op's rows without keys
    out, glse = _emulate_rows("merge", x, pos, used, C, parts, lse)
    rows_out, rows_lse = sp.merge(parts, lse.double())
    want_glse = rows_lse.float().masked_fill(~used[:, None, :], float("inf"))
    want = x.scatter(1, index, torch.where(used[:, :, None, None], rows_out, torch.gather(x, 1, index)))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(glse, want_glse, rtol=1e-6, atol=1e-6)
    assert (glse[1, 2, 1] == float("inf")) and (out[1, 8, 2] == 0).all()
    # an out-of-range position of a used slot: nothing written, glse still the slot's
    bad = pos.clone()
    bad[0, 0] = Sx + 3
    out_bad, glse_bad = _emulate_rows("merge", x, bad, used, C, parts, lse)
    assert torch.equal(out_bad[0, 7], x[0, 7]) and torch.equal(glse_bad, glse)
    # add: the splits' dq rows summed into rows pos of dq (unused slots' rows are 0: glse = +inf)
    dparts = parts * used.repeat_interleave(C, 0)[:, :, None, None]
    got = _emulate_rows("add", x, pos, used, C, dparts)
    torch.testing.assert_close(got, x.scatter_add(1, index, sp.sum_rows(dparts)), rtol=1e-12, atol=1e-12)
    assert torch.equal(_emulate_rows("add", x, bad, used, C, dparts)[0, 7], x[0, 7])


# GPU: the glue kernels themselves, and the Longformer op with several key splits.


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("Sx", [1, 100, 4096, 5000, 20000])
@pytest.mark.parametrize("padded", [True, False])
def test_cuda_global_slots_bitwise(Sx, padded):
    """``cuda_backend.global_slots`` equals ``_longformer.global_slots`` bitwise on random masks: rows with few,
    many, all and no globals, padding, G from 0 to S (several chunks of the kernel's walk at S >= 4096), and
    strided masks read in place."""
    from longattn.backends import _longformer

    glob, pad = _random_slot_masks(Sx, 8, Sx, "cuda")
    pad = pad if padded else None
    for G_ in sorted({0, 1, min(7, Sx), Sx // 3, Sx // 2 + 1, Sx}):
        got = cuda_backend.global_slots(glob, pad, G_)
        want = _longformer.global_slots(glob, pad, G_)
        for name, a, w in zip(("band_rows", "pos", "used"), got, want):
            assert a.dtype == w.dtype and a.is_contiguous() and torch.equal(a, w), (name, Sx, G_)
    strided = (glob.T.contiguous().T, None if pad is None else pad.repeat_interleave(2, dim=1)[:, ::2])
    for a, w in zip(cuda_backend.global_slots(*strided, Sx // 2), _longformer.global_slots(glob, pad, Sx // 2)):
        assert torch.equal(a, w)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_rows_kernels_match_the_torch_composition(C, dtype):
    """The merge / add kernels against the torch composition they replace (``KeySplits.merge`` + masked_fill + where /
    scatter; ``KeySplits.sum_rows`` + scatter_add): within float32 rounding; unused slots and out-of-range positions
    untouched."""
    from longattn.backends import _longformer

    ops, dev = torch.ops.longattn, "cuda"
    gen = torch.Generator().manual_seed(C)
    Bx, Sx, H_, D_, G_ = 2, 300, 3, 64, 5
    x = torch.randn(Bx, Sx, H_, D_, generator=gen).to(dev, dtype)
    pos = torch.tensor([[7, 0, 299, 5, 100], [2, 8, 4, 1, 250]], device=dev)
    used = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]], device=dev)
    sp = _longformer.KeySplits(100 * C, 100)
    index = pos[:, :, None, None].expand(Bx, G_, H_, D_)
    parts = torch.randn(Bx * C, G_, H_, D_, generator=gen).to(dev, dtype)
    lse = torch.randn(Bx * C, H_, G_, generator=gen).to(dev)
    lse[0, 1, 0] = float("inf")
    lse.view(Bx, C, H_, G_)[1, :, 2, 1] = float("inf")
    no_key = (lse.view(Bx, C, H_, G_) == float("inf")).all(1).transpose(1, 2)
    parts.view(Bx, C, G_, H_, D_)[no_key[:, None].expand(Bx, C, G_, H_)] = 0
    out = x.clone()
    glse = ops.cuda_longformer_rows_merge(parts, lse, pos, used, out)
    rows_out, rows_lse = sp.merge(parts.float(), lse)
    want = x.scatter(1, index, torch.where(used[:, :, None, None], rows_out.to(dtype), torch.gather(x, 1, index)))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(glse, rows_lse.masked_fill(~used[:, None, :], float("inf")))
    dq = x.clone()
    dparts = parts * used.repeat_interleave(C, 0)[:, :, None, None]
    ops.cuda_longformer_rows_add(dparts, pos, used, dq)
    want = x.float().scatter_add(1, index, sp.sum_rows(dparts.float())).to(dtype)
    torch.testing.assert_close(dq, want)
    bad = pos.clone()
    bad[0, 0], bad[1, 0] = -3, 2**40
    out2, dq2 = x.clone(), x.clone()
    ops.cuda_longformer_rows_merge(parts, lse, bad, used, out2)
    ops.cuda_longformer_rows_add(dparts, bad, used, dq2)
    assert torch.equal(out2[0, 7], x[0, 7]) and torch.equal(dq2[1, 2], x[1, 2])


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("name", ["start-middle-end", "many", "projections-d32"])
def test_cuda_longformer_split_keys_within_rule(name, monkeypatch):
    """The global rows over several key splits, S not a multiple of the split size (64: S = 200 / 260 / 130 give 4 /
    5 / 3 splits, the last padded): against the fp64 oracle, then bitwise deterministic."""
    from longattn.backends import _longformer

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 64)
    out, got = _check_within_rule(name)
    out2, got2 = _run(name, CASES[name][-1], "cuda")
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(got, got2))


@pytest.mark.gpu
@gpu_ready
def test_opcheck_glue_ops():
    """Schemas (out / dq mutated in place), fakes against the CUDA implementations, and tracing of the glue ops."""
    ops, dev = torch.ops.longattn, "cuda"
    glob, pad = _random_slot_masks(0, 4, 50, dev)
    torch.library.opcheck(ops.cuda_longformer_global_slots.default, (glob, pad, 9))
    _, pos, used = cuda_backend.global_slots(glob, pad, 9)
    x = torch.randn(4, 50, 2, 32, device=dev, dtype=torch.float16)
    parts = torch.randn(12, 9, 2, 32, device=dev, dtype=torch.float16)
    lse = torch.randn(12, 2, 9, device=dev)
    torch.library.opcheck(ops.cuda_longformer_rows_merge.default, (parts, lse, pos, used, x.clone()))
    torch.library.opcheck(ops.cuda_longformer_rows_add.default, (parts, pos, used, x.clone()))
