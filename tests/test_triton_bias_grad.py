"""Bias-table gradients of the Triton backend (summed inside the dK/dV kernels, ``triton_kernels/bias_grad.py``).

Against the fp64 oracle with the tolerance rule, on the layouts that take each path of the reduction: band
tables over windows that are asymmetric, causal, wider than S; side tables whose block ids fit one group per
query tile (LongT5's ``i // block_len``), tiles mixing padding rows (-1) with far larger ids, and random ids
(several groups per tile); S not a multiple of the tile; plus bitwise determinism. Runs on a GPU or on CPU under
``TRITON_INTERPRET=1`` (16 x 16 tiles: a side group spans 16 block ids; side dK/dV programs of about 2 side-key
tiles each, ``_common.partial_programs``, so a side row takes the sums of several tiles). Also: one side-key tile
per program and uneven runs of tiles per program, and the budget rule of the partials at GPU sizes (pure Python).
And the forward's two ways of adding the tables: through the product's accumulator, or after it where 1 / scale is
unsafe (``_common.bias_acc``).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import INTERPRET, check_backend_against_oracle, grads, make_case, needs_triton
from tests.conftest import TRITON_DEVICE as DEVICE

pytestmark = needs_triton


def _longt5_case(B, S, block_len, valid, *, window=(5, 5), seed=0):
    """Side keys = blocks of ``block_len`` tokens; row b keeps ``valid[b]`` tokens, the rest padding (block -1)."""
    G = S // block_len
    case = make_case(B=B, S=S, H=2, D=16, window=window, G=G, bias=True, padding="tail", side_padding=True,
                     seed=seed, device=DEVICE)
    ids = torch.arange(S, device=DEVICE) // block_len
    case.query_block = torch.stack([torch.where(ids * block_len + block_len <= n, ids, -1) for n in valid])
    return case


CASES = {
    # Ids within one group per tile; the tail tile of row 1 mixes ids 12..13 with -1 (one extra pass).
    "longt5-blocks": lambda: _longt5_case(2, 45, 2, [45, 28]),
    # Ids 16 apart inside a 16-row tile never share a group: padding rows next to ids >= 16.
    "padding-far-below": lambda: _longt5_case(1, 70, 1, [40], window=(3, 9)),
    # Random ids in [-1, 40): several passes per tile.
    "random-ids": lambda: make_case(B=2, S=33, H=2, D=16, window=(2, 6), G=40, bias=True, device=DEVICE),
    "causal-band": lambda: make_case(B=2, S=50, H=2, D=16, window=(20, 0), G=0, bias=True, padding="tail",
                                     device=DEVICE),
    "window-wider-than-S": lambda: make_case(B=1, S=19, H=2, D=16, window=(30, 45), G=3, bias=True,
                                             device=DEVICE),
    "band-only-G=0": lambda: make_case(B=1, S=37, H=3, D=16, window=(9, 4), G=0, bias=True, device=DEVICE),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_bias_grads_match_oracle(name, dtype):
    case = CASES[name]()
    assert case.rel_bias is not None
    check_backend_against_oracle(case, "triton", dtype)


def test_side_table_without_side_keys_gets_zero_grad():
    # G = 0: side_bias has 2G + 1 = 1 entry and scores nothing; its gradient is exactly zero.
    import longattn

    case = make_case(B=1, S=20, H=2, D=16, window=(3, 3), G=0, device=DEVICE).cast(torch.float32)
    side_bias = torch.randn(2, 1, device=DEVICE, requires_grad=True)
    out = longattn.tglobal_attention(case.q, case.k, case.v, case.side_k, case.side_v, case.window,
                                     torch.full((1, 20), -1, device=DEVICE), side_bias=side_bias,
                                     backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), [side_bias])
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("scale", [1.0, 0.3, -0.7, 0.0, 2.0**-70], ids=["1", "0.3", "-0.7", "0", "2^-70"])
def test_forward_tables_through_the_accumulator(scale, monkeypatch):
    """The forward adds the tables through the product's accumulator, (q k^T + bias / scale) * scale, when 1 / scale
    is safe (``_common.bias_acc``: LongT5's scale 1, a negative one), after the product otherwise (0 attends by the
    tables alone; 2**-70); both against the oracle, with entries of -inf in both tables (offsets and side keys
    masked through the tables) and padding."""
    from longattn.triton_kernels import _common, band_side

    case = _longt5_case(2, 45, 2, [45, 28], window=(6, 4), seed=3)
    case.scale = scale
    with torch.no_grad():
        case.rel_bias[:, [0, 7]] = float("-inf")
        case.side_bias[1, ::3] = float("-inf")
    taken = []
    monkeypatch.setattr(band_side, "bias_acc", lambda *a: taken.append(_common.bias_acc(*a)) or taken[-1])
    check_backend_against_oracle(case, "triton", torch.float32)
    assert taken and set(taken) == {abs(scale) >= _common.BIAS_ACC_MIN_SCALE}, taken


def test_bias_grads_bitwise_deterministic():
    case = CASES["padding-far-below"]().cast(torch.float16)
    first = grads(case.run("triton"), case.leaves())
    second = grads(case.run("triton"), case.leaves())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRET, reason="tile override only under the interpreter (GPU tiles are fixed)")
@pytest.mark.parametrize("tiles", ["32,16,1", "16,32,1"], ids=["tall", "wide"])
def test_non_square_tiles(tiles, monkeypatch):
    # BLOCK_M != BLOCK_N (the GPU's D = 128 tiles are 64 x 32): the skewed width and the carry still line up.
    monkeypatch.setenv("LONGATTN_TRITON_TILES", tiles)
    check_backend_against_oracle(_longt5_case(2, 45, 2, [45, 28], window=(7, 20)), "triton", torch.float32)


def _spy_programs(monkeypatch, programs=None):
    """Record (side-key tiles, side dK/dV programs per (b, h, chunk)) of each backward; ``programs(n_tiles)``
    overrides the count."""
    from longattn.triton_kernels import _common, band_side

    seen = []

    def partial_programs(n_rows, n_tiles, row_bytes, q_bytes, device=None, *, spent=0):
        n = programs(n_tiles) if programs else _common.partial_programs(n_rows, n_tiles, row_bytes, q_bytes, device,
                                                                         spent=spent)
        seen.append((n_tiles, n))
        return n

    monkeypatch.setattr(band_side, "partial_programs", partial_programs)
    monkeypatch.setattr(band_side, "_plan_side", band_side._plan_side.__wrapped__)  # uncached: every plan is seen
    return seen


@pytest.mark.parametrize("name", ["longt5-blocks", "padding-far-below"])
def test_multi_tile_programs_match_oracle(name, monkeypatch):
    # The default launch: under the interpreter about 2 side-key tiles per side dK/dV program (uneven: G = 22 -> 2
    # tiles in 1 program, G = 70 -> 5 in 3), padding rows and padded side keys; each row summed across its tiles.
    seen = _spy_programs(monkeypatch)
    check_backend_against_oracle(CASES[name](), "triton", torch.float32)
    if INTERPRET:
        assert seen and all(n < tiles for tiles, n in seen)


@pytest.mark.parametrize("programs", [lambda n: n, lambda n: 1, lambda n: 2], ids=["one-tile-each", "one", "two"])
def test_tiles_per_program_match_oracle(programs, monkeypatch):
    # One side-key tile per program (the kernel without PERSISTENT, as on a GPU for S <= 65536), all tiles in one
    # program, and runs of 2 and 3 (interpreter: 5 side-key tiles of 16; GPU: 2 of 64).
    seen = _spy_programs(monkeypatch, programs)
    check_backend_against_oracle(CASES["padding-far-below"](), "triton", torch.float32)
    assert len(seen) == 1 and seen[0][1] == programs(seen[0][0])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="GPU tile sizes")
def test_persistent_side_keys_at_gpu_tiles(monkeypatch):
    # 4 side-key tiles of 64 (G = 256) in 3 runs per side dK/dV program (PERSISTENT), bf16, LongT5 blocks with a
    # padded tail: against the oracle, and bitwise equal over two runs.
    seen = _spy_programs(monkeypatch, lambda n: 3)
    case = _longt5_case(1, 4096, 16, [4000], window=(127, 127))
    check_backend_against_oracle(case, "triton", torch.bfloat16)
    assert seen[0] == (4, 3)
    case = case.cast(torch.bfloat16)
    first = grads(case.run("triton"), case.leaves())
    second = grads(case.run("triton"), case.leaves())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_partial_programs_budget(monkeypatch):
    # Issue 12 target 6: LongT5 TGlobal's bias partials (B = 1, H = 12, D = 64 bf16, W = 255, G = S / 16) on a
    # 132-SM device. The band rows (one per band dK/dV program and head) grow like S; one side row per side-key tile
    # would be quadratic in S (101 MiB at S = 131072); the budget keeps both to a few percent of the bytes of q, k,
    # v, o, dq, dk, dv above S = 32768, and one tile per program at S = 16384.
    from longattn.triton_kernels import _common, band_side, bias_grad

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "num_sms", lambda device=None: 132)
    rule = _common.partial_programs.__wrapped__  # uncached: the patched device facts
    monkeypatch.setattr(band_side, "partial_programs", rule)
    B, H, D = 1, 12, 64
    meta = dict(BLOCK_M=64, BLOCK_N=64)
    for S in (16384, 65536, 131072, 1 << 20):
        G = S // 16
        q = torch.empty(B, S, H, D, dtype=torch.bfloat16, device="meta")
        widths = bias_grad.row_widths(True, True, 255, G, 64)
        band_bytes = 4 * B * H * (S // 64) * widths[0]
        plan = band_side._side_plan(q, q, G, meta, widths, band_bytes)
        n_rows = B * H * plan.splits
        part_bytes = band_bytes + 4 * n_rows * plan.programs * widths[1]
        q_bytes = B * S * H * D * 2
        assert plan.tiles == G // 64
        if S == 16384:
            assert plan.programs == plan.tiles  # 9 MiB: the kernel as without persistence
        else:
            assert plan.programs < plan.tiles and part_bytes <= 0.05 * 7 * q_bytes
            assert n_rows * plan.programs >= 3 * 132 and n_rows * plan.programs % 132 == 0  # busy SMs, whole waves
        if S == 131072:
            assert part_bytes <= 64 << 20 < band_bytes + 4 * n_rows * plan.tiles * widths[1]
    assert rule(B * H, 2048, 0, 1 << 30) == 2048  # no partials: one tile per program
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    assert rule(B * H, 5, 4, 1) == 3 and rule(B * H, 1, 4, 1) == 1
