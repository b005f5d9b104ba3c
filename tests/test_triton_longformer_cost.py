"""Static cost of Longformer's band kernels next to the local op's (issue 12, target 4), and of LongT5's (target 5),
from sm_90 code compiled on the CPU as the real launches specialize it.

The launches are captured, not rebuilt: the local op and the Longformer op (1 and 64 globals) run forward and backward
at the H200 benchmark's shape (B = 1, S = 16384, H = 12, D = 64, bf16, window +-256, no tables; LongT5's local and
TGlobal ops at window 127 with their tables) on CPU tensors with Triton's launch path emulated
(``tests/triton_emulation.py``, 132 SMs for the split heuristics), so each compile gets exactly the keywords,
integers (== 1: constants; multiples of 16: hinted), pointer types and launch options that launch passes.

What is guarded (offline compile, Triton 3.6 and 3.8, 2026-12-01):

- the forward and dQ kernels keep two programs per SM (<= 128 registers at 8 warps): local 108-122, Longformer
  98-116 (1 global) and 117-122 (64 globals); LongT5's ops too, the local one with its band table (window 127) and
  TGlobal with both tables and its padding mask, whose dQ and forward Triton 3.6's ptxas gave 170 and 169 registers
  until those launches were capped (``_common.rows_cap``).
  Crossing 128 roughly halves a kernel's throughput (``tests/test_triton_bias_cost.py``);
- ptxas pipelines the wgmma (no "wgmma.mma_async instructions are serialized") of every kernel: the forward, dQ and
  dK/dV kernels of the local op (with grouped-query K/V and packed sequences too) and of Longformer with 1 and 64
  globals;
- nothing spills inside a tile loop of any band kernel (dK/dV: 176-202 registers, one program per SM either way).

With exactly 1 global, ``G == 1`` is specialized to a constant; the side loop, then folded into straight code after
the band loop, made ptxas serialize every wgmma of the forward and dQ band loops (a wait after each HGMMA): Triton 3.6
band loops of 511 / 543 SASS instructions per tile, 3.8 489 / 525. ``band_side._rows_kernel`` keeps that loop a loop
(a bound the compiler cannot fold): 487 / 502 and 471 / 496, pipelined.

ptxas also pipelines the wgmma of the dK/dV kernels (band keys of every op, Longformer's side keys): their query-tile
loop used to have a zero-trip path that copied the zeroed dk, dv into the accumulators, and with it ptxas serialized
them (Triton 3.6: the local op's loop 653 instructions per tile, 619 since; 3.8: 645, 610; packed 745, 717 on 3.6).
``check_kv_stages``: with
``LONGATTN_TRITON_KV_STAGES=1`` (the loop not software-pipelined) the local op's loop is shorter still (574 on 3.8),
without the next tile's prefetch; which is faster needs a GPU.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from tests.conftest import needs_triton, run_sm90_compile

pytestmark = needs_triton

_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "uint8": "*u8", "int64": "*i64", "int32": "*i32"}
SHAPE = dict(B=1, S=16384, H=12, D=64, window=256)


def captured_launches() -> list[tuple[str, object, dict]]:
    """[(op, kernel, {parameter or launch option: value})] of every band launch (``band_side._rows_kernel`` /
    ``_keys_kernel``) of the local op (also with 4 K/V heads for the 12 query heads, packed: three sequences in the
    row, and LongT5's: window 127 with a band table), of LongT5 TGlobal (both tables, padding mask) and of Longformer
    with 1 and 64 globals, forward and backward, at ``SHAPE`` (values: tensors stay tensors, CPU ones never read)."""
    import torch
    from longattn.triton_kernels import _common, band_side

    import longattn
    from longattn.backends import triton_backend
    from longattn.bench.cases import global_positions
    from tests.triton_emulation import EmulatedTriton

    B, S, H, D, W = (SHAPE[k] for k in ("B", "S", "H", "D", "window"))
    saved = triton_backend.unsupported_reasons, _common.num_sms
    emulation = EmulatedTriton(record=True).install()
    triton_backend.unsupported_reasons = lambda *a, **k: []  # bf16 on CPU: launches emulated, never run
    _common.num_sms = lambda device=None: 132  # the H200's splits (global rows, side keys)
    kernels = (band_side._rows_kernel, band_side._keys_kernel)
    out = []
    try:
        for name, G in (("local", 0), ("local GQA", 0), ("local packed", 0), ("local table", 0), ("tglobal", 0),
                        ("longformer G=1", 1), ("longformer G=64", 64)):
            kv_heads = 4 if name == "local GQA" else H  # grouped-query K/V: the dK/dV loop's trip count GROUP * n_t
            q = torch.randn(B, S, H, D, dtype=torch.bfloat16).requires_grad_()
            k, v = (torch.randn(B, S, kv_heads, D, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
            start = len(emulation.launches)
            if G:
                glob = torch.zeros(B, S, dtype=torch.bool)
                glob[:, global_positions(S, G)] = True
                attn = longattn.longformer_attention(q, k, v, W, glob, max_globals=G, backend="triton")
            elif name == "local packed":  # three sequences in one row: per-row key ranges (HAS_RANGES)
                cu = torch.tensor([0, 2048, 2048 + 9000, S], dtype=torch.int32)
                attn = longattn.local_attention_varlen(q[0], k[0], v[0], cu, 9000, W, backend="triton")
            elif name == "local table":  # LongT5's local attention: window 127, a band table, scale 1
                table = torch.randn(H, 255, dtype=torch.bfloat16)
                attn = longattn.local_attention(q, k, v, 127, rel_bias=table, scale=1.0, backend="triton")
            elif name == "tglobal":  # LongT5 TGlobal: window 127, blocks of 16, both tables, scale 1, padding mask
                n = S // 16
                side_k, side_v = (torch.randn(B, n, H, D, dtype=torch.bfloat16) for _ in range(2))
                blocks = (torch.arange(S) // 16).int()[None].expand(B, S)
                attn = longattn.tglobal_attention(
                    q, k, v, side_k, side_v, 127, blocks, key_padding_mask=torch.ones(B, S, dtype=torch.bool),
                    rel_bias=torch.randn(H, 255, dtype=torch.bfloat16),
                    side_bias=torch.randn(H, 2 * n + 1, dtype=torch.bfloat16), scale=1.0, backend="triton")
            else:
                attn = longattn.local_attention(q, k, v, W, backend="triton")
            torch.autograd.grad(attn, (q, k, v), torch.ones_like(attn))
            out += [(name, launch.kernel, {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.options})
                    for launch in emulation.launches[start:] if launch.kernel in kernels]
    finally:
        emulation.uninstall()
        triton_backend.unsupported_reasons, _common.num_sms = saved
    return out


def compile_launch(fn, args: dict, warps: int):
    """``fn`` compiled for sm_90 with ``args`` (a captured launch's values, and its ``maxnreg`` option if it had one)
    specialized as that launch specializes them (``test_triton_bias_cost.compile_specialized``: pointers typed by
    their tensor's dtype)."""
    import torch

    from tests.test_triton_bias_cost import compile_specialized

    constexprs, ints, types = {}, {}, {}
    for p in fn.params:
        value = args[p.name]
        if p.is_constexpr or value is None:
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            assert value.data_ptr() % 16 == 0, p.name  # compile_specialized hints every pointer 16-byte aligned
            types[p.name] = _PTR[str(value.dtype).split(".")[-1]]
        elif isinstance(value, int):
            ints[p.name] = value
    options = {"maxnreg": args["maxnreg"]} if "maxnreg" in args else None
    return compile_specialized(fn, constexprs, ints, warps, types, options)


def wgmma_serialized(ptx: str) -> bool:
    """ptxas (sm_90a) reports that it serializes the kernel's wgmma (a wait after every HGMMA)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return "wgmma.mma_async instructions are serialized" in run.stderr


def _role(args: dict) -> str:
    if "SIDE" in args:
        return "side dK/dV" if args["SIDE"] else "band dK/dV"
    return "dQ" if args["BACKWARD"] else "forward"


def longformer_costs() -> dict:
    """{(op, kernel role): (registers, spill bytes, shared bytes, programs per SM, loops, wgmma serialized)}, printed
    as a table (loops: ``test_triton_bias_cost.sass_loops``' (instructions, barriers, local accesses))."""
    from longattn.triton_kernels import _common

    from tests.test_triton_bias_cost import _usage

    _, _, warps = _common.attention_tiles(SHAPE["D"])
    costs = {}
    for op, fn, args in captured_launches():
        role = _role(args)
        w = _common.side_tiles(args["G"], SHAPE["D"])[1] if role == "side dK/dV" else warps
        kernel = compile_launch(fn, args, w)
        costs[op, role] = (*_usage(kernel, w), wgmma_serialized(kernel.asm["ptx"]))
        c = costs[op, role]
        print(f"{op:16s} {role:10s} {w} warps: {c[0]} registers, {c[1]} B spilled, {c[2]} B shared, {c[3]} per SM, "
              f"loops {c[4]}, wgmma {'serialized' if c[5] else 'pipelined'}")
    return costs


def check_longformer_costs():
    """The guarded state (module doc): two forward / dQ programs per SM in every op, pipelined wgmma in every kernel,
    no spill inside any tile loop."""
    costs = longformer_costs()
    ops = ("local", "local GQA", "local packed", "local table", "tglobal", "longformer G=1", "longformer G=64")
    assert {op for op, _ in costs} == set(ops), sorted(costs)
    for op in ops:
        for role in ("forward", "dQ"):
            assert costs[op, role][3] >= 2, (op, role, costs[op, role])  # <= 128 registers at 8 warps
    for (op, role), cost in costs.items():
        assert not cost[5], (op, role, "wgmma serialized")
    for key, cost in costs.items():
        assert all(local == 0 for _, _, local in cost[4]), (key, cost)


def check_kv_stages():
    """``LONGATTN_TRITON_KV_STAGES=1`` reaches both dK/dV launches (band and side keys) and compiles the band one as
    the module doc says: wgmma pipelined by ptxas, a shorter loop than the default's, no spill."""
    import os

    from longattn.triton_kernels import _common

    from tests.test_triton_bias_cost import _usage

    _, _, warps = _common.attention_tiles(SHAPE["D"])
    default = {op: args for op, _, args in captured_launches() if _role(args) == "band dK/dV"}
    os.environ[_common._KV_STAGES_ENV] = "1"
    try:
        staged = [(op, fn, args) for op, fn, args in captured_launches() if "SIDE" in args]
    finally:
        del os.environ[_common._KV_STAGES_ENV]
    assert {args["KV_STAGES"] for _, _, args in staged} == {1}, "KV_STAGES did not reach every dK/dV launch"
    assert all(args.get("KV_STAGES") is None for args in default.values())
    fn, args = next((fn, args) for op, fn, args in staged if op == "local" and not args["SIDE"])
    cost, base = (_usage(compile_launch(fn, a, warps), warps) for a in (args, default["local"]))
    print(f"local band dK/dV, KV_STAGES=1: {cost[0]} registers, loops {cost[4]} (default: loops {base[4]})")
    assert not wgmma_serialized(compile_launch(fn, args, warps).asm["ptx"])
    assert cost[4][0][0] < base[4][0][0] and all(local == 0 for _, _, local in cost[4]), (cost, base)


def test_kv_stages_sm90():
    run_sm90_compile("tests.test_triton_longformer_cost:check_kv_stages")


def test_longformer_costs_sm90():
    run_sm90_compile("tests.test_triton_longformer_cost:check_longformer_costs")


def test_kv_stages_override_is_checked(monkeypatch):
    import pytest
    from longattn.triton_kernels import _common

    monkeypatch.setenv(_common._KV_STAGES_ENV, "2")
    assert _common.launch_tiles(64, 0, False, None).kv_stages == 2
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv(_common._KV_STAGES_ENV, bad)
        with pytest.raises(ValueError, match="LONGATTN_TRITON_KV_STAGES"):
            _common.launch_tiles(64, 0, False, None)
    monkeypatch.delenv(_common._KV_STAGES_ENV)
    assert _common.launch_tiles(64, 0, False, None).kv_stages is None
