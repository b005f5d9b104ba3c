"""Static cost of the bias tables in the Triton backward (issue 12, target 5), from sm_90 code compiled on the CPU.

``tests/test_triton_backend.py::compile_sm90`` compiles without the JIT's argument specialization, so its K/V loads
are scalar 16-bit loads and its register counts are not the GPU's. Here the kernels are compiled as a launch at
LongT5 TGlobal's benchmark shape specializes them (B = 1, S = 16384, H = 12, D = 64 bf16, window 127, G = 1024: every
pointer 16-byte aligned, integers divisible by 16 marked so, GROUP = 1 a constant), and the per-tile loops are read
from the SASS. The H200 timings of 2026-11-30 (Triton 3.6) divided by these loops' instruction counts give about 1.8-1.9
warp-instructions per cycle per SM for the attention kernels at two programs per SM (<= 128 registers at 8 warps:
Longformer's forward and dQ, no tables) and 0.95-1.2 at one (local and TGlobal with tables: dQ then 255 registers), so
crossing 128 registers roughly halves a kernel's throughput before any instruction it adds is counted. The tables'
sums by entry now run in the dK/dV kernels (one program per SM with or without them: 166-182 registers), so the dQ
kernel keeps two programs per SM with both tables; ``check_dq_costs`` guards that.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from tests.conftest import needs_triton, run_sm90_compile

pytestmark = needs_triton

_STRIDES = {"": (16384 * 768, 768, 64), "s": (1024 * 768, 768, 64)}  # (B, S, H, D) / (B, G, H, D) contiguous
_DQ_INTS = dict(stride_ib=0, S=16384, H=12, GROUP=1, G=1024, D=64, left=127, right=127, drop_thresh=0)
for _names, _kind in (("q k v do o r", ""), ("sk sv", "s")):
    for _t in _names.split():
        _DQ_INTS.update(zip((f"stride_{_t}b", f"stride_{_t}s", f"stride_{_t}h"), _STRIDES[_kind]))


def compile_specialized(fn, constexprs: dict, ints: dict, warps: int, types: dict | None = None,
                        options: dict | None = None):
    """``fn`` compiled for sm_90 as a launch with integer arguments ``ints`` specializes it: integers equal to 1
    become constants, multiples of 16 get the divisibility hint, as does every pointer (16-byte aligned).
    ``types``: pointer types beyond ``test_triton_backend._POINTER_TYPES``; ``options``: launch options beyond
    num_warps (``maxnreg``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_triton_backend import _POINTER_TYPES

    pointer_types = {**_POINTER_TYPES, **(types or {})}
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs,
                  **{n: 1 for n, v in ints.items() if v == 1}}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name not in ints and (name in pointer_types or name[0].isupper()):
            sig[name], attrs[(i,)] = pointer_types.get(name, "*fp32"), [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **(options or {})})


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction in cuobjdump's SASS of ``cubin``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass)]


def sass_loops(cubin: bytes, min_len: int = 250) -> list[tuple[int, int, int]]:
    """(instructions, barriers, local-memory accesses) of each loop of at least ``min_len`` instructions (a backward
    branch and its target), from cuobjdump's SASS of ``cubin``."""
    ins = sass_instructions(cubin)
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            if len(body) >= min_len:
                loops.append((len(body), sum(o.startswith("BAR") for o in body),
                              sum(o.startswith(("LDL", "STL")) for o in body)))
    return loops


def _usage(kernel, warps: int) -> tuple:
    """(registers, spill bytes stored, shared bytes, programs per SM, loops) of a compiled kernel."""
    from tests.test_triton_backend import ptxas_usage

    regs, spill = map(int, re.search(r"(\d+) registers, spill stores/loads \('(\d+)'", ptxas_usage(
        kernel.asm["ptx"])).groups())
    per_sm = min(65536 // (-(-regs // 8) * 8 * 32 * warps), 232448 // (kernel.metadata.shared + 1024))
    return regs, spill, kernel.metadata.shared, per_sm, sass_loops(kernel.asm["cubin"])


def _show(name: str, cost: tuple) -> None:
    print(f"{name}: {cost[0]} registers, {cost[1]} B spilled, {cost[2]} B shared, {cost[3]} per SM, loops "
          f"(instructions, barriers, local accesses) {cost[4]}")


def dq_costs() -> dict:
    """{variant: (registers, spill bytes stored, shared bytes, programs per SM, loops)} of the dQ kernel at the
    benchmark's shape, without tables and with both; printed as a table."""
    from longattn.triton_kernels import _common, band_side

    bm, bn, warps = _common.attention_tiles(64)
    base = dict(BACKWARD=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, DOT_PREC="tf32", HAS_DROPOUT=False,
                HAS_KMASK=False, HAS_SMASK=True)
    out = {}
    for name, tables in (("no tables", False), ("both tables", True)):
        kernel = compile_specialized(band_side._rows_kernel, dict(base, HAS_BBIAS=tables, HAS_SBIAS=tables), _DQ_INTS,
                                     warps, options=_common.rows_cap(warps))  # as launched
        out[name] = _usage(kernel, warps)
        _show(f"dQ {name}", out[name])
    return out


def kv_costs() -> dict:
    """{(band | side, tables): cost as ``dq_costs``} of the dK/dV kernels at the benchmark's shape, which sum dS by
    table entry when they have the tables (band rows of 318 columns, side rows of 2049)."""
    from longattn.triton_kernels import _common, band_side

    bm, bn, warps = _common.attention_tiles(64)
    out = {}
    for side in (False, True):
        n = 1024 if side else 16384
        ints = {name: v for name, v in _DQ_INTS.items() if name in band_side._keys_kernel.arg_names}
        ints.update(stride_gb=n * 768, stride_gs=768, stride_gh=64, stride_split=n * 768 if side else 0, N=n,
                    tiles_per_split=96 if side else 256, part_width=2049 if side else 318)
        for tables in (False, True):
            meta = dict(SIDE=side, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, DOT_PREC="tf32", HAS_DROPOUT=False,
                        HAS_KMASK=False, HAS_SMASK=True, HAS_BBIAS=tables, HAS_SBIAS=tables)
            kernel = compile_specialized(band_side._keys_kernel, meta, ints, warps)
            key = ("side" if side else "band", tables)
            out[key] = _usage(kernel, warps)
            _show(f"dK/dV {key[0]} keys, {'both tables' if tables else 'no tables'}", out[key])
    return out


def forward_costs() -> dict:
    """{variant: cost as ``dq_costs`` + (wgmma serialized,)} of the forward kernel at the benchmark's shape as the
    backend launches it (the tables through the product's accumulator, ``_common.bias_acc``; ``_common.rows_cap``):
    LongT5 TGlobal with both tables, without and with its padding mask (and dropout), the local op with its band
    table (LongT5's local attention), a side table alone, no tables, and dropout alone."""
    from longattn.triton_kernels import _common, band_side

    from tests.test_triton_longformer_cost import wgmma_serialized

    bm, bn, warps = _common.attention_tiles(64)
    out = {}
    variants = (  # name, band table, side table, G, padding mask, dropout
        ("both tables", True, True, 1024, False, False), ("both tables, padding", True, True, 1024, True, False),
        ("band table", True, False, 0, False, False), ("side table", False, True, 1024, False, False),
        ("no tables", False, False, 1024, False, False), ("dropout", False, False, 0, False, True),
        ("both tables, padding, dropout", True, True, 1024, True, True))
    for name, band, side, G, pad, drop in variants:
        meta = dict(BACKWARD=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, DOT_PREC="tf32", HAS_DROPOUT=drop,
                    HAS_KMASK=pad, HAS_SMASK=G > 0, HAS_BBIAS=band, HAS_SBIAS=side, BIAS_ACC=band or side)
        kernel = compile_specialized(band_side._rows_kernel, meta, dict(_DQ_INTS, G=G), warps,
                                     options=_common.rows_cap(warps))  # as launched
        out[name] = (*_usage(kernel, warps), wgmma_serialized(kernel.asm["ptx"]))
        _show(f"forward {name}", out[name])
        print(f"  wgmma {'serialized' if out[name][5] else 'pipelined'}")
    return out


def check_dq_costs():
    """Two dQ programs per SM with both tables as without (the occupancy the tables cost until the sums moved to
    the dK/dV kernels), two forward programs per SM with either table or dropout and its wgmma pipelined (added
    after the product, a table serialized them: ``_common.BIAS_ACC_MIN_SCALE``); no spill inside the tile loops of
    the dQ, dK/dV or forward kernels, with or without the tables."""
    costs = dq_costs()
    assert costs["no tables"][3] >= 2, costs["no tables"]
    assert costs["both tables"][3] >= 2, costs["both tables"]
    kv = kv_costs()
    forward = forward_costs()
    for name, cost in forward.items():
        assert cost[3] >= 2 and not cost[5], (name, cost)
    for cost in (*costs.values(), *kv.values(), *forward.values()):
        assert all(local == 0 for _, _, local in cost[4]), cost


def test_dq_costs_sm90():
    run_sm90_compile("tests.test_triton_bias_cost:check_dq_costs")
