"""The Longformer op (band pass + global rows in one custom op) against the fp64 oracle.

Covers globals at the start, middle and end, many globals (more than a 16-key interpreter tile, up to and
beyond 64), rows without globals, padding (including a padding token marked global, which is never global),
separate ``q/k/v_global`` projections, ``max_globals`` given (exact and loose) and not, the output and every
gradient. The torch backend (the reference) runs in float64 against the oracle's floor; the Triton kernels
(``TRITON_INTERPRET=1`` on CPU, or a GPU) follow the tolerance rule in fp32 and fp16 with the torch backend
in the same dtype as the baseline.
"""

from __future__ import annotations

import os

import pytest
import torch

import longattn
from tests import reference
from tests.conftest import grads, longformer_leaves, run_sm90_compile
from tests.tolerance import assert_close_to_oracle, assert_within_rule

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _globals(B, S, layout):
    glob = torch.zeros(B, S, dtype=torch.bool)
    if layout == "start-middle-end":
        glob[0, [0, S // 2, S - 1]] = True
        glob[1, S - 1] = True  # the last token of row 1 is padding: never global
    elif layout == "many":
        glob[0, torch.arange(1, S, 2)[:40]] = True  # 40 globals spread out: several side-key tiles
        glob[1, :20] = True  # a block at the start
    elif layout == "more-than-64":
        glob[0, torch.arange(S) % 4 != 1] = True  # 3/4 of the tokens: 72 globals
        glob[1, 5] = True
    return glob


# (B, S, H, D, window, global layout, separate projections, max_globals)
CASES = {
    "start-middle-end": (2, 45, 2, 16, (4, 3), "start-middle-end", False, None),
    "start-middle-end-projections": (2, 45, 2, 16, (4, 3), "start-middle-end", True, 3),
    "many-loose-bound": (2, 90, 2, 16, (6, 6), "many", True, 64),
    "more-than-64": (2, 96, 1, 32, (5, 2), "more-than-64", False, 80),
    "no-globals": (2, 40, 2, 16, (3, 3), "none", False, 0),
    "no-globals-counted": (2, 40, 2, 16, (3, 3), "none", True, None),
}


def _inputs(name, dtype, device):
    B, S, H, D, window, layout, projections, max_globals = CASES[name]
    qkv, kwargs, leaves = longformer_leaves(name, B, S, H, D, projections=projections, pad_tail=6, dtype=dtype,
                                            device=device)
    return (*qkv, window, _globals(B, S, layout).to(device)), kwargs, leaves, max_globals


def _run(name, dtype, backend, device="cpu", dropout_p=0.0):
    args, kwargs, leaves, max_globals = _inputs(name, dtype, device)
    if dropout_p:
        torch.manual_seed(0)  # the dropout seed is drawn from torch's generator
    out = longattn.longformer_attention(*args, **kwargs, max_globals=max_globals, dropout_p=dropout_p,
                                        backend=backend)
    return out, grads(out, leaves)


def _oracle(name, device="cpu"):
    args, kwargs, leaves, _ = _inputs(name, torch.float64, device)
    ref = reference.longformer_attention(*args, **kwargs)
    return ref, grads(ref, leaves)


@pytest.mark.parametrize("name", CASES)
def test_torch_backend_matches_oracle_float64(name):
    out, got = _run(name, torch.float64, "torch")
    ref, want = _oracle(name)
    assert_close_to_oracle("out", out, ref)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to_oracle(f"grad {i}", g, w)


def test_padding_rows_are_zero_and_get_no_gradient():
    args, kwargs, leaves, _ = _inputs("start-middle-end", torch.float64, "cpu")
    out = longattn.longformer_attention(*args, **kwargs, backend="torch")
    assert torch.equal(out[1, -6:], torch.zeros_like(out[1, -6:]))
    (dq,) = torch.autograd.grad(out, [leaves[0]], torch.randn_like(out))
    assert torch.equal(dq[1, -6:], torch.zeros_like(dq[1, -6:]))


@pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_triton_within_rule(name, dtype):
    ref, want = _oracle(name, DEVICE)
    out, got = _run(name, dtype, "triton", DEVICE)
    base, base_grads = _run(name, dtype, "torch", DEVICE)
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


@pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("name, dropout_p", [("start-middle-end-projections", 0.0), ("start-middle-end", 0.2)])
def test_triton_backward_is_deterministic(name, dropout_p):
    runs = [_run(name, torch.float16, "triton", DEVICE, dropout_p)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def compile_global_rows_for_sm90():
    """Compile every global-rows kernel (GPU tiles, bf16, D = 64 and 128) for sm_90 with Triton's bundled ptxas;
    raises on a code-generation error. Needs TRITON_INTERPRET unset (the interpreter replaces jit)."""
    import triton
    from longattn.triton_kernels import _common
    from longattn.triton_kernels import global_rows as gr
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_triton_backend import ptxas_usage

    types = {**dict.fromkeys(["GLse", "PartO", "PartL"], "*fp32"), **dict.fromkeys(["KMask", "Used"], "*u8"),
             "Pos": "*i64", "Rng": "*i64", **dict.fromkeys(["KRange", "TBounds"], "*i32"),
             **dict.fromkeys(["Q", "K", "V", "DO", "Out", "Res", "DK", "DV", "DQ"], "*bf16")}

    def build(fn, constexprs, warps):
        sig = {n: "constexpr" if n in constexprs else types.get(n, "fp32" if n in ("scale", "drop_scale") else "i32")
               for n in fn.arg_names}
        consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps})
        print(f"global_rows.{fn.__name__}{constexprs}: {ptxas_usage(kernel.asm['ptx'])}")

    for D in (64, 128):
        bm, bn, warps = _common._GPU_TILES[D]
        tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, DOT_PREC="tf32")
        for backward in (False, True):
            build(gr._combine_kernel, dict(BACKWARD=backward, BLOCK_M=bm, BLOCK_D=D), warps)
        for dropout, ranges in ((False, False), (True, False), (False, True)):
            flags = dict(HAS_KMASK=True, **tiles, HAS_DROPOUT=dropout, HAS_RANGES=ranges)
            for backward in (False, True):
                build(gr._split_kernel, dict(BACKWARD=backward, **flags), warps)
            build(gr._keys_kernel, dict(ADD_DK=True, ADD_DV=False, **flags), warps)
            build(gr._keys_kernel, dict(ADD_DK=False, ADD_DV=False, ZERO_DQ=True, **flags), warps)


def test_global_rows_kernels_compile_for_sm90_bf16():
    run_sm90_compile("tests.test_longformer_op:compile_global_rows_for_sm90")


_FUSED_TYPES = {**dict.fromkeys(["QG", "KG", "VG", "DKG", "DVG", "DQG", "DQ"], "*bf16"),
                **dict.fromkeys(["GLse", "PartO", "PartL", "RowPart"], "*fp32"), "Counter": "*i32",
                **dict.fromkeys(["GKMask", "Used"], "*u8"), **dict.fromkeys(["GKRange", "GTBounds"], "*i32"),
                "Pos": "*i64"}


def _fused_forward_ptx(D: int, dropout: bool) -> str:
    import triton
    from longattn.triton_kernels import _common, band_side
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_triton_backend import _POINTER_TYPES, ptxas_usage

    fn = band_side._rows_kernel
    bm, bn, warps = _common.attention_tiles(D)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
              **dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, DOT_PREC="tf32", HAS_KMASK=True, HAS_SMASK=True,
                     HAS_BBIAS=False, HAS_SBIAS=False, SIDE_INDEX=True, GLOBAL_ROWS=True, HAS_GKMASK=True,
                     BACKWARD=False, HAS_QMASK=True, KMASK_ROWS=True, HAS_DROPOUT=dropout)}
    types = {**_POINTER_TYPES, **_FUSED_TYPES}
    sig = {n: "constexpr" if n in consts else types.get(n, "fp32" if "scale" in n else "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v
                                                                         for n, v in consts.items()}),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print(f"fused Longformer forward D={D} dropout={dropout}: {ptxas_usage(kernel.asm['ptx'])}")
    return kernel.asm["ptx"]


def compile_fused_longformer_for_sm90():
    """Compile the fused Longformer launches (``triton_kernels/longformer.py``: the band kernels with the global rows'
    roles, and the reduction with their dq) for sm_90, bf16, D = 64 and 128, printing registers / spills, and check the
    forward's last-arrival merge in the PTX: a CTA barrier before the acquire-release increment (every thread's
    partials are stored before the program signals), a barrier after it (the result reaches every thread after the
    acquire) and the partials then read through L2 (``ld.global.cg``). Needs TRITON_INTERPRET unset."""
    from longattn.triton_kernels import _common, band_side, bias_grad, global_rows

    from tests.test_triton_backend import compile_sm90

    for D in (64, 128):
        for dropout in (False, True):
            lines = [line.strip() for line in _fused_forward_ptx(D, dropout).splitlines()]
            atom = [i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line]
            assert len(atom) == 1, atom
            before = [i for i in range(atom[0]) if lines[i].startswith("bar.sync")]
            after = [i for i in range(atom[0], len(lines)) if lines[i].startswith("bar.sync")]
            loads = [i for i in range(atom[0], len(lines)) if "ld.global.cg" in lines[i]]
            assert before and after and loads and after[0] < loads[0], (before[-3:], after[:3], loads[:3])
        bm, bn, warps = _common.attention_tiles(D)
        lf = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, DOT_PREC="tf32", HAS_KMASK=True, HAS_SMASK=True,
                  HAS_BBIAS=False, HAS_SBIAS=False, SIDE_INDEX=True, GLOBAL_ROWS=True, HAS_GKMASK=True,
                  SLOT_BLOCK=global_rows.SLOT_BLOCK)
        compile_sm90(band_side._rows_kernel, dict(BACKWARD=True, **lf, HAS_DROPOUT=False), warps, _FUSED_TYPES)
        for separate in (False, True):
            compile_sm90(band_side._keys_kernel, dict(SIDE=False, GLOBAL_SEPARATE=separate, ZERO_DQG=separate, **lf,
                                                      HAS_DROPOUT=False), warps, _FUSED_TYPES)
        compile_sm90(bias_grad._reduce_kernel, dict(HAS_BAND=False, HAS_SIDE=False, HAS_KEYS=True, KEYS_INDEX=True,
                                                    HAS_SMASK=True, BLOCK_C=bias_grad._BLOCK_C,
                                                    UNROLL=bias_grad._UNROLL, HAS_ROWS=True,
                                                    BLOCK_G=bias_grad._ROWS_BLOCK, BLOCK_DG=D),
                     2, dict(DBand="*bf16", DSide="*bf16", **_FUSED_TYPES))


def test_fused_longformer_kernels_compile_for_sm90_bf16():
    run_sm90_compile("tests.test_longformer_op:compile_fused_longformer_for_sm90")


@pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)")
def test_triton_band_pass_reads_slots_in_place():
    """Issue 12 target 2 inside the op: the Triton band pass reads the global tokens' k/v through the slot
    positions and adds their side-key dK/dV into dk/dv in a kernel, and zeroes padding rows in the kernel: no
    gathered copy of k/v, no scatter, no masked_fill, and the slot layout comes from its kernel (no argsort or
    gather; the backward reuses it). ``tests/test_backend_glue.py`` checks every op for any torch glue."""
    from longattn.backends import _longformer
    from longattn.dispatch import get_backend
    from tests.test_host_sync import OpLog

    (q, k, v, window, glob), kwargs, _, _ = _inputs("start-middle-end", torch.float32, DEVICE)
    q, k, v = (x.detach() for x in (q, k, v))
    pad = kwargs["key_padding_mask"]
    backend = get_backend("triton")
    with OpLog() as fwd:
        out, lse, glse, *slots = _longformer.forward(backend, q, k, v, None, None, None, glob, pad, *window, 0.25, 3)
    with OpLog() as bwd:
        _longformer.backward(backend, torch.randn_like(out), q, k, v, None, None, None, out, lse, glse, *slots, glob,
                             pad, *window, 0.25)
    for log in (fwd, bwd):
        assert not [op for op in log.ops if "scatter" in op or "masked_fill" in op], log.ops
    assert not [op for op in fwd.ops + bwd.ops if op in ("aten.gather", "aten.sort")], (fwd.ops, bwd.ops)


@pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("case", ["overflow", "k-global-only", "v-global-only", "q-global-only"])
def test_triton_fused_paths_match_torch(case):
    """Paths of the fused Triton op (``triton_kernels/longformer.py``) the oracle cases miss: more globals than
    ``max_globals`` slots (the band programs must still store the dropped globals' rows, the global rows only the kept
    slots'), and one separate global projection (k_global alone takes the composed backward; q_global alone the fused
    one, with a new dq). The torch backend is checked against the oracle there too (it once added a separate k_global's
    neighbour dv only when dk was added into)."""
    B, S, H, D = 2, 70, 2, 16
    gen = torch.Generator().manual_seed(7)
    x = [torch.randn(B, S, H, D, generator=gen, dtype=torch.float64) for _ in range(4)]
    glob = _globals(B, S, "many")
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, -5:] = False
    extra = {"k-global-only": "k_global", "v-global-only": "v_global", "q-global-only": "q_global"}.get(case)
    max_globals = 8 if case == "overflow" else None

    def run(backend, dtype):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in x]
        kwargs = {extra: leaves[3]} if extra else {}
        attention = reference.longformer_attention if backend == "oracle" else longattn.longformer_attention
        options = {} if backend == "oracle" else dict(max_globals=max_globals, backend=backend)
        out = attention(*leaves[:3], (5, 4), glob.to(DEVICE), key_padding_mask=pad.to(DEVICE), **options, **kwargs)
        return [out, *grads(out, leaves[:3] + ([leaves[3]] if extra else []))]

    spec = run("torch", torch.float64)
    if case != "overflow":  # the oracle keeps every global: the torch backend (the spec) against it
        for got, want in zip(spec, run("oracle", torch.float64)):
            assert_close_to_oracle("torch", got, want)
    for got, want in zip(run("triton", torch.float32), spec):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=2e-5, rtol=1e-4)
