"""The CUDA backend (``longattn._C``, sources in ``csrc/``).

CPU part (always runs): the extension imports when it was built, its raw ops are registered with the
expected schemas and have fake implementations, the backend says clearly why it cannot run on a CPU, and every
argument of every raw op is checked: each bad call raises a RuntimeError naming the argument (the CPU
registrations run the same checks as the CUDA ones), each in a child process so that a crash fails only its
own test; and the tiles the kernels visit with per-row key ranges (csrc/band_side/ranges.h), emulated and checked
against brute force.

GPU part (``@pytest.mark.gpu``, skipped with the reason when no CUDA device is visible): the same bad calls
on CUDA tensors, one ``torch.library.opcheck`` per raw op, and out-of-range block ids. The kernels themselves
(oracle matrix, long sequences, determinism, 64-bit offsets, block aggregation) are tested for both kernel
backends in tests/test_gpu_kernels.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import longattn
from longattn.backends import cuda_backend
from tests.conftest import make_case

BUILT = cuda_backend._C is not None
needs_build = pytest.mark.skipif(
    not BUILT, reason=f"longattn._C is not built ({cuda_backend._IMPORT_ERROR}); "
    "build with `pip install --no-build-isolation -e .` where nvcc is available")
gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for: "
    + ("; ".join(cuda_backend.unavailable_reasons(torch.device("cuda"))) if torch.cuda.is_available()
       else "no CUDA device visible"))

SCHEMAS = {
    "cuda_band_side_fwd":
        "longattn::cuda_band_side_fwd(Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, "
        "Tensor? band_key_mask, Tensor? side_mask, Tensor? query_block, Tensor? band_bias, Tensor? side_bias, "
        "int left, int right, float scale, float dropout_p=0., Tensor? rng=None, bool dropout_global_rows=False, "
        "Tensor? key_ranges=None, Tensor? side_ranges=None, Tensor? halo_k=None, Tensor? halo_v=None, "
        "Tensor? halo_mask=None, int halo_left=0, int dropout_offset=0, Tensor? side_index=None, "
        "Tensor? query_mask=None, bool band_rows_only=False, bool side_only=False, Tensor? query_index=None) -> "
        "(Tensor out, Tensor lse)",
    "cuda_band_side_bwd":
        "longattn::cuda_band_side_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, "
        "Tensor out, Tensor lse, Tensor? band_key_mask, Tensor? side_mask, Tensor? query_block, "
        "Tensor? band_bias, Tensor? side_bias, int left, int right, float scale, float dropout_p=0., "
        "Tensor? rng=None, bool dropout_global_rows=False, Tensor? key_ranges=None, Tensor? side_ranges=None, "
        "Tensor? halo_k=None, Tensor? halo_v=None, Tensor? halo_mask=None, int halo_left=0, Tensor? dlse=None, "
        "int dropout_offset=0, Tensor? side_index=None, bool side_only=False, int lse_split=1, "
        "Tensor(a!)? dside_k_into=None, Tensor(b!)? dside_v_into=None, Tensor? query_index=None) -> "
        "(Tensor dq, Tensor dk, Tensor dv, Tensor dside_k, Tensor dside_v, Tensor dband_bias, Tensor dside_bias, "
        "Tensor dhalo_k, Tensor dhalo_v)",
    "cuda_block_aggregate_fwd":
        "longattn::cuda_block_aggregate_fwd(Tensor x, Tensor block_ids, int num_blocks, Tensor? weight, "
        "float eps) -> (Tensor out, Tensor sums, Tensor rstd)",
    "cuda_block_aggregate_bwd":
        "longattn::cuda_block_aggregate_bwd(Tensor dout, Tensor x, Tensor block_ids, int num_blocks, "
        "Tensor? weight, Tensor sums, Tensor rstd, float eps) -> (Tensor dx, Tensor dweight)",
    # Longformer's glue ops: their argument checks are tested in tests/test_cuda_longformer.py.
    "cuda_longformer_global_slots":
        "longattn::cuda_longformer_global_slots(Tensor global_mask, Tensor? key_padding_mask, int G, "
        "Tensor(a!)? zero=None) -> (Tensor band_rows, Tensor pos, Tensor used)",
    "cuda_longformer_rows_merge":
        "longattn::cuda_longformer_rows_merge(Tensor out_parts, Tensor lse_parts, Tensor pos, Tensor used, "
        "Tensor(a!) out) -> Tensor glse",
    "cuda_longformer_rows_add":
        "longattn::cuda_longformer_rows_add(Tensor dq_parts, Tensor pos, Tensor used, Tensor(a!) dq, "
        "bool zero_fill=False) -> ()",
    # Longformer's fused forward: its checks are tested in tests/test_cuda_longformer_fused.py.
    "cuda_longformer_fwd":
        "longattn::cuda_longformer_fwd(Tensor q, Tensor k, Tensor v, Tensor band_rows, Tensor pos, Tensor used, "
        "Tensor? key_padding_mask, int left, int right, float scale, Tensor q_global, Tensor split_k, "
        "Tensor split_v, Tensor? split_mask, Tensor(a!) counter, Tensor? key_ranges=None, "
        "Tensor? side_ranges=None, Tensor? split_ranges=None) -> (Tensor out, Tensor lse, Tensor glse)",
    # Longformer's fused backward: likewise.
    "cuda_longformer_bwd":
        "longattn::cuda_longformer_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor glse, Tensor band_rows, Tensor pos, Tensor used, int left, int right, float scale, Tensor split_k, "
        "Tensor split_v, Tensor? split_mask, Tensor? key_ranges=None, Tensor? side_ranges=None, "
        "Tensor? split_ranges=None, Tensor? q_global=None, bool shared_kv=True) -> (Tensor dq, Tensor dk, Tensor dv, "
        "Tensor dq_global, Tensor dsplit_k, Tensor dsplit_v)",
}


# --------------------------------------------------------------------------------------------------------
# CPU-runnable
# --------------------------------------------------------------------------------------------------------


@needs_build
def test_extension_imports_and_reports_archs():
    import longattn._C as C

    assert isinstance(C.cuda_archs, str) and C.cuda_archs
    assert cuda_backend.built_archs(), f"could not parse cuda_archs={C.cuda_archs!r}"


@needs_build
@pytest.mark.parametrize("name", SCHEMAS)
def test_raw_op_schema(name):
    assert str(getattr(torch.ops.longattn, name).default._schema) == SCHEMAS[name]


def test_cpu_device_gives_a_clear_reason():
    reasons = longattn.available_backends("cpu")["cuda"]
    assert reasons, "the CUDA backend must not claim to run on a CPU"
    expected = "needs a CUDA device; got cpu" if BUILT else "longattn._C is not built"
    assert any(expected in r for r in reasons), reasons


def test_explicit_request_on_cpu_raises_with_reason():
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    expected = "needs a CUDA device; got cpu" if BUILT else "not built"
    with pytest.raises(longattn.BackendUnavailableError, match=expected):
        longattn.local_attention(q, q, q, 2, backend="cuda")
    x = torch.randn(1, 8, 4)
    with pytest.raises(longattn.BackendUnavailableError, match=expected):
        longattn.block_aggregate(x, torch.zeros(1, 8, dtype=torch.int32), 1, backend="cuda")


def test_unsupported_reasons_name_dtype_and_head_dim(monkeypatch):
    monkeypatch.setattr(cuda_backend, "unavailable_reasons", lambda device: [])
    cuda = torch.device("cuda")
    assert cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side") == []
    assert any("float16 / bfloat16" in r for r in cuda_backend.unsupported_reasons(cuda, torch.float32, 64,
                                                                                      "band_side"))
    assert any("head_dim" in r for r in cuda_backend.unsupported_reasons(cuda, torch.bfloat16, 16, "band_side"))
    assert cuda_backend.unsupported_reasons(cuda, torch.float32, 768, "block_aggregate") == []
    assert cuda_backend.unsupported_reasons(cuda, torch.float64, 768, "block_aggregate")


def test_arch_list_parsing(monkeypatch):
    class FakeC:
        cuda_archs = "8.0;9.0+PTX"

    monkeypatch.setattr(cuda_backend, "_C", FakeC)
    assert cuda_backend.built_archs() == [(8, 0, False), (9, 0, True)]
    assert cuda_backend._runs_on((8, 6))  # sm_80 cubin runs on 8.6
    assert cuda_backend._runs_on((10, 0))  # PTX of 9.0 JIT-compiles
    assert not cuda_backend._runs_on((7, 5))
    FakeC.cuda_archs = "9.0"
    assert not cuda_backend._runs_on((8, 0))


@needs_build
def test_fake_shapes_of_raw_ops():
    B, S, H, D, G = 2, 37, 3, 64, 5
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(B, H, S, D, **meta).transpose(1, 2)  # strided input; outputs are dense
    side = torch.empty(B, G, H, D, **meta)
    qb = torch.empty(B, S, device="meta", dtype=torch.int32)
    bb = torch.empty(H, 9, device="meta", dtype=torch.float32)
    sb = torch.empty(H, 2 * G + 1, device="meta", dtype=torch.float32)
    ops = torch.ops.longattn
    out, lse = ops.cuda_band_side_fwd(q, q, q, side, side, None, None, qb, bb, sb, 4, 4, 0.125)
    assert out.shape == (B, S, H, D) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, qb, bb, sb, 4, 4, 0.125)
    assert [tuple(t.shape) for t in g] == ([(B, S, H, D)] * 3 + [(B, G, H, D)] * 2 + [(H, 9), (H, 2 * G + 1)]
                                         + [(0,)] * 2)  # no halo keys: empty dhalo_k, dhalo_v
    assert all(t.is_contiguous() for t in g)
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, None, None, None, 4, 4, 0.125)
    assert g[5].shape == (0,) and g[6].shape == (0,)
    rng = torch.empty(2, device="meta", dtype=torch.int64)  # dropout changes no shape
    assert ops.cuda_band_side_fwd(q, q, q, side, side, None, None, qb, bb, sb, 4, 4, 0.125, 0.1, rng, True)[0].shape \
        == (B, S, H, D)
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, qb, bb, sb, 4, 4, 0.125, 0.1, rng)
    assert [tuple(t.shape) for t in g[:3]] == [(B, S, H, D)] * 3
    ranges = torch.empty(B, S, 2, device="meta", dtype=torch.int32)  # neither do per-row key ranges
    assert ops.cuda_band_side_fwd(q, q, q, side, side, None, None, qb, bb, sb, 4, 4, 0.125,
                                  key_ranges=ranges, side_ranges=ranges)[1].shape == (B, H, S)
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, qb, bb, sb, 4, 4, 0.125,
                               key_ranges=ranges, side_ranges=ranges)
    assert [tuple(t.shape) for t in g] == ([(B, S, H, D)] * 3 + [(B, G, H, D)] * 2 + [(H, 9), (H, 2 * G + 1)]
                                         + [(0,)] * 2)  # no halo keys: empty dhalo_k, dhalo_v

    x = torch.empty(B, S, 48, device="meta", dtype=torch.float16)
    ids = torch.empty(B, S, device="meta", dtype=torch.int32)
    w = torch.empty(48, device="meta", dtype=torch.float32)
    out, sums, rstd = ops.cuda_block_aggregate_fwd(x, ids, 7, w, 1e-6)
    assert out.shape == (B, 7, 48) and out.dtype == torch.float16
    assert sums.shape == (B, 7, 48) and sums.dtype == torch.float32 and rstd.shape == (B, 7)
    out, sums, rstd = ops.cuda_block_aggregate_fwd(x, ids, 7, None, 1e-6)
    assert sums.shape == (0,) and rstd.shape == (0,)
    dx, dw = ops.cuda_block_aggregate_bwd(out, x, ids, 7, w, sums, rstd, 1e-6)
    assert dx.shape == x.shape and dw.shape == (48,) and dw.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# Raw-op argument checks. The CPU registrations of the raw ops run the same checks as the CUDA ones and then
# raise NotImplementedError("needs CUDA tensors"), so every check is exercised here on CPU tensors. Each bad
# call runs in a child process (batched, one process for all of them): a crash fails that call's test only,
# and the calls after it run in a fresh child.
# --------------------------------------------------------------------------------------------------------

RAW_OPS = tuple(op for op in SCHEMAS if not op.startswith("cuda_longformer_"))
# Valid sizes; expanded (stride-0) tensors make the huge ones free. left + right + 1 = 6 band offsets.
DIMS = dict(B=2, S=10, H=2, D=32, G=3, left=3, right=2, C=8, num_blocks=4)
_TENSOR_DIMS = {  # argument -> (dims by name, dtype); q-like operands use q's dtype
    "q": ("BSHD", torch.float16), "k": ("BSHD", torch.float16), "v": ("BSHD", torch.float16),
    "dout_band": ("BSHD", torch.float16), "out": ("BSHD", torch.float16),
    "side_k": ("BGHD", torch.float16), "side_v": ("BGHD", torch.float16),
    "band_key_mask": ("BS", torch.bool), "side_mask": ("BG", torch.bool), "query_block": ("BS", torch.int32),
    "band_bias": ("HW", torch.float32), "side_bias": ("HT", torch.float32), "lse": ("BHS", torch.float32),
    "x": ("BSC", torch.bfloat16), "block_ids": ("BS", torch.int32), "weight": ("C", torch.float32),
    "dout_agg": ("BNC", torch.bfloat16), "sums": ("BNC", torch.float32), "rstd": ("BN", torch.float32),
    "rng": ("R", torch.int64),  # [seed, offset] of attention dropout
    "key_ranges": ("BSR", torch.int32), "side_ranges": ("BSR", torch.int32),  # per-row [lo, hi) key ranges
}
_CONTIGUOUS = {"key_ranges", "side_ranges"}  # read by computed offsets: must be contiguous (so no expanded zeros)
# Arguments every value of whose type is valid (so no bad call exists).
_NO_BAD_VALUE = {"dropout_global_rows"}
# Halo keys, the lse gradient and the dropout offset: left at their defaults here (halo keys and the offset exclude
# ranges, which the valid set uses); their bad calls are in tests/test_cuda_halo.py. Likewise Longformer's band-pass
# arguments (tests/test_cuda_longformer.py) and its global rows' (tests/test_cuda_global_rows.py).
_HALO_ARGS = {"halo_k", "halo_v", "halo_mask", "halo_left", "dlse", "dropout_offset", "side_index", "query_mask",
              "band_rows_only", "side_only", "lse_split", "dside_k_into", "dside_v_into", "query_index"}


def _sizes(letters, **dims):
    d = {**DIMS, **dims}
    size = dict(B=d["B"], S=d["S"], H=d["H"], D=d["D"], G=d["G"], W=d["left"] + d["right"] + 1,
                T=2 * d["G"] + 1, C=d["C"], N=d["num_blocks"], R=2)
    return [size[c] for c in letters]


def _zeros(shape, dtype, device):
    """A zero tensor of `shape`, expanded from one row (no memory for huge shapes); the last dim is dense unless
    it is huge itself (the size checks fire before the stride checks)."""
    row = shape[-1] if shape[-1] <= 1 << 20 else 1
    return torch.zeros(row, dtype=dtype, device=device).expand(*shape)


def _arg_key(op, name):
    return f"dout_{'band' if 'band' in op else 'agg'}" if name == "dout" else name


def raw_op_args(op, device, **dims):
    """A valid argument dict of raw op `op` on `device` (the checks read metadata only; values are zeros)."""
    d = {**DIMS, **dims}
    args = {}
    for arg in getattr(torch.ops.longattn, op).default._schema.arguments:
        if arg.name in _HALO_ARGS:
            args[arg.name] = arg.default_value
        elif arg.name in ("left", "right", "num_blocks"):
            args[arg.name] = d[arg.name]
        elif arg.name in ("scale", "eps"):
            args[arg.name] = 0.125 if arg.name == "scale" else 1e-6
        elif arg.name == "dropout_p":  # valid with dropout, so that the rng checks run
            args[arg.name] = 0.1
        elif arg.name == "dropout_global_rows":
            args[arg.name] = False
        else:
            letters, dtype = _TENSOR_DIMS[_arg_key(op, arg.name)]
            shape = _sizes(letters, **dims)
            args[arg.name] = (torch.zeros(shape, dtype=dtype, device=device) if arg.name in _CONTIGUOUS
                              else _zeros(shape, dtype, device))
    return args


@dataclasses.dataclass(frozen=True)
class BadCall:
    """One call of raw op `op` with a valid argument set changed by `mutate(args, device)`.

    `pattern`: regex the RuntimeError's message must match (it names the argument), None for the valid call.
    `dims`: sizes of the valid set. `other_device`: the change moves a tensor to another device; on CPU that
    tensor goes to "meta", and the call goes straight to the CPU kernel (with a meta argument the dispatcher
    would pick the fake implementation, which checks nothing).
    """

    op: str
    mutate: object
    pattern: str | None
    dims: tuple = ()
    other_device: bool = False


def _set(name, value):
    def mutate(args, device):
        args[name] = value(args[name], device) if callable(value) else value
    return mutate


def _resized(t, dim, size):
    shape = list(t.shape)
    shape[dim] = size
    return _zeros(shape, t.dtype, t.device)


def _strided_last_dim(t):
    return torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]


_BAD_DTYPE = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16, torch.bool: torch.uint8,
              torch.int32: torch.int64, torch.float32: torch.int32, torch.int64: torch.int32}
_FLOAT_STATS = ("lse", "sums", "rstd")  # float32 exactly: a wrong dtype is float16


def _tensor_cases(op, name, free_dims=(), dense_last_dim=False):
    """Bad variants of tensor argument `name`: another device, dtype and rank, each size off by one (except
    `free_dims`, which define a size the others follow), and a strided last dim where rows are read densely."""
    letters, dtype = _TENSOR_DIMS[_arg_key(op, name)]
    bad_dtype = torch.float16 if name in _FLOAT_STATS else _BAD_DTYPE[dtype]
    p = f"{op}: {name} must"
    cases = {
        "device": BadCall(op, _set(name, lambda t, dev: t.to("meta" if dev == "cpu" else "cpu")),
                          rf"{p} be on \w+'s device", other_device=True),
        "dtype": BadCall(op, _set(name, lambda t, dev: t.to(bad_dtype)), rf"{p} (be (?!on)|have \w+'s dtype)"),
        "rank": BadCall(op, _set(name, lambda t, dev: t.unsqueeze(0)), rf"{p} have shape"),
    }
    for dim, letter in enumerate(letters):
        if dim not in free_dims:
            cases[f"size{dim}-{letter}"] = BadCall(
                op, _set(name, lambda t, dev, dim=dim: _resized(t, dim, t.shape[dim] + 1)), rf"{p} have shape")
    if dense_last_dim:
        cases["strided-last-dim"] = BadCall(op, _set(name, lambda t, dev: _strided_last_dim(t)),
                                            rf"{p} have a contiguous last dim")
    return {f"{name}-{k}": v for k, v in cases.items()}


def _leader_cases(op, name, limits):
    """q / x: their sizes define everyone else's, so only dtype, rank, size limits and the last-dim rule."""
    letters, dtype = _TENSOR_DIMS[name]
    p = f"{op}: {name}"
    cases = {
        "dtype": BadCall(op, _set(name, lambda t, dev: t.to(torch.float64)), rf"{p} must be (float|bfloat)"),
        "rank": BadCall(op, _set(name, lambda t, dev: t[0]), rf"{p} must have shape \(B, S,"),
        "strided-last-dim": BadCall(op, _set(name, lambda t, dev: _strided_last_dim(t)),
                                    rf"{p} must have a contiguous last dim"),
    }
    for label, (letter, size, pattern) in limits.items():
        dim = letters.index(letter)
        cases[label] = BadCall(op, _set(name, lambda t, dev, dim=dim, size=size: _resized(t, dim, size)),
                               rf"{p}'s {pattern}")
    return {f"{name}-{k}": v for k, v in cases.items()}


def _band_side_cases(op):
    bwd = op.endswith("bwd")
    cases = _leader_cases(op, "q", {"D=16": ("D", 16, "head dim D must be 32, 64 or 128"),
                                    "B>65535": ("B", 65536, "B and H must be <= 65535"),
                                    "H>65535": ("H", 65536, "B and H must be <= 65535"),
                                    "S>=2^30": ("S", 1 << 30, "S must be < 2\\^30")})
    for name in ("k", "v") + (("dout", "out") if bwd else ()):
        cases.update(_tensor_cases(op, name, dense_last_dim=True))
    cases.update(_tensor_cases(op, "side_k", free_dims=(1,), dense_last_dim=True))
    cases.update(_tensor_cases(op, "side_v", dense_last_dim=True))
    for name in ("band_key_mask", "side_mask", "query_block", "band_bias", "side_bias", "rng", "key_ranges",
                 "side_ranges") + (("lse",) if bwd else ()):
        cases.update(_tensor_cases(op, name))
    for name in _CONTIGUOUS:  # (B, 2, S) transposed to (B, S, 2): right shape, not contiguous
        cases[f"{name}-not-contiguous"] = BadCall(
            op, _set(name, lambda t, dev: torch.zeros(t.shape[0], 2, t.shape[1], dtype=t.dtype, device=dev)
                     .transpose(1, 2)), rf"{op}: {name} must be contiguous")
    for value in (-0.1, 1.0, math.nan):
        cases[f"dropout_p={value}"] = BadCall(op, _set("dropout_p", value), rf"{op}: dropout_p must be in \[0, 1\)")
    cases["rng-missing"] = BadCall(op, _set("rng", None), rf"{op}: rng .* is required with dropout_p > 0")
    for name in ("left", "right"):
        for value in (-1, DIMS["S"]):
            cases[f"{name}={value}"] = BadCall(op, _set(name, value), rf"{op}: {name} must be in \[0, S - 1\]")
    for value in (math.inf, math.nan):
        cases[f"scale={value}"] = BadCall(op, _set("scale", value), rf"{op}: scale must be finite")
    cases["side_bias-without-query_block"] = BadCall(op, _set("query_block", None),
                                                     rf"{op}: query_block is required with side_bias")
    cases["side_k-G>=2^28"] = BadCall(op, _set("side_k", lambda t, dev: _resized(t, 1, 1 << 28)),
                                      rf"{op}: side_k's G must be < 2\^28")
    if bwd:  # B * S * H rows on the delta kernel's 1-D grid, 32 a CTA (launch.h): 65535^2 * 17 > 32 * (2^31 - 1)
        cases["B*S*H-grid"] = BadCall(op, lambda args, dev: None, rf"{op}: q's B \* S \* H must be <= 32 \*",
                                      dims=(("B", 65535), ("H", 65535), ("S", 17)))
    return cases


def _aggregate_cases(op):
    bwd = op.endswith("bwd")
    cases = _leader_cases(op, "x", {"B>65535": ("B", 65536, "B must be <= 65535"),
                                    "S>=2^31": ("S", 1 << 31, "S and C must be < 2\\^31"),
                                    "C>=2^31": ("C", 1 << 31, "S and C must be < 2\\^31")})
    cases.update(_tensor_cases(op, "block_ids"))
    cases.update(_tensor_cases(op, "weight"))
    if bwd:
        cases.update(_tensor_cases(op, "dout", dense_last_dim=True))
        cases.update(_tensor_cases(op, "sums"))
        cases.update(_tensor_cases(op, "rstd"))
    for value in (-1, 1 << 31):
        cases[f"num_blocks={value}"] = BadCall(op, _set("num_blocks", value), rf"{op}: num_blocks must be in")
    for value in (0.0, -1.0, math.inf, math.nan):
        cases[f"eps={value}"] = BadCall(op, _set("eps", value), rf"{op}: eps must be a finite positive float")
    return cases


def _all_calls():
    calls = {}
    for op in RAW_OPS:
        calls[f"{op}/valid"] = BadCall(op, lambda args, dev: None, None)
        cases = _band_side_cases(op) if "band_side" in op else _aggregate_cases(op)
        calls.update({f"{op}/{k}": v for k, v in cases.items()})
    return calls


RAW_OP_CALLS = _all_calls()
BAD_CALLS = [k for k, v in RAW_OP_CALLS.items() if v.pattern is not None]


def _call(case_id, device):
    """Run one call in this process; returns {"type": exception class name or None, "msg": message}."""
    call = RAW_OP_CALLS[case_id]
    args = raw_op_args(call.op, device, **dict(call.dims))
    call.mutate(args, device)
    op = getattr(torch.ops.longattn, call.op).default
    positional = [args[a.name] for a in op._schema.arguments]
    try:
        if call.other_device and device == "cpu":
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *positional)
        else:
            op(*positional)
        return {"type": None, "msg": ""}
    except Exception as exc:  # the outcome is the test's to judge
        return {"type": type(exc).__name__, "msg": str(exc)[:2000]}


def _child_main():
    """Child process: run the calls named on stdin, one JSON line before and after each. `crash_at` (tests of
    the harness only) names a call at which the child kills itself with SIGSEGV instead."""
    request = json.load(sys.stdin)
    for case_id in request["ids"]:
        print(json.dumps({"start": case_id}), flush=True)
        if case_id == request.get("crash_at"):
            os.kill(os.getpid(), signal.SIGSEGV)
        print(json.dumps({"id": case_id, **_call(case_id, request["device"])}), flush=True)


def run_calls_in_children(device, ids, crash_at=None):
    """{case id: outcome} for the calls `ids` of RAW_OP_CALLS, run in child processes on `device`. A child that
    dies (e.g. a segfault) fails the call it was running with type "crash"; the calls after it run in a new
    child."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from tests.test_cuda_backend import _child_main; _child_main()"
    outcomes, remaining = {}, list(ids)
    while remaining:
        request = {"device": device, "ids": remaining, "crash_at": crash_at}
        run = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), cwd=root,
                             capture_output=True, text=True, timeout=600)
        started = None
        for line in run.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                outcomes[record.pop("id")] = record
                started = None
        if run.returncode == 0 or started is None:  # done, or the child failed before its first call
            for case_id in remaining:
                outcomes.setdefault(case_id, {"type": "no result", "msg": run.stderr[-2000:]})
            break
        outcomes[started] = {"type": "crash", "msg": f"child exited with {run.returncode}: {run.stderr[-2000:]}"}
        remaining = remaining[remaining.index(started) + 1:]
    return outcomes


@functools.cache
def raw_op_outcomes(device):
    """Outcomes of every call in RAW_OP_CALLS on `device` (run once per session)."""
    return run_calls_in_children(device, list(RAW_OP_CALLS))


# Every message ends with what was given ("..., got [2, 29]"), but one. A message cut short (e.g. "... = [")
# is what an extension with its own static copy of libstdc++ produces (see README, Building from source).
_COMPLETE_MESSAGE = re.compile(r"(, got \S.*|is required with side_bias)$")


def rejection_problem(case_id, outcome):
    """Why `outcome` is not a RuntimeError naming the argument as RAW_OP_CALLS[case_id].pattern says, with its
    whole message; or None."""
    pattern = RAW_OP_CALLS[case_id].pattern
    message = outcome["msg"].split("\n")[0]
    if outcome["type"] != "RuntimeError":  # NotImplementedError would mean the check did not fire
        return f"{case_id}: expected RuntimeError matching {pattern!r}, got {outcome['type']}: {outcome['msg']}"
    if not re.search(pattern, message) or not _COMPLETE_MESSAGE.search(message):
        return f"{case_id}: message does not match {pattern!r} or is cut short: {outcome['msg']}"
    return None


@needs_build
@pytest.mark.parametrize("case_id", BAD_CALLS)
def test_raw_op_rejects_bad_argument_on_cpu(case_id):
    problem = rejection_problem(case_id, raw_op_outcomes("cpu")[case_id])
    assert problem is None, problem


@needs_build
@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_op_with_valid_cpu_arguments_needs_cuda(op):
    # The valid set passes every check (so each bad call above fails on its own argument), then the CPU
    # implementation refuses to compute.
    outcome = raw_op_outcomes("cpu")[f"{op}/valid"]
    assert outcome["type"] == "NotImplementedError", outcome
    assert f"{op}: needs CUDA tensors, got cpu tensors" in outcome["msg"], outcome


@needs_build
def test_a_crashing_call_fails_alone():
    # The harness itself: a child killed by SIGSEGV at the second call charges that call only; the third runs
    # in a new child.
    ids = [f"{op}/valid" for op in RAW_OPS[:3]]
    outcomes = run_calls_in_children("cpu", ids, crash_at=ids[1])
    assert outcomes[ids[1]]["type"] == "crash" and str(-signal.SIGSEGV) in outcomes[ids[1]]["msg"]
    assert outcomes[ids[0]]["type"] == outcomes[ids[2]]["type"] == "NotImplementedError", outcomes


@needs_build
def test_every_raw_op_argument_has_a_bad_call():
    for op in RAW_OPS:
        covered = {case_id.split("/")[1].split("-")[0].split("=")[0] for case_id in BAD_CALLS
                   if case_id.startswith(f"{op}/")}
        names = {a.name for a in getattr(torch.ops.longattn, op).default._schema.arguments} - _NO_BAD_VALUE - _HALO_ARGS
        assert names <= covered, f"{op}: no bad call for {sorted(names - covered)}"


# --------------------------------------------------------------------------------------------------------
# Per-row key ranges (csrc/band_side/ranges.h): the tiles the kernels visit, emulated on CPU statement by
# statement and checked against brute force. For any values no tile holding an attendable pair is skipped and a
# warp skips the element test only where every pair is inside its row's range; for packed sequences (monotone
# ranges) exactly the tiles holding an attendable pair are visited: forward / dQ key tiles, dK/dV query tiles.
# --------------------------------------------------------------------------------------------------------

_TILE, _WARP_ROWS, _INT_MAX, _INT_MIN = 64, 16, 2**31 - 1, -(2**31)


def _fold(ranges, rows):
    """RangeFold: (union lo, union hi) of the non-empty ranges of `rows`, (inner lo, inner hi) of all of them."""
    ulo, uhi, ilo, ihi = _INT_MAX, _INT_MIN, _INT_MIN, _INT_MAX
    for i in rows:
        lo, hi = ranges[i]
        ilo, ihi = max(ilo, lo), min(ihi, hi)
        if lo < hi:
            ulo, uhi = min(ulo, lo), max(uhi, hi)
    return ulo, uhi, ilo, ihi


def _clip_tiles(lo, hi, ulo, uhi):
    if ulo >= uhi:
        return range(0)
    lo, hi = max(lo, ulo), min(hi, uhi - 1)
    return range(0) if lo > hi else range(lo // _TILE, hi // _TILE + 1)


def _query_tile_walk(S, G, left, right, m0, key_ranges, side_ranges):
    """query_tile_ranges: (band key tiles, side-key tiles) of query tile m0."""
    rows = range(m0, min(m0 + _TILE, S))
    win_lo, win_hi = max(0, m0 - left), min(S - 1, min(S - 1, m0 + _TILE - 1) + right)
    band = (range(win_lo // _TILE, win_hi // _TILE + 1) if key_ranges is None
            else _clip_tiles(win_lo, win_hi, *_fold(key_ranges, rows)[:2]))
    side = (range((G + _TILE - 1) // _TILE) if side_ranges is None
            else _clip_tiles(0, G - 1, *_fold(side_ranges, rows)[:2]))
    return band, side


def _narrowed(S, ranges, key0, limit, q_first, q_count):
    """narrow_query_tiles: the dK/dV query tiles of key tile key0 (limit: S or G)."""
    if ranges is None:
        return range(q_first, q_first + q_count)
    key_end = min(key0 + _TILE, limit)
    hits = [i for i in range(q_first * _TILE, min(S, (q_first + q_count) * _TILE))
            if max(ranges[i][0], key0) < min(ranges[i][1], key_end)]
    return range(hits[0] // _TILE, hits[-1] // _TILE + 1) if hits else range(0)


def _tiles_of(pairs, axis):
    """Tiles holding a True pair of a bool (queries, keys) matrix: {query tile: key tiles} grouped by query tile
    (axis 1) or {key tile: query tiles} (axis 0)."""
    n, m = pairs.shape
    padded = torch.zeros(-(-n // _TILE) * _TILE, -(-m // _TILE) * _TILE, dtype=torch.bool)
    padded[:n, :m] = pairs
    tiles = padded.view(padded.shape[0] // _TILE, _TILE, -1, _TILE).any(3).any(1)  # (query tiles, key tiles)
    tiles = tiles if axis == 1 else tiles.T
    return {r: set(row.nonzero().flatten().tolist()) for r, row in enumerate(tiles) if row.any()}


def _check_tile_walks(S, G, left, right, key_ranges, side_ranges, exact, chunk_tiles=2):
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    band = (j >= i - left) & (j <= i + right)
    side = torch.ones(S, G, dtype=torch.bool)
    if key_ranges is not None:
        band &= (j >= key_ranges[:, :1]) & (j < key_ranges[:, 1:])
    if side_ranges is not None:
        side &= (torch.arange(G)[None] >= side_ranges[:, :1]) & (torch.arange(G)[None] < side_ranges[:, 1:])
    kr = None if key_ranges is None else key_ranges.tolist()
    sr = None if side_ranges is None else side_ranges.tolist()
    n_q = (S + _TILE - 1) // _TILE
    need_band, need_side = _tiles_of(band, 1), _tiles_of(side, 1)  # query tile -> key tiles it needs
    for m0 in range(0, S, _TILE):
        got_band, got_side = (set(t) for t in _query_tile_walk(S, G, left, right, m0, kr, sr))
        for need, got, what in ((need_band, got_band, "band"), (need_side, got_side, "side")):
            want = need.get(m0 // _TILE, set())
            assert want <= got, f"query tile {m0}: {what} key tiles {sorted(want - got)} skipped"
            assert not exact or got == want, f"query tile {m0}: {what} key tiles {sorted(got - want)} not needed"
        # A warp's element test is skipped only where its rows' ranges all hold the whole tile.
        for w0 in range(m0, min(m0 + _TILE, S), _WARP_ROWS):
            rows = range(w0, min(w0 + _WARP_ROWS, S))
            for ranges, tiles, valid in ((kr, got_band, band), (sr, got_side, side)):
                if ranges is None:
                    continue
                ilo, ihi = _fold(ranges, rows)[2:]
                for t in tiles:
                    first, last = t * _TILE, min(t * _TILE + _TILE, valid.shape[1]) - 1
                    if ilo <= t * _TILE and t * _TILE + _TILE <= ihi:
                        assert all(ranges[r][0] <= first and last < ranges[r][1] for r in rows)
    need_q_band, need_q_side = _tiles_of(band, 0), _tiles_of(side, 0)  # key tile -> query tiles it needs
    for n0 in range(0, S, _TILE):  # dK/dV band CTAs: BandQueryTiles, then narrowed
        lo, hi = max(0, n0 - right), min(S - 1, min(S - 1, n0 + _TILE - 1) + left)
        got = set(_narrowed(S, kr, n0, S, lo // _TILE, hi // _TILE - lo // _TILE + 1))
        want = need_q_band.get(n0 // _TILE, set())
        assert want <= got and (not exact or got == want), f"key tile {n0}: query tiles {sorted(got)} vs {sorted(want)}"
    for n0 in range(0, G, _TILE):  # dK/dV side CTAs: one per chunk of query tiles
        want_all = need_q_side.get(n0 // _TILE, set())
        for q_first in range(0, n_q, chunk_tiles):
            got = set(_narrowed(S, sr, n0, G, q_first, min(chunk_tiles, n_q - q_first)))
            want = {t for t in want_all if q_first <= t < q_first + chunk_tiles}
            assert want <= got and (not exact or got == want), f"side tile {n0}, chunk {q_first}: {got} vs {want}"


def _packed_ranges(lengths, blocks_per_token=16):
    """key_ranges / side_ranges (S, 2) of packed sequences: each row sees its own sequence's tokens and blocks."""
    cu = torch.tensor([0] + lengths).cumsum(0)
    cu_blocks = torch.tensor([0] + [-(-n // blocks_per_token) for n in lengths]).cumsum(0)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (torch.stack([cu[seq], cu[seq + 1]], 1), torch.stack([cu_blocks[seq], cu_blocks[seq + 1]], 1),
            int(cu[-1]), int(cu_blocks[-1]))


@pytest.mark.parametrize("lengths,window", [
    ([1, 63, 64, 65, 2, 130, 7], (20, 9)),  # length 1, < window, not tile multiples, tile-aligned
    ([300], (100, 0)),
    ([5] * 40, (70, 70)),  # many short sequences, window wider than each
    ([129, 1, 1, 190], (0, 0)),
])
def test_range_tile_walks_on_packed_sequences_are_exact(lengths, window):
    key_ranges, side_ranges, S, G = _packed_ranges(lengths)
    _check_tile_walks(S, G, *window, key_ranges, side_ranges, exact=True)
    _check_tile_walks(S, G, *window, key_ranges, None, exact=False)  # one kind given, the other unrestricted
    _check_tile_walks(S, G, *window, None, side_ranges, exact=False)


@pytest.mark.parametrize("seed", range(4))
def test_range_tile_walks_never_skip_a_pair_for_any_values(seed):
    gen = torch.Generator().manual_seed(seed)
    S, G = 200 + 37 * seed, 70 + 20 * seed
    window = tuple(torch.randint(0, S, (2,), generator=gen).tolist())
    # Non-monotone, empty, reversed and out-of-range values (the kernels only ever mask with them).
    key_ranges = torch.randint(-30, S + 30, (S, 2), generator=gen)
    side_ranges = torch.randint(-30, G + 30, (S, 2), generator=gen)
    _check_tile_walks(S, G, *window, key_ranges, side_ranges, exact=False)


# --------------------------------------------------------------------------------------------------------
# GPU (the kernels against the oracle, determinism and 64-bit offsets are tested for both kernel backends in
# tests/test_gpu_kernels.py; here: what is specific to the raw ops of longattn._C)
# --------------------------------------------------------------------------------------------------------


def _opcheck_inputs():
    case = make_case(B=2, S=150, H=2, D=64, window=(20, 9), G=3, bias=True, padding="tail", side_padding=True,
                     device="cuda").cast(torch.float16)
    qb = case.query_block.to(torch.int32)
    bb, sb = case.rel_bias.detach().float(), case.side_bias.detach().float()
    q, k, v, sk, sv = (t.detach() for t in (case.q, case.k, case.v, case.side_k, case.side_v))
    return q, k, v, sk, sv, case.key_padding_mask, case.side_mask, qb, bb, sb


@pytest.mark.gpu
@gpu_ready
def test_opcheck_raw_ops():
    q, k, v, sk, sv, bkm, sm, qb, bb, sb = _opcheck_inputs()
    fwd_args = (q, k, v, sk, sv, bkm, sm, qb, bb, sb, 20, 9, 0.125)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_fwd.default, fwd_args)
    out, lse = torch.ops.longattn.cuda_band_side_fwd(*fwd_args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_bwd.default,
                          (dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, bb, sb, 20, 9, 0.125))
    drop = (0.1, torch.tensor([123, 8], dtype=torch.int64, device="cuda"), False)  # dropout_p, rng, global rows
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_fwd.default, fwd_args + drop)
    out, lse = torch.ops.longattn.cuda_band_side_fwd(*fwd_args, *drop)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_bwd.default,
                          (dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, bb, sb, 20, 9, 0.125, *drop))
    B, S = q.shape[:2]  # per-row key ranges: sequences of 70 tokens, each seeing side keys [s, s + 1]
    seq = torch.arange(S, device="cuda", dtype=torch.int32) // 70
    key_ranges = torch.stack([seq * 70, (seq * 70 + 70).clamp(max=S)], -1).expand(B, S, 2).contiguous()
    side_ranges = torch.stack([seq, seq + 2], -1).expand(B, S, 2).contiguous()
    ranged = drop + (key_ranges, side_ranges)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_fwd.default, fwd_args + ranged)
    out, lse = torch.ops.longattn.cuda_band_side_fwd(*fwd_args, *ranged)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_bwd.default,
                          (dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, bb, sb, 20, 9, 0.125, *ranged))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 100, 32, generator=gen).to(torch.bfloat16).cuda()
    ids = torch.randint(-1, 7, (2, 100), generator=gen, dtype=torch.int32).cuda()
    weight = (1 + 0.1 * torch.randn(32, generator=gen)).cuda()
    torch.library.opcheck(torch.ops.longattn.cuda_block_aggregate_fwd.default, (x, ids, 7, weight, 1e-6))
    out, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, 7, weight, 1e-6)
    torch.library.opcheck(torch.ops.longattn.cuda_block_aggregate_bwd.default,
                          (torch.randn_like(out), x, ids, 7, weight, sums, rstd, 1e-6))


@pytest.mark.gpu
@gpu_ready
def test_raw_op_rejects_bad_arguments_on_gpu():
    # The same calls as on CPU, with CUDA tensors (a tensor on the wrong device is a CPU one): the CUDA
    # implementations raise the same errors before any CUDA work, and the valid sets compute.
    outcomes = raw_op_outcomes("cuda")
    problems = [rejection_problem(case_id, outcomes[case_id]) for case_id in BAD_CALLS]
    problems += [f"{op}/valid: {outcomes[f'{op}/valid']}" for op in RAW_OPS if outcomes[f"{op}/valid"]["type"]]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


@pytest.mark.gpu
@gpu_ready
def test_raw_op_clamps_out_of_range_query_block():
    # Values inside tensors are not checked (a device sync); block ids outside [-1, G-1] are clamped in the
    # kernels, never read out of bounds.
    q, k, v, sk, sv, bkm, sm, qb, bb, sb = _opcheck_inputs()
    bad = torch.full_like(qb, 10**6)
    out, _ = torch.ops.longattn.cuda_band_side_fwd(q, k, v, sk, sv, bkm, sm, bad, bb, sb, 20, 9, 0.125)
    assert torch.isfinite(out).all()
