"""Narrow side tiles (``triton_kernels/_common.side_tiles``): a few side keys (G <= BLOCK_N / 2, no side bias table)
get a side tile of ``max(16, next_power_of_2(G))`` keys in the forward / dQ side loop (``band_side._rows_kernel``'s
SIDE_N) and in the side keys' dK/dV (``band_side._keys_kernel`` with SIDE), instead of a BLOCK_N-wide one.

The interpreter's default 16 x 16 tiles never narrow it (16 is the minimum), so these tests run with 32 x 32 tiles
(``LONGATTN_TRITON_TILES``): Longformer (1, 2, 3 globals at the start / middle / end, padding, ``max_globals`` given
or not, separate projections), the band + side-keys op with G <= 16 (gathered side keys, side mask, padding), with
dropout, and with per-row side ranges, forward and every gradient against the fp64 oracle (the tolerance rule; the
ranges test: its float32 bound). Interpreter-sized: S <= 96, D <= 32.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from tests import reference
from tests.conftest import (
    INTERPRET,
    check_backend_against_oracle,
    grads,
    longformer_leaves,
    make_case,
    needs_triton,
    run_sm90_compile,
)
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.tolerance import assert_within_rule

pytestmark = [needs_triton, pytest.mark.skipif(not INTERPRET, reason="tile override only under the interpreter")]

_TILES = "32,32,1"


@pytest.fixture(autouse=True)
def _wide_tiles(monkeypatch):
    monkeypatch.setenv("LONGATTN_TRITON_TILES", _TILES)


@pytest.fixture
def side_widths(monkeypatch):
    """The side tile widths the band launchers pick (``band_side.launch_tiles``), one per forward / backward."""
    from longattn.triton_kernels import _common, band_side

    seen = []

    def launch_tiles(D, G, side_bias, dtype):
        tiles = _common.launch_tiles(D, G, side_bias, dtype)
        assert tiles.side_n == _common.side_tiles(G, D, side_bias)[0]
        seen.append(tiles.side_n)
        return tiles

    monkeypatch.setattr(band_side, "launch_tiles", launch_tiles)
    return seen


def test_side_tile_width():
    from longattn.triton_kernels._common import attention_tiles, side_tiles

    assert attention_tiles(16)[1] == 32
    assert [side_tiles(G, 16)[0] for G in (1, 2, 3, 16, 17, 40)] == [16, 16, 16, 16, 32, 32]
    assert side_tiles(3, 16, side_bias=True)[0] == 32  # the side-bias sums keep BLOCK_N
    assert side_tiles(0, 16)[0] == 32


def test_side_tile_width_gpu_tiles(monkeypatch):
    from longattn.triton_kernels._common import side_tiles

    monkeypatch.setenv("LONGATTN_TRITON_TILES", "64,64,8")
    assert [side_tiles(G, 64)[0] for G in (1, 5, 16, 17, 32, 33, 64, 200)] == [16, 16, 16, 32, 32, 64, 64, 64]


# ---------------------------------------------------------------------------------------------------------------------
# Longformer
# ---------------------------------------------------------------------------------------------------------------------

# (S, D, window, globals of row 0, globals of row 1, max_globals, separate projections)
LONGFORMER = {
    "one-at-start": (70, 16, (9, 6), [0], [0], None, False),
    "two-middle-end-max4": (70, 16, (5, 12), [35, 69], [20, 69], 4, False),  # row 1's last token: padding
    "three-start-middle-end-exact": (96, 32, (7, 7), [0, 48, 95], [1, 50, 60], 3, True),
}


def _longformer_inputs(name, dtype):
    S, D, window, g0, g1, max_globals, projections = LONGFORMER[name]
    B, H = 2, 2
    qkv, kwargs, leaves = longformer_leaves(name, B, S, H, D, projections=projections, pad_tail=7, dtype=dtype,
                                            device=DEVICE)
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[0, g0], glob[1, g1] = True, True
    return (*qkv, window, glob.to(DEVICE)), kwargs, leaves, max_globals


def _longformer_run(name, dtype, backend):
    args, kwargs, leaves, max_globals = _longformer_inputs(name, dtype)
    out = longattn.longformer_attention(*args, **kwargs, max_globals=max_globals, backend=backend)
    return out, grads(out, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", LONGFORMER)
def test_longformer_narrow_side_tile_within_rule(name, dtype, side_widths):
    args, kwargs, leaves, _ = _longformer_inputs(name, torch.float64)
    ref = reference.longformer_attention(*args, **kwargs)
    want = grads(ref, leaves)
    out, got = _longformer_run(name, dtype, "triton")
    assert side_widths == [16, 16]  # forward, backward: narrower than the 32-key band tiles
    base, base_grads = _longformer_run(name, dtype, "torch")
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


def test_longformer_with_dropout_drops_like_torch():
    from tests.test_dropout import _assert_drops_like_torch, _longformer_case

    # globals [0, S // 2, S - 1] and [3, 7], max_globals = 4: a 16-key side tile against 32-key band tiles
    case = _longformer_case(S=45, H=2, D=16, window=(3, 3))
    _assert_drops_like_torch("longformer", case.cast(torch.float64, DEVICE), "triton", torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# band + side keys (gathered side keys, no side bias)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("G", [3, 16])
def test_band_side_narrow_side_tile_within_rule(G, dtype, side_widths):
    case = make_case(B=2, S=70, H=2, D=16, window=(6, 9), G=G, padding="tail", side_padding=True, device=DEVICE)
    assert case.side_bias is None
    check_backend_against_oracle(case, "triton", dtype)
    assert side_widths == [16, 16]


def test_band_side_with_dropout_drops_like_torch():
    from tests.test_dropout import _assert_drops_like_torch

    case = make_case(B=2, S=45, H=2, D=16, window=(4, 3), G=5, padding="tail", side_padding=True)
    _assert_drops_like_torch("tglobal", case.cast(torch.float64, DEVICE), "triton", torch.float32)


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_band_side_ranges_narrow_side_tile(dropout):
    from tests.test_triton_ranges import _band_case, _ranges, check_band

    c = _band_case(1, 64, 2, 2, 16, 10, (5, 6), masks=True)
    ranges = _ranges(("packed", [[0, 17, 40, 64]], [[0, 3, 7, 10]]), 1, 64, 10)
    drop = dict(dropout_p=0.3, rng=torch.tensor([1234, 8], dtype=torch.int64)) if dropout else None
    check_band(c, (5, 6), 0.25, ranges, drop)


# ---------------------------------------------------------------------------------------------------------------------
# sm_90 build (compiled on the CPU as a launch specializes it, tests/test_triton_bias_cost.py)
# ---------------------------------------------------------------------------------------------------------------------


def _longformer_ints(G: int) -> dict:
    """Integer arguments of Longformer's band launches at the benchmark shape (B = 1, S = 16384, H = 12, D = 64,
    window +-256; 43 global-row splits of 384 keys, as on 132 SMs) with G slots."""
    S, H, D = 16384, 12, 64
    ints = dict(S=S, H=H, GROUP=1, G=G, D=D, left=256, right=256, stride_ib=G,
                drop_thresh=0, n_lead=43, n_slot_tiles=1, keys_per_split=384, splits=43)
    for t in "q k v sk sv do o r qg kg vg".split():
        ints.update(zip((f"stride_{t}b", f"stride_{t}s", f"stride_{t}h"), (S * H * D, H * D, D)))
    return ints


def check_narrow_side_costs():
    """3 globals (G is then no compile-time constant, so a 64-key tile computes its masked columns): the forward and
    dQ kernels with the 16-key side tile have fewer SASS instructions than with the 64-key one, nothing spills, and
    the dQ kernel keeps two programs per SM (<= 128 registers at 8 warps); the side keys' dK/dV builds at
    ``side_tiles``' width and warps without spilling."""
    import re

    from longattn.triton_kernels import _common, band_side, global_rows

    from tests.test_longformer_op import _FUSED_TYPES
    from tests.test_triton_backend import ptxas_usage
    from tests.test_triton_bias_cost import compile_specialized, sass_instructions

    G = 3
    bm, bn, warps = _common.attention_tiles(64)
    side_n, side_warps = _common.side_tiles(G, 64)
    assert side_n < bn, (side_n, bn)

    def build(fn, constexprs, ints, num_warps, types=_FUSED_TYPES):
        kernel = compile_specialized(fn, constexprs, ints, num_warps, types)
        regs, spill = map(int, re.search(r"(\d+) registers, spill stores/loads \('(\d+)'",
                                         ptxas_usage(kernel.asm["ptx"])).groups())
        sass = len(sass_instructions(kernel.asm["cubin"]))
        print(f"{fn.__name__} {constexprs.get('BACKWARD', '')} {constexprs.get('SIDE_N', constexprs['BLOCK_N'])}: "
              f"{regs} registers, {spill} B spilled, {sass} SASS instructions")
        return regs, spill, sass

    lf = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, DOT_PREC="tf32", HAS_KMASK=True, HAS_SMASK=True, HAS_BBIAS=False,
              HAS_SBIAS=False, SIDE_INDEX=True, HAS_DROPOUT=False, GLOBAL_ROWS=True, SLOT_BLOCK=global_rows.SLOT_BLOCK)
    for backward in (False, True):
        step = dict(lf, BACKWARD=backward, **({} if backward else dict(KMASK_ROWS=True)))
        wide, narrow = (build(band_side._rows_kernel, dict(step, SIDE_N=n), _longformer_ints(G), warps)
                        for n in (bn, side_n))
        assert narrow[1] == wide[1] == 0 and narrow[2] < wide[2], (wide, narrow)
        if backward:
            assert narrow[0] <= 128, narrow
    keys_ints = dict(S=16384, N=G, H=12, GROUP=1, G=G, D=64, left=0, right=0, tiles_per_split=16,
                     stride_split=G * 768, stride_gb=G * 768, stride_gs=768, stride_gh=64, stride_ib=G, drop_thresh=0)
    for t in "q k v do".split():
        keys_ints.update(zip((f"stride_{t}b", f"stride_{t}s", f"stride_{t}h"), (16384 * 768, 768, 64)))
    keys = build(band_side._keys_kernel, dict(lf, BLOCK_N=side_n, SIDE=True, GLOBAL_ROWS=False), keys_ints,
                 side_warps, dict(DK="*fp32", DV="*fp32"))
    assert keys[1] == 0, keys


def test_narrow_side_kernels_sm90(monkeypatch):
    monkeypatch.delenv("LONGATTN_TRITON_TILES")  # the GPU tiles in the child
    run_sm90_compile("tests.test_triton_side_tile:check_narrow_side_costs")
