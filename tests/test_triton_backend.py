"""The Triton backend against the fp64 oracle with the tolerance rule (tests/tolerance.py).

Runs on a CUDA GPU, or on CPU under Triton's interpreter: ``TRITON_INTERPRET=1 pytest tests/test_triton_backend.py``
(the variable must be set before Triton is imported, hence on the command line). Without either, the whole
module skips with that reason. CPU shapes are small (the interpreter runs every tile op in numpy) but cross
several 16 x 16 tiles, so edge tiles, mask-free interior tiles and multiple side-key tiles all run.
The baseline of the rule is the torch backend in the same dtype.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import longattn
from longattn.dispatch import BackendUnavailableError
from tests import reference
from tests.conftest import INTERPRET, check_backend_against_oracle, grads, make_case, needs_triton, run_sm90_compile
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.tolerance import assert_within_rule

pytestmark = needs_triton

# (B, S, H, D, window, G, options). With 16 x 16 interpreter tiles a band has mask-free interior tiles only
# when W = left + right + 1 >= 31, so some windows are chosen that wide on purpose.
CASES = {
    "odd-S-side-bias-padded": dict(B=2, S=37, H=2, D=16, window=(4, 3), G=3, bias=True, padding="tail",
                                   side_padding=True),
    "interior-tiles-asymmetric": dict(B=1, S=75, H=2, D=16, window=(40, 10), G=2, bias=True),
    "causal": dict(B=2, S=70, H=1, D=32, window=(33, 0), G=0),
    "anti-causal-side": dict(B=1, S=33, H=2, D=16, window=(0, 7), G=4, bias=True),
    "window>=S": dict(B=1, S=23, H=2, D=16, window=(40, 23), G=0, bias=True),
    "window-0": dict(B=2, S=29, H=2, D=16, window=(0, 0), G=0),
    "S=1": dict(B=2, S=1, H=3, D=16, window=(2, 2), G=1, bias=True),
    "all-padding-row": dict(B=2, S=40, H=2, D=16, window=(5, 5), G=3, padding="rows", side_padding=True),
    "non-contiguous": dict(B=2, S=45, H=2, D=32, window=(6, 9), G=2, bias=True, layout="bhsd"),
    "many-side-keys": dict(B=2, S=48, H=2, D=16, window=(3, 3), G=24, bias=True, side_padding=True),
    "D=64": dict(B=1, S=40, H=2, D=64, window=(5, 5), G=2, bias=True, padding="tail"),
}


def _run_and_check(case, dtype):
    """Forward and every gradient of ``case`` on the triton backend within the rule; returns (out, grads)."""
    _, out, got = check_backend_against_oracle(case, "triton", dtype)
    return out, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_band_side_matches_oracle(name, dtype):
    _run_and_check(make_case(**CASES[name], device=DEVICE), dtype)


@pytest.mark.parametrize("D", [24, 128])
def test_head_dims_padded_or_large(D):
    # D = 24 is padded to 32 inside the kernels (masked columns); 128 is the largest supported.
    _run_and_check(make_case(B=1, S=21, H=2, D=D, window=(3, 8), G=2, bias=True, device=DEVICE), torch.float32)


def test_fully_masked_rows_give_zero_output_and_zero_grads():
    # Row 0 is all padding and sees no side key: no key at all. Row 1 keeps one side key.
    case = make_case(B=2, S=20, H=2, D=16, window=(2, 2), G=2, padding="rows", bias=True, device=DEVICE)
    case.side_mask = torch.tensor([[False, False], [True, False]], device=DEVICE)
    out, (dq, *_rest) = _run_and_check(case, torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(dq[0], torch.zeros_like(dq[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_local_attention_api(dtype):
    case = make_case(B=2, S=35, H=2, D=16, window=(20, 12), G=0, bias=True, padding="tail", device=DEVICE)
    ref = reference.band_side_attention(case.q, case.k, case.v, window=case.window,
                                        band_key_mask=case.key_padding_mask, band_bias=case.rel_bias)
    results = {}
    for backend in ("torch", "triton"):
        c = case.cast(dtype)
        out = longattn.local_attention(c.q, c.k, c.v, c.window, key_padding_mask=c.key_padding_mask,
                                       rel_bias=c.rel_bias, backend=backend)
        results[backend] = (out, grads(out, [c.q, c.k, c.v, c.rel_bias]))
    assert_within_rule("out", results["triton"][0], results["torch"][0], ref)
    for name, g, b, r in zip(["dq", "dk", "dv", "drel_bias"], results["triton"][1], results["torch"][1],
                             grads(ref, [case.q, case.k, case.v, case.rel_bias])):
        assert_within_rule(name, g, b, r, grad=True)


@pytest.mark.parametrize("max_globals", [None, 18, 50], ids=["counted", "exact", "more-than-S"])
def test_longformer_api_with_globals(max_globals):
    B, S, H, D = 2, 45, 2, 16
    case = make_case(B=B, S=S, H=H, D=D, G=0, device=DEVICE)
    glob = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    glob[0, [0, 22, 44]] = True  # start, middle, end
    glob[1, :18] = True  # many (more than one side-key tile)
    pad = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    pad[1, 40:] = False
    ref = reference.longformer_attention(case.q, case.k, case.v, 4, glob, key_padding_mask=pad)
    ref_grads = grads(ref, [case.q, case.k, case.v])
    results = {}
    for backend in ("torch", "triton"):
        c = case.cast(torch.float32)
        out = longattn.longformer_attention(c.q, c.k, c.v, 4, glob, key_padding_mask=pad, max_globals=max_globals,
                                            backend=backend)
        results[backend] = (out, grads(out, [c.q, c.k, c.v]))
    assert_within_rule("out", results["triton"][0], results["torch"][0], ref)
    for name, g, b, r in zip(["dq", "dk", "dv"], results["triton"][1], results["torch"][1], ref_grads):
        assert_within_rule(name, g, b, r, grad=True)


def test_backward_is_deterministic():
    # Bitwise across two identical calls: the output and the gradient of every input (no atomics anywhere).
    case = make_case(B=1, S=40, H=2, D=16, window=(7, 20), G=5, bias=True, padding="tail", side_padding=True,
                     device=DEVICE).cast(torch.float16)
    names = ["out", *case.grad_names()]
    runs = []
    for _ in range(2):
        out = case.run("triton")
        runs.append([out, *grads(out, case.leaves())])
    assert len(names) == len(runs[0]) == 8
    for name, a, b in zip(names, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# --------------------------------------------------------------------------------------------------------
# block_aggregate
# --------------------------------------------------------------------------------------------------------


def _aggregate_inputs(B, S, C, G, *, ids="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=gen, dtype=torch.float64)
    if ids == "random":  # unsorted, with dropped tokens (-1) anywhere
        block_ids = torch.randint(-1, G, (B, S), generator=gen)
    else:  # LongT5's ids with padding at the end of row 1 (orphans join the last full block)
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, S // 2 :] = False
        block_ids, _ = longattn.tglobal_block_ids(mask, S // G)
    weight = 1.0 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), block_ids.to(DEVICE), weight.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["sums", "rmsnorm"])
@pytest.mark.parametrize("shape", [(2, 37, 24, 5, "random"), (2, 64, 70, 4, "longt5")],
                         ids=["random-ids", "longt5-ids-C70"])
def test_block_aggregate_matches_oracle(shape, weighted, dtype):
    B, S, C, G, ids = shape
    x, block_ids, weight = _aggregate_inputs(B, S, C, G, ids=ids)
    w = weight if weighted else None
    leaves = [x.requires_grad_(True)] + ([weight.requires_grad_(True)] if weighted else [])
    ref = reference.block_aggregate(x, block_ids, G, weight=w)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, leaves, cot)
    results = {}
    for backend in ("torch", "triton"):
        cast = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
        out = longattn.block_aggregate(cast[0], block_ids, G, weight=cast[1] if weighted else None,
                                       backend=backend)
        results[backend] = (out, torch.autograd.grad(out, cast, cot.to(dtype)))
    out, got = results["triton"]
    assert out.dtype == dtype and out.shape == (B, G, C)
    assert_within_rule("out", out, results["torch"][0], ref)
    for name, g, b, r in zip(["dx", "dweight"], got, results["torch"][1], ref_grads):
        assert_within_rule(name, g, b, r, grad=True)
    dropped = block_ids < 0
    assert torch.equal(got[0][dropped], torch.zeros_like(got[0][dropped]))


def test_block_aggregate_no_blocks_and_determinism():
    x, _, weight = _aggregate_inputs(2, 20, 16, 2)
    out = longattn.block_aggregate(x.float(), torch.full((2, 20), -1, device=DEVICE), 0, backend="triton")
    assert out.shape == (2, 0, 16)
    x, block_ids, weight = _aggregate_inputs(2, 50, 40, 6)
    x, weight = x.float().requires_grad_(True), weight.float().requires_grad_(True)
    runs = []
    for _ in range(2):
        out = longattn.block_aggregate(x, block_ids, 6, weight=weight, backend="triton")
        runs.append((out, *torch.autograd.grad(out.square().sum(), [x, weight])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------
# capabilities
# --------------------------------------------------------------------------------------------------------


def test_capability_reasons():
    from longattn.backends import triton_backend as tb

    assert tb.unsupported_reasons(torch.device(DEVICE), torch.float32, 64, "band_side") == []
    assert any("float64" in r for r in tb.unsupported_reasons(torch.device(DEVICE), torch.float64, 64, "band_side"))
    assert any("head_dim" in r for r in tb.unsupported_reasons(torch.device(DEVICE), torch.float16, 256,
                                                                "band_side"))
    assert tb.unsupported_reasons(torch.device(DEVICE), torch.float16, 4096, "block_aggregate") == []
    if INTERPRET:
        assert any("bfloat16" in r for r in tb.unsupported_reasons(torch.device("cpu"), torch.bfloat16, 64,
                                                                   "band_side"))


def test_cpu_without_interpreter_is_unavailable(monkeypatch):
    from longattn.backends import triton_backend as tb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = tb.unavailable_reasons(torch.device("cpu"))
    assert reasons and "TRITON_INTERPRET" in reasons[0]


def test_explicit_request_raises_with_reason():
    case = make_case(B=1, S=8, H=1, D=16, window=(2, 2), device=DEVICE)  # float64
    with pytest.raises(BackendUnavailableError, match="float64"):
        longattn.local_attention(case.q, case.k, case.v, 2, backend="triton")


# --------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: every kernel compiled for sm_90 in bf16 (which the interpreter cannot run)
# --------------------------------------------------------------------------------------------------------

_POINTER_TYPES = {
    **dict.fromkeys(["Lse", "Delta", "Part", "Sums", "Rstd", "Coef", "DSK", "DSV"], "*fp32"),
    **dict.fromkeys(["KMask", "SMask", "QMask"], "*u8"),
    "SIdx": "*i64",
    **dict.fromkeys(["QBlock", "Order", "Bounds", "Ids"], "*i32"),
    "Rng": "*i64",
    **dict.fromkeys(["Q", "K", "V", "SK", "SV", "DO", "Res", "DK", "DV", "BBias", "SBias", "Bias", "X", "W", "Out",
                     "DOut", "DX"], "*bf16"),
}


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's register / spill line for a kernel's PTX (sm_90a, Triton's bundled ptxas): n_regs and n_spills of a
    compiled kernel are only filled in when it is loaded on a GPU."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    used = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return f"{used.group(1) if used else '?'} registers, spill stores/loads {spills[-1] if spills else '?'} bytes"


# Kernel flags shown next to each compiled kernel's register / spill line.
_SHOWN = ("BACKWARD", "SIDE", "SIDE_INDEX", "HAS_DROPOUT", "BLOCK_D", "HAS_RANGES", "HAS_KRANGES", "HAS_HALO",
          "HAS_DLSE", "HAS_DOFFSET", "PERSISTENT")


def compile_sm90(fn, constexprs: dict, warps: int, types: dict | None = None, none_args=()) -> str:
    """Compile the Triton kernel ``fn`` for sm_90 on the CPU and print (and return) its ptxas register / spill line.

    ``constexprs``: its constexpr parameters (those with a default and not given take it: the optional features,
    off); ``types``: pointer types beyond ``_POINTER_TYPES``; ``none_args``: parameters passed as None, compile-time
    constants as the launchers pass absent optional inputs. Needs TRITON_INTERPRET unset (the interpreter replaces
    jit)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**_POINTER_TYPES, **(types or {})}
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs,
                  **dict.fromkeys(none_args)}
    sig = {n: "constexpr" if n in constexprs else types.get(n, "fp32" if "scale" in n or n == "eps" else "i32")
           for n in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    usage = ptxas_usage(kernel.asm["ptx"])
    flags = ",".join(f"{n}={v}" for n, v in constexprs.items() if n in _SHOWN)
    print(f"{fn.__module__.split('.')[-1]}.{fn.__name__}[{flags}]: {usage}")
    return usage


def compile_all_for_sm90():
    """Compile each kernel (GPU tile shapes, all optional inputs on, with and without dropout) to a cubin for sm_90
    with Triton's bundled ptxas, printing registers / spills; raises on any code-generation error. Needs
    TRITON_INTERPRET unset (the interpreter replaces jit)."""
    from longattn.triton_kernels import _common, band_side, bias_grad, block_aggregate

    build = compile_sm90

    flags = dict(HAS_KMASK=True, HAS_SMASK=True, HAS_BBIAS=True, HAS_SBIAS=True)
    for D in (64, 128):
        bm, bn, warps = _common.attention_tiles(D)
        tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, DOT_PREC="tf32")
        for dropout in (False, True):  # HAS_DROPOUT: the Philox keep mask in every attention kernel
            for backward in (False, True):
                build(band_side._rows_kernel, dict(BACKWARD=backward, **flags, **tiles, HAS_DROPOUT=dropout), warps)
            # the side dK/dV pass of long sequences (_common.partial_programs): runs of side-key tiles, a bias row each
            build(band_side._keys_kernel, dict(SIDE=True, PERSISTENT=True, **flags, **tiles, HAS_DROPOUT=dropout),
                  warps)
            for side in (False, True):
                build(band_side._keys_kernel, dict(SIDE=side, **flags, **tiles, HAS_DROPOUT=dropout), warps)
        # Longformer's band pass: side keys read through the slot index, row masks in the kernel, no biases
        lf = dict(HAS_KMASK=True, HAS_SMASK=True, HAS_BBIAS=False, HAS_SBIAS=False, SIDE_INDEX=True, **tiles)
        for dropout in (False, True):
            build(band_side._rows_kernel, dict(BACKWARD=False, HAS_QMASK=True, KMASK_ROWS=True, **lf,
                                               HAS_DROPOUT=dropout), warps)
            build(band_side._rows_kernel, dict(BACKWARD=True, **lf, HAS_DROPOUT=dropout), warps)
            build(band_side._keys_kernel, dict(SIDE=True, **lf, HAS_DROPOUT=dropout), warps)
    for index in (False, True):  # the backward's one reduction: both bias tables and the side keys' dK/dV
        build(bias_grad._reduce_kernel, dict(HAS_BAND=True, HAS_SIDE=True, HAS_KEYS=True, KEYS_INDEX=index,
                                             HAS_SMASK=index, BLOCK_C=bias_grad._BLOCK_C, UNROLL=bias_grad._UNROLL),
              2, dict(DBand="*bf16", DSide="*bf16"))
    for weighted in (False, True):
        meta = dict(HAS_WEIGHT=weighted, BLOCK_S=block_aggregate._GPU_BLOCK_S, BLOCK_C=block_aggregate._GPU_BLOCK_C)
        build(block_aggregate._aggregate_kernel, meta, 4)
        build(block_aggregate._scatter_grad_kernel, meta, 4)
    for kernel, tiles, types in ((block_aggregate._order_kernel, block_aggregate._GPU_ORDER, dict(Scratch="*i64")),
                                 (block_aggregate._rows_grad_kernel, block_aggregate._GPU_ROWS, dict(Partial="*fp32")),
                                 (block_aggregate._dweight_kernel, block_aggregate._GPU_DWEIGHT,
                                  dict(Partial="*fp32", DW="*bf16"))):
        meta = dict(tiles)
        build(kernel, meta, meta.pop("num_warps"), types)


def test_kernels_compile_for_sm90_bf16():
    run_sm90_compile("tests.test_triton_backend:compile_all_for_sm90")


# GPU-sized shapes, bfloat16, long sequences, 64-bit offsets and determinism on the GPU: tests/test_gpu_kernels.py
# (both kernel backends in one place).


# --------------------------------------------------------------------------------------------------------
# the custom ops with backend="triton": fake (meta) shapes/strides, autograd registration
# --------------------------------------------------------------------------------------------------------


def test_opcheck_band_side():
    ops = torch.ops.longattn
    case = make_case(B=1, S=10, H=2, D=16, window=(3, 2), G=3, bias=True, padding="tail", side_padding=True,
                     layout="bhsd", device=DEVICE).cast(torch.float32)
    args = (case.q, case.k, case.v, case.side_k, case.side_v, case.key_padding_mask, case.side_mask,
            case.query_block.to(torch.int32), case.rel_bias, case.side_bias, *case.window, 0.5, "triton")
    torch.library.opcheck(ops.band_side_attention.default, args)
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    out, lse = ops.band_side_attention(*detached)
    bwd_args = (torch.randn_like(out), *detached[:5], out, lse, *detached[5:])
    torch.library.opcheck(ops.band_side_attention_backward.default, bwd_args)


def test_opcheck_block_aggregate():
    ops = torch.ops.longattn
    x, block_ids, weight = _aggregate_inputs(2, 12, 8, 3)
    block_ids = block_ids.to(torch.int32)  # the ops take the normalised ids the public API passes
    x, weight = x.float().requires_grad_(True), weight.float().requires_grad_(True)
    torch.library.opcheck(ops.block_aggregate.default, (x, block_ids, 3, weight, 1e-6, "triton"))
    out, sums, rstd = ops.block_aggregate(x.detach(), block_ids, 3, weight.detach(), 1e-6, "triton")
    torch.library.opcheck(ops.block_aggregate_backward.default,
                          (torch.randn_like(out), x.detach(), block_ids, 3, weight.detach(), sums, rstd, 1e-6,
                           "triton"))
