"""The CUDA backend's halo keys, lse gradient and dropout offset (notes/halo_contract.md; csrc/band_side, kHalo
kernels).

CPU part (always runs): the backend's Python checks (ValueError naming the keyword, before any launch); the raw
ops' checks (their CPU registrations run the same checks, then say they need CUDA tensors); the fake shapes. The
kernels' tile walks and dropout keep bits are emulated in ``test_cuda_halo_emulation.py``.

GPU part (``@pytest.mark.gpu``, skipped without a CUDA device the extension was built for): out, lse and every
gradient (halo gradients included) against the fp64 oracle on the extended sequence (tests/reference.py,
``band_side_with_halo``) under the tolerance rule, the lse gradient with and without halo keys, with ranges and
with dropout, rows with lse = +inf, and determinism; dropout with halo keys and a dropout offset against the torch
backend in fp64, and a shard with its halo and offset against the whole sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from longattn.backends import cuda_backend

BUILT = cuda_backend._C is not None
needs_build = pytest.mark.skipif(not BUILT, reason=f"longattn._C is not built ({cuda_backend._IMPORT_ERROR})")
gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for")


# --------------------------------------------------------------------------------------------------------
# Python-side checks (cuda_backend, ValueError before any launch) and capabilities.
# --------------------------------------------------------------------------------------------------------

B, S, H, D, G, HL, HR, LEFT, RIGHT = 2, 10, 2, 32, 3, 2, 3, 3, 2


def _inputs(device="cpu", dtype=torch.float16):
    z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
    return dict(q=z(B, S, H, D), k=z(B, S, H, D), v=z(B, S, H, D), side_k=z(B, G, H, D), side_v=z(B, G, H, D),
                band_key_mask=None, side_mask=None, query_block=None, band_bias=None, side_bias=None, left=LEFT,
                right=RIGHT, scale=0.125)


def _halo(device="cpu", dtype=torch.float16, **over):
    kw = dict(halo_k=torch.zeros(B, HL + HR, H, D, dtype=dtype, device=device),
              halo_v=torch.zeros(B, HL + HR, H, D, dtype=dtype, device=device),
              halo_mask=torch.ones(B, HL + HR, dtype=torch.bool, device=device), halo_left=HL)
    kw.update(over)
    return kw


_DROP = {"dropout_p": 0.1, "rng": torch.zeros(2, dtype=torch.int64)}
PY_BAD = {  # keyword changes -> the keyword the ValueError must name
    "offset-odd": ({**_DROP, "dropout_offset": 6}, "dropout_offset"),
    "offset<0": ({**_DROP, "dropout_offset": -4}, "dropout_offset"),
    "offset-bool": ({**_DROP, "dropout_offset": True}, "dropout_offset"),
    "offset-float": ({**_DROP, "dropout_offset": 8.0}, "dropout_offset"),
    "offset-without-dropout": ({"dropout_offset": 8}, "dropout_offset"),
    "offset-huge": ({**_DROP, "dropout_offset": 2**31 - 128}, "dropout_offset"),
    "key_ranges": ({"key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)}, "key_ranges"),
    "no-halo_v": ({"halo_v": None}, "halo_v"),
    "halo_k-shape": ({"halo_k": torch.zeros(B, HL + HR, H, 2 * D, dtype=torch.float16)}, "halo_k"),
    "halo_v-shape": ({"halo_v": torch.zeros(B, HL + HR + 1, H, D, dtype=torch.float16)}, "halo_v"),
    "halo_k-dtype": ({"halo_k": torch.zeros(B, HL + HR, H, D, dtype=torch.bfloat16)}, "halo_k"),
    "halo_k-device": ({"halo_k": torch.zeros(B, HL + HR, H, D, dtype=torch.float16, device="meta")}, "halo_k"),
    "halo_v-strided": ({"halo_v": torch.zeros(B, HL + HR, H, 2 * D, dtype=torch.float16)[..., ::2]}, "halo_v"),
    "halo_left<0": ({"halo_left": -1}, "halo_left"),
    "halo_left>rows": ({"halo_left": HL + HR + 1}, "halo_left"),
    "halo_left-bool": ({"halo_left": True}, "halo_left"),
    "halo_mask-dtype": ({"halo_mask": torch.ones(B, HL + HR, dtype=torch.uint8)}, "halo_mask"),
    "halo_mask-shape": ({"halo_mask": torch.ones(B, HL + HR + 1, dtype=torch.bool)}, "halo_mask"),
    "left": ({"left": S + HL}, "left"),
    "right": ({"right": S + HR}, "right"),
}


@pytest.mark.parametrize("case", PY_BAD)
@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_backend_rejects_bad_halo_arguments(case, fn):
    change, name = PY_BAD[case]
    args, halo = _inputs(), _halo()
    extra = {k: v for k, v in change.items() if k in ("dropout_p", "rng", "key_ranges", "dropout_offset")}
    halo.update({k: v for k, v in change.items() if k.startswith("halo")})
    args.update({k: v for k, v in change.items() if k in ("left", "right")})
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        if fn == "forward":
            cuda_backend.band_side_forward(**args, **extra, **halo)
        else:
            rest = [args[n] for n in ("band_key_mask", "side_mask", "query_block", "band_bias", "side_bias", "left",
                                      "right", "scale")]
            cuda_backend.band_side_backward(args["q"], args["q"], args["k"], args["v"], args["side_k"],
                                            args["side_v"], args["q"], torch.zeros(B, H, S), *rest, **extra, **halo)


@pytest.mark.parametrize("change", [{"key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)}, {"global_rows": True}],
                         ids=["ranges", "global-rows"])
def test_backend_rejects_dropout_offset_with_ranges_or_global_rows(change):
    with pytest.raises(ValueError, match="^dropout_offset"):
        cuda_backend.band_side_forward(**_inputs(), **_DROP, dropout_offset=8, **change)


def test_backend_rejects_halo_pieces_without_halo_k():
    for extra in ({"halo_v": torch.zeros(B, 1, H, D)}, {"halo_mask": torch.ones(B, 1, dtype=torch.bool)},
                  {"halo_left": 1}):
        with pytest.raises(ValueError, match="^halo_k"):
            cuda_backend.band_side_forward(**_inputs(), **extra)


@pytest.mark.parametrize("dlse", [torch.zeros(B, H, S, dtype=torch.float16), torch.zeros(B, H, S + 1),
                                  torch.zeros(B, H, S, device="meta")])
def test_backend_rejects_bad_dlse(dlse):
    a = _inputs()
    with pytest.raises(ValueError, match="^dlse"):
        cuda_backend.band_side_backward(a["q"], a["q"], a["k"], a["v"], a["side_k"], a["side_v"], a["q"],
                                        torch.zeros(B, H, S), None, None, None, None, None, LEFT, RIGHT, 0.125,
                                        dlse=dlse)


def test_unsupported_reasons_accept_halo_lse_grad_and_dropout_offset(monkeypatch):
    monkeypatch.setattr(cuda_backend, "unavailable_reasons", lambda device: [])
    cuda = torch.device("cuda")
    for features in (("halo",), ("lse_grad",), ("halo", "lse_grad"), ("dropout", "ranges", "lse_grad"),
                     ("dropout", "halo", "dropout_offset", "lse_grad"), ("dropout", "dropout_offset")):
        assert cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side", features) == []
    for pair in (("ranges", "halo"), ("ranges", "dropout_offset")):
        assert any("together" in r for r in cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side",
                                                                            ("dropout", *pair)))
    assert any("'bogus'" in r for r in cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side",
                                                                        ("bogus",)))
    assert cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side", ("grouped_kv",))


# --------------------------------------------------------------------------------------------------------
# Raw-op checks (CPU registrations: the CUDA ones' checks, then NotImplementedError) and fake shapes.
# --------------------------------------------------------------------------------------------------------


def _raw_call(op_name, change=None, drop=()):
    """Call raw op `op_name` on CPU with valid halo arguments changed by `change` (name -> value), straight to the
    CPU kernel (a meta argument would otherwise select the fake)."""
    a, halo = _inputs(), _halo()
    args = dict(a)
    if op_name.endswith("bwd"):
        args = {"dout": a["q"], **{n: a[n] for n in ("q", "k", "v", "side_k", "side_v")}, "out": a["q"],
                "lse": torch.zeros(B, H, S), **{n: a[n] for n in list(a)[5:]}}
    args.update(dropout_p=0.0, rng=None, dropout_global_rows=False, key_ranges=None, side_ranges=None,
                dropout_offset=0, side_index=None, query_mask=None, band_rows_only=False, side_only=False, lse_split=1,
                dside_k_into=None, dside_v_into=None, query_index=None, **halo)
    if op_name.endswith("bwd"):
        args["dlse"] = torch.zeros(B, H, S)
    args.update(change or {})
    for name in drop:
        args[name] = None
    op = getattr(torch.ops.longattn, op_name).default
    positional = [args[x.name] for x in op._schema.arguments]
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *positional)


RAW_BAD = {  # change -> message pattern (after "<op>: ")
    "halo_v-missing": ({"halo_v": None}, r"halo_k and halo_v must be given together, got a tensor and None"),
    "halo_mask-alone": ({"halo_k": None, "halo_v": None, "halo_left": 0}, r"halo_mask needs halo_k"),
    "halo_left-alone": ({"halo_k": None, "halo_v": None, "halo_mask": None}, r"halo_left needs halo_k"),
    "halo_k-rank": ({"halo_k": torch.zeros(HL + HR, H, D, dtype=torch.float16)}, r"halo_k must have shape"),
    "halo_k-B": ({"halo_k": torch.zeros(B + 1, HL + HR, H, D, dtype=torch.float16)}, r"halo_k must have shape"),
    "halo_k-H": ({"halo_k": torch.zeros(B, HL + HR, H + 1, D, dtype=torch.float16)}, r"halo_k must have shape"),
    "halo_k-dtype": ({"halo_k": torch.zeros(B, HL + HR, H, D, dtype=torch.bfloat16)}, r"halo_k must have q's dtype"),
    "halo_k-device": ({"halo_k": torch.zeros(B, HL + HR, H, D, dtype=torch.float16, device="meta")},
                      r"halo_k must be on q's device"),
    "halo_k-strided": ({"halo_k": torch.zeros(B, HL + HR, H, 2 * D, dtype=torch.float16)[..., ::2]},
                       r"halo_k must have a contiguous last dim"),
    "halo_v-rows": ({"halo_v": torch.zeros(B, HL + HR + 1, H, D, dtype=torch.float16)}, r"halo_v must have shape"),
    "halo_k-huge": ({"halo_k": torch.zeros(1, dtype=torch.float16).expand(B, 1 << 30, H, D)},
                    r"S \+ halo_k's HL \+ HR must be < 2\^30"),
    "halo_left<0": ({"halo_left": -1}, r"halo_left must be in \[0, HL \+ HR\]"),
    "halo_left>rows": ({"halo_left": HL + HR + 1}, r"halo_left must be in \[0, HL \+ HR\]"),
    "halo_mask-dtype": ({"halo_mask": torch.ones(B, HL + HR, dtype=torch.uint8)}, r"halo_mask must be Bool"),
    "halo_mask-shape": ({"halo_mask": torch.ones(B, HL + HR + 1, dtype=torch.bool)}, r"halo_mask must have shape"),
    "halo_mask-strided": ({"halo_mask": torch.ones(HL + HR, B, dtype=torch.bool).T}, r"halo_mask must be contiguous"),
    "offset-odd": ({**_DROP, "dropout_offset": 6}, r"dropout_offset must be a non-negative multiple of 4"),
    "offset<0": ({**_DROP, "dropout_offset": -4}, r"dropout_offset must be a non-negative multiple of 4"),
    "offset-without-dropout": ({"dropout_offset": 8}, r"dropout_offset needs dropout_p > 0"),
    "offset-huge": ({**_DROP, "dropout_offset": (2**31 - 128 - S - HR + 3) // 4 * 4},  # the first too large
                    r"dropout_offset \+ S \+ HR must be < 2\^31 - 128"),
    "offset-global-rows": ({**_DROP, "dropout_offset": 8, "dropout_global_rows": True},
                           r"dropout_offset must be 0 with dropout_global_rows"),
    "offset-ranges": ({**_DROP, "dropout_offset": 8, "halo_k": None, "halo_v": None, "halo_mask": None,
                       "halo_left": 0, "side_ranges": torch.zeros(B, S, 2, dtype=torch.int32)},
                      r"key_ranges / side_ranges must be None with dropout_offset"),
    "key_ranges": ({"key_ranges": torch.zeros(B, S, 2, dtype=torch.int32)}, r"key_ranges must be None with halo"),
    "side_ranges": ({"side_ranges": torch.zeros(B, S, 2, dtype=torch.int32)}, r"side_ranges must be None with halo"),
    "left": ({"left": S + HL}, r"left must be in \[0, S \+ HL - 1\]"),
    "right": ({"right": S + HR}, r"right must be in \[0, S \+ HR - 1\]"),
}
RAW_BAD_BWD = {
    "dlse-dtype": ({"dlse": torch.zeros(B, H, S, dtype=torch.float16)}, r"dlse must be Float"),
    "dlse-shape": ({"dlse": torch.zeros(B, H, S + 1)}, r"dlse must have shape"),
    "dlse-device": ({"dlse": torch.zeros(B, H, S, device="meta")}, r"dlse must be on q's device"),
}


RAW_CASES = [(op, case) for op in ("cuda_band_side_fwd", "cuda_band_side_bwd") for case in RAW_BAD] + [
    ("cuda_band_side_bwd", case) for case in RAW_BAD_BWD]


@needs_build
@pytest.mark.parametrize("op,case", RAW_CASES)
def test_raw_op_rejects_bad_halo_and_dlse_arguments(op, case):
    change, pattern = {**RAW_BAD, **RAW_BAD_BWD}[case]
    drop = ("dlse",) if case.startswith(("halo", "offset")) else ()
    with pytest.raises(RuntimeError, match=rf"^{op}: {pattern}") as info:
        _raw_call(op, change, drop)
    assert not isinstance(info.value, NotImplementedError), info.value
    assert ", got " in str(info.value).split("\n")[0], info.value  # says what it was given


@needs_build
@pytest.mark.parametrize("op", ["cuda_band_side_fwd", "cuda_band_side_bwd"])
@pytest.mark.parametrize("change", [{}, {"halo_mask": None}, {"left": S + HL - 1, "right": S + HR - 1},
                                    {"halo_left": 0}, {"halo_left": HL + HR}, {"dlse": None},
                                    {"halo_k": torch.zeros(B, 0, H, D, dtype=torch.float16),
                                     "halo_v": torch.zeros(B, 0, H, D, dtype=torch.float16),
                                     "halo_mask": torch.ones(B, 0, dtype=torch.bool), "halo_left": 0},
                                    _DROP, {**_DROP, "dropout_offset": 8},
                                    {**_DROP, "dropout_offset": (2**31 - 128 - S - HR + 3) // 4 * 4 - 4},  # the largest
                                    {**_DROP, "dropout_offset": 8, "halo_k": None, "halo_v": None, "halo_mask": None,
                                     "halo_left": 0}],
                         ids=["all", "no-mask", "widest-window", "right-only", "left-only", "no-dlse", "empty",
                              "dropout", "dropout-offset", "large-offset", "offset-without-halo"])
def test_raw_op_accepts_valid_halo_arguments(op, change):
    change = {k: v for k, v in change.items() if k != "dlse" or op.endswith("bwd")}
    with pytest.raises(NotImplementedError, match=f"{op}: needs CUDA tensors"):
        _raw_call(op, change)


@needs_build
def test_fake_shapes_with_halo_and_dlse():
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(B, S, H, D, **meta)
    side = torch.empty(B, G, H, D, **meta)
    hk = torch.empty(B, HL + HR, H, D, **meta)
    ops = torch.ops.longattn
    out, lse = ops.cuda_band_side_fwd(q, q, q, side, side, None, None, None, None, None, 3, 2, 0.125, halo_k=hk,
                                      halo_v=hk, halo_left=HL)
    assert out.shape == (B, S, H, D) and lse.shape == (B, H, S)
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, None, None, None, 3, 2, 0.125,
                               halo_k=hk, halo_v=hk, halo_left=HL, dlse=lse)
    shapes = [tuple(t.shape) for t in g]
    assert shapes == [(B, S, H, D)] * 3 + [(B, G, H, D)] * 2 + [(0,)] * 2 + [(B, HL + HR, H, D)] * 2
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, None, None, None, 3, 2, 0.125)
    assert len(g) == 9 and g[7].shape == g[8].shape == (0,)


# --------------------------------------------------------------------------------------------------------
# GPU: the kernels against the fp64 oracle on the extended sequence.
# --------------------------------------------------------------------------------------------------------


def _gpu_case(S, HL, HR, left, right, *, G=3, Dh=64, dtype=torch.float16, masks=True, bias=True, seed=0,
              strided_halo=True, halo_mask=True, band_mask=True, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    Bc, Hc = 2, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n = HL + HR
    if strided_halo:  # (B, H, n, D) transposed: a non-contiguous halo, read in place
        hk, hv = (randn(Bc, Hc, n, Dh).transpose(1, 2) for _ in range(2))
    else:
        hk, hv = randn(Bc, n, Hc, Dh), randn(Bc, n, Hc, Dh)
    c = dict(q=randn(Bc, S, Hc, Dh), k=randn(Bc, S, Hc, Dh), v=randn(Bc, S, Hc, Dh), side_k=randn(Bc, G, Hc, Dh),
             side_v=randn(Bc, G, Hc, Dh), halo_k=hk, halo_v=hv, dout=randn(Bc, S, Hc, Dh),
             dlse=randn(Bc, Hc, S).float())
    c["band_key_mask"] = (torch.rand(Bc, S, generator=gen) > 0.2) if masks and band_mask else None
    c["side_mask"] = (torch.rand(Bc, G, generator=gen) > 0.3) if masks and G else None
    c["halo_mask"] = (torch.rand(Bc, n, generator=gen) > 0.2) if masks and halo_mask else None
    c["query_block"] = torch.randint(-1, max(G, 1), (Bc, S), generator=gen, dtype=torch.int32) if bias else None
    c["band_bias"] = randn(Hc, left + right + 1) if bias else None
    c["side_bias"] = randn(Hc, 2 * G + 1) if bias else None
    dev = {k: (None if t is None else t.to(device)) for k, t in c.items()}
    low = {k: (t.to(dtype) if t is not None and t.is_floating_point() and k != "dlse" else t) for k, t in dev.items()}
    return dev, low, dict(left=left, right=right, HL=HL, scale=Dh**-0.5)


_LEAVES = ("q", "k", "v", "side_k", "side_v", "band_bias", "side_bias", "halo_k", "halo_v")
_GRAD_NAMES = ("dq", "dk", "dv", "dside_k", "dside_v", "dband_bias", "dside_bias", "dhalo_k", "dhalo_v")


def _oracle(dev, low, w, *, with_halo=True, use_dlse=False, key_ranges=None):
    """fp64 out, lse and gradients (loss <out, dout> + <lse, dlse>) from the inputs rounded to the test dtype."""
    from tests import reference

    x = {k: (low[k].double().requires_grad_() if low[k] is not None else None) for k in _LEAVES}
    common = dict(side_k=x["side_k"], side_v=x["side_v"], window=(w["left"], w["right"]),
                  side_mask=dev["side_mask"], band_bias=x["band_bias"], side_bias=x["side_bias"], scale=w["scale"])
    if with_halo:
        out, lse = reference.band_side_with_halo(x["q"], x["k"], x["v"], x["halo_k"], x["halo_v"], w["HL"],
                                                 halo_mask=dev["halo_mask"], band_key_mask=dev["band_key_mask"],
                                                 query_block=dev["query_block"], **common)
    else:
        out, lse = reference.band_side_attention(x["q"], x["k"], x["v"], band_key_mask=dev["band_key_mask"],
                                                 query_block=dev["query_block"], key_ranges=key_ranges,
                                                 with_lse=True, **common)
    loss = (out * dev["dout"].to(low["dout"].dtype).double()).sum()
    if use_dlse:
        loss = loss + (torch.where(lse < math.inf, lse, 0.0) * dev["dlse"].double()).sum()
    leaves = [x[k] for k in _LEAVES if x[k] is not None and (with_halo or not k.startswith("halo"))]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    named = dict(zip([k for k in _LEAVES if x[k] is not None and (with_halo or not k.startswith("halo"))], grads))
    return out, lse, named


def _run(backend, low, w, *, with_halo=True, use_dlse=False, key_ranges=None, dropout=None):
    """(out, lse, {gradient name: tensor}) of `backend`'s band_side_forward / backward on the low-precision inputs
    (`dropout`: the dropout keywords, dropout_p, rng and maybe dropout_offset)."""
    args = [low[k] for k in ("q", "k", "v", "side_k", "side_v", "band_key_mask", "side_mask", "query_block",
                             "band_bias", "side_bias")]
    halo = dict(halo_k=low["halo_k"], halo_v=low["halo_v"], halo_mask=low["halo_mask"],
                halo_left=w["HL"]) if with_halo else {}
    ranges = {} if key_ranges is None else {"key_ranges": key_ranges}
    drop = dropout or {}
    out, lse = backend.band_side_forward(*args, w["left"], w["right"], w["scale"], **drop, **ranges, **halo)
    extra = {"dlse": low["dlse"].to(lse.dtype)} if use_dlse else {}
    grads = backend.band_side_backward(low["dout"], *args[:5], out, lse, *args[5:], w["left"], w["right"],
                                       w["scale"], **drop, **ranges, **halo, **extra)
    return out, lse, dict(zip(_GRAD_NAMES, grads))


def _compare(low, dev, w, backend=cuda_backend, **kw):
    """`backend` (the CUDA one; the torch one when the harness itself is checked on CPU) and the torch backend in
    the same dtype vs the fp64 oracle, by the tolerance rule."""
    from longattn.backends import torch_backend
    from tests.tolerance import assert_within_rule

    ref_out, ref_lse, ref_grads = _oracle(dev, low, w, **kw)
    out, lse, grads = _run(backend, low, w, **kw)
    b_out, b_lse, b_grads = _run(torch_backend, low, w, **kw)
    assert_within_rule("out", out, b_out, ref_out)
    finite = ref_lse < math.inf
    assert torch.equal(lse < math.inf, finite), "rows with no key must have lse = +inf"
    assert_within_rule("lse", lse[finite], b_lse[finite], ref_lse[finite])
    for name, leaf in zip(_GRAD_NAMES, _LEAVES):
        if leaf not in ref_grads:
            continue
        ref = ref_grads[leaf] if ref_grads[leaf] is not None else torch.zeros_like(low[leaf], dtype=torch.float64)
        assert grads[name].shape == ref.shape and grads[name].is_contiguous(), name
        assert_within_rule(name, grads[name], b_grads[name], ref, grad=True)
    return grads


GPU_HALO_CASES = [  # (S, HL, HR, left, right)
    (200, 70, 33, 70, 33),  # halo = window
    (130, 200, 150, 250, 200),  # halos wider than S, windows across them
    (37, 100, 90, 10, 20),  # halos wider than the window (unreached halo rows: zero gradient)
    (256, 64, 64, 64, 64),  # tile-aligned
    (100, 0, 0, 30, 30),  # empty halo: the plain kernels
    (90, 5, 0, 94, 0),  # one-sided
]


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("S,HL,HR,left,right", GPU_HALO_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_halo_matches_oracle(S, HL, HR, left, right, dtype):
    dev, low, w = _gpu_case(S, HL, HR, left, right, dtype=dtype)
    _compare(low, dev, w)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("Dh", [32, 128])
def test_halo_head_dims_and_contiguous_halo(Dh):
    dev, low, w = _gpu_case(150, 80, 40, 90, 45, Dh=Dh, G=0, bias=False, strided_halo=False)
    _compare(low, dev, w)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("with_halo", [False, True])
def test_dlse_matches_oracle(with_halo):
    # No band key mask and no halo mask: every row (the oracle's padded halo rows too) sees at least itself, so the
    # oracle's lse is differentiable everywhere.
    dev, low, w = _gpu_case(180, 40, 70, 50, 80, band_mask=False, halo_mask=False)
    if not with_halo:
        low["halo_k"] = low["halo_v"] = None
        w = {**w, "HL": 0}
    _compare(low, dev, w, with_halo=with_halo, use_dlse=True)


@pytest.mark.gpu
@gpu_ready
def test_dlse_with_key_ranges_matches_oracle():
    dev, low, w = _gpu_case(160, 0, 0, 40, 40, band_mask=False, halo_mask=False, bias=False, G=0)
    cuts = torch.tensor([0, 50, 51, 160])
    seq = torch.bucketize(torch.arange(160), cuts[1:], right=True)
    ranges = torch.stack([cuts[seq], cuts[seq + 1]], 1)[None].expand(2, 160, 2).to(torch.int32).contiguous().cuda()
    low["halo_k"] = low["halo_v"] = None
    _compare(low, dev, {**w, "HL": 0}, with_halo=False, use_dlse=True, key_ranges=ranges)


@pytest.mark.gpu
@gpu_ready
def test_dlse_with_dropout_matches_torch_backend_fp64():
    from longattn.backends import torch_backend
    from tests.tolerance import assert_within_rule

    dev, low, w = _gpu_case(150, 0, 0, 40, 30, band_mask=False)
    rng = torch.tensor([7, 0], dtype=torch.int64, device="cuda")
    args = ("q", "k", "v", "side_k", "side_v", "band_key_mask", "side_mask", "query_block", "band_bias", "side_bias")

    def run(backend, inputs):
        a = [inputs[k] for k in args]
        out, lse = backend.band_side_forward(*a, w["left"], w["right"], w["scale"], 0.1, rng)
        return backend.band_side_backward(inputs["dout"], *a[:5], out, lse, *a[5:], w["left"], w["right"],
                                          w["scale"], 0.1, rng, dlse=inputs["dlse"].to(lse.dtype))

    f64 = {k: (t.double() if t is not None and t.is_floating_point() else t) for k, t in low.items()}
    ref, base, got = run(torch_backend, f64), run(torch_backend, low), run(cuda_backend, low)
    for name, r, b, g in zip(_GRAD_NAMES, ref, base, got):
        if g.numel():
            assert_within_rule(name, g, b, r, grad=True)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("with_halo", [False, True])
def test_rows_without_keys_get_no_gradient_whatever_dlse(with_halo):
    dev, low, w = _gpu_case(100, 30, 30, 20, 20, G=0, bias=False)
    low["band_key_mask"][0] = False  # batch row 0: no band key ...
    if with_halo:
        low["halo_mask"][0] = False  # ... and no halo key: lse = +inf on every row
    else:
        low["halo_k"] = low["halo_v"] = None
        w = {**w, "HL": 0}
    out, lse, _ = _run(cuda_backend, low, w, with_halo=with_halo)
    assert torch.isinf(lse[0]).all()
    clean = _run(cuda_backend, {**low, "dlse": low["dlse"].masked_fill(torch.isinf(lse), 0.0)}, w,
                 with_halo=with_halo, use_dlse=True)[2]
    nan = _run(cuda_backend, {**low, "dlse": low["dlse"].masked_fill(torch.isinf(lse), math.nan)}, w,
               with_halo=with_halo, use_dlse=True)[2]
    for name, t in nan.items():
        assert torch.isfinite(t).all(), name
        assert torch.equal(t, clean[name]), name


@pytest.mark.gpu
@gpu_ready
def test_halo_is_deterministic_and_empty_halo_is_the_plain_op():
    dev, low, w = _gpu_case(300, 100, 77, 120, 90)
    first, second = _run(cuda_backend, low, w, use_dlse=True), _run(cuda_backend, low, w, use_dlse=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])
    dev, low, w = _gpu_case(300, 0, 0, 120, 90, halo_mask=False)
    plain = _run(cuda_backend, {**low, "halo_k": None, "halo_v": None}, {**w, "HL": 0}, with_halo=False)
    empty = _run(cuda_backend, low, w)
    assert torch.equal(plain[0], empty[0]) and torch.equal(plain[1], empty[1])
    assert all(torch.equal(plain[2][n], empty[2][n]) for n in plain[2])
    assert empty[2]["dhalo_k"].shape == (2, 0, 2, 64)


@pytest.mark.gpu
@gpu_ready
def test_opcheck_raw_ops_with_halo_dlse_and_dropout_offset():
    dev, low, w = _gpu_case(150, 30, 70, 60, 90)
    args = tuple(low[k] for k in ("q", "k", "v", "side_k", "side_v", "band_key_mask", "side_mask", "query_block",
                                  "band_bias", "side_bias")) + (w["left"], w["right"], w["scale"])
    halo = dict(halo_k=low["halo_k"], halo_v=low["halo_v"], halo_mask=low["halo_mask"], halo_left=w["HL"])
    ops = torch.ops.longattn
    torch.library.opcheck(ops.cuda_band_side_fwd.default, args, halo)
    out, lse = ops.cuda_band_side_fwd(*args, **halo)
    bwd_args = (low["dout"], *args[:5], out, lse, *args[5:])
    torch.library.opcheck(ops.cuda_band_side_bwd.default, bwd_args, {**halo, "dlse": low["dlse"]})
    torch.library.opcheck(ops.cuda_band_side_bwd.default, bwd_args, {"dlse": low["dlse"]})
    drop = dict(dropout_p=0.2, rng=torch.tensor([1, 0], dtype=torch.int64, device="cuda"), dropout_offset=32)
    torch.library.opcheck(ops.cuda_band_side_fwd.default, args, {**halo, **drop})
    torch.library.opcheck(ops.cuda_band_side_bwd.default, bwd_args, {**halo, **drop, "dlse": low["dlse"]})


# --------------------------------------------------------------------------------------------------------
# GPU: dropout with halo keys and a dropout offset (the torch backend in fp64 is the oracle: same bits).
# --------------------------------------------------------------------------------------------------------


def _within_rule(got, base, ref):
    """(out, lse, grads) triples: `got` against the fp64 `ref` by the tolerance rule, `base` the torch backend's."""
    from tests.tolerance import assert_within_rule

    assert_within_rule("out", got[0], base[0], ref[0])
    finite = ref[1] < math.inf
    assert torch.equal(got[1] < math.inf, finite), "rows with no key must have lse = +inf"
    assert_within_rule("lse", got[1][finite], base[1][finite], ref[1][finite])
    for name, g in got[2].items():
        if g.numel():
            assert g.shape == ref[2][name].shape, name
            assert_within_rule(name, g, base[2][name], ref[2][name], grad=True)


def _f64(low):
    return {k: (t.double() if t is not None and t.is_floating_point() else t) for k, t in low.items()}


DROPOUT_HALO_CASES = [  # (S, HL, HR, left, right, dropout_offset)
    (200, 70, 33, 70, 33, 72),  # halo = window, offset = HL rounded up to 4
    (130, 200, 150, 250, 200, 1000),  # halos wider than S
    (256, 64, 64, 64, 64, 64),  # tile-aligned
    (90, 5, 0, 94, 0, 0),  # halo keys with dropout, no offset
    (100, 0, 0, 30, 30, 2**20),  # an empty halo with an offset: the kHalo kernels without halo rows
]


def _check_dropout_with_halo(backend, device, S, HL, HR, left, right, offset, dtype):
    from longattn.backends import torch_backend

    _, low, w = _gpu_case(S, HL, HR, left, right, dtype=dtype, band_mask=False, halo_mask=False, device=device)
    drop = dict(dropout_p=0.3, rng=torch.tensor([11, 8], dtype=torch.int64, device=device),
                **({"dropout_offset": offset} if offset else {}))
    kw = dict(dropout=drop, use_dlse=True)
    _within_rule(_run(backend, low, w, **kw), _run(torch_backend, low, w, **kw),
                 _run(torch_backend, _f64(low), w, **kw))


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("S,HL,HR,left,right,offset", DROPOUT_HALO_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_with_halo_and_offset_matches_torch_backend(S, HL, HR, left, right, offset, dtype):
    _check_dropout_with_halo(cuda_backend, "cuda", S, HL, HR, left, right, offset, dtype)


@pytest.mark.gpu
@gpu_ready
def test_dropout_offset_without_halo_matches_torch_backend():
    from longattn.backends import torch_backend

    _, low, w = _gpu_case(150, 0, 0, 40, 30)
    drop = dict(dropout_p=0.2, rng=torch.tensor([3, 0], dtype=torch.int64, device="cuda"), dropout_offset=4)
    kw = dict(dropout=drop, with_halo=False)
    _within_rule(_run(cuda_backend, low, w, **kw), _run(torch_backend, low, w, **kw),
                 _run(torch_backend, _f64(low), w, **kw))


def _check_shard(backend, device, a, b, dtype, S=300, left=70, right=50):
    """Rows [a, b) of a sequence run on `backend` as a shard (halo keys cut from the sequence, dropout_offset = a)
    are rows [a, b) of the whole-sequence op with the same rng: out, lse and every gradient of a loss on those rows,
    within the tolerance rule of the whole sequence's fp64 torch-backend result (the CUDA kernels' tiles start at a,
    not at a multiple of 64, so only rounding may differ)."""
    from longattn.backends import torch_backend

    _, low, w = _gpu_case(S, 0, 0, left, right, dtype=dtype, halo_mask=False, device=device)
    hl, hr = min(left, a), min(right, S - b)
    rng = torch.tensor([21, 4], dtype=torch.int64, device=device)
    rows = slice(a, b)
    dout = low["dout"].clone()
    dout[:, :a] = 0
    dout[:, b:] = 0  # the loss sees rows [a, b) only
    whole = {**low, "dout": dout}

    def halo_of(x):
        return torch.cat([x[:, a - hl:a], x[:, b:b + hr]], 1)

    shard = {k: (t[:, rows] if k in ("q", "k", "v", "dout", "band_key_mask", "query_block") else t)
             for k, t in low.items()}
    shard.update(halo_k=halo_of(low["k"]), halo_v=halo_of(low["v"]), halo_mask=halo_of(low["band_key_mask"]))
    # The backends take the window clamped to the keys the shard and its halo hold, as the public API passes it (a
    # last shard has fewer keys to its right than the window): the band bias cut to the offsets that remain.
    left, right = min(w["left"], b - a + hl - 1), min(w["right"], b - a + hr - 1)
    offsets = slice(w["left"] - left, w["left"] + right + 1)
    if shard["band_bias"] is not None:
        shard["band_bias"] = shard["band_bias"][:, offsets].contiguous()
    got = _run(backend, shard, {**w, "HL": hl, "left": left, "right": right},
               dropout=dict(dropout_p=0.3, rng=rng, dropout_offset=a))

    def whole_rows(result):  # the whole sequence's rows [a, b), its gradients in the shard's layout
        out, lse, g = result
        g = dict(g, dq=g["dq"][:, rows], dk=g["dk"][:, rows], dv=g["dv"][:, rows], dhalo_k=halo_of(g["dk"]),
                 dhalo_v=halo_of(g["dv"]))
        if g.get("dband_bias") is not None:  # the offsets cut off see no key from rows [a, b): their gradient is 0
            assert not g["dband_bias"][:, : offsets.start].any() and not g["dband_bias"][:, offsets.stop :].any()
            g["dband_bias"] = g["dband_bias"][:, offsets]
        return out[:, rows], lse[:, :, rows], g

    kw = dict(with_halo=False, dropout=dict(dropout_p=0.3, rng=rng))
    _within_rule(got, whole_rows(_run(torch_backend, whole, {**w, "HL": 0}, **kw)),
                 whole_rows(_run(torch_backend, _f64(whole), {**w, "HL": 0}, **kw)))


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("a,b", [(0, 130), (64, 200), (100, 236), (260, 300)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shard_with_halo_and_dropout_offset_is_the_whole_sequence(a, b, dtype):
    _check_shard(cuda_backend, "cuda", a, b, dtype)


def test_dropout_halo_harness_on_cpu():
    """The two GPU checks above, run with the torch backend on CPU: the harness itself (shard slicing, halo cut,
    gradient mapping, keywords) holds, so a GPU failure is the kernels'."""
    from longattn.backends import torch_backend

    _check_shard(torch_backend, "cpu", 52, 100, torch.float32, S=120, left=30, right=20)
    _check_shard(torch_backend, "cpu", 100, 120, torch.float32, S=120, left=30, right=25)  # the last shard: clamped
    _check_dropout_with_halo(torch_backend, "cpu", 60, 30, 13, 30, 13, 32, torch.float32)
