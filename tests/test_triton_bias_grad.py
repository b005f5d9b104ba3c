"""Bias-table gradients of the Triton backend (summed inside the dQ kernel, ``triton_kernels/bias_grad.py``).

Against the fp64 oracle with the tolerance rule, on the layouts that take each path of the reduction: band
tables over windows that are asymmetric, causal, wider than S; side tables whose block ids fit one group per
query tile (LongT5's ``i // block_len``), tiles mixing padding rows (-1) with far larger ids, and random ids
(several extra passes per tile); S not a multiple of the tile; plus bitwise determinism. Runs on a GPU or on
CPU under ``TRITON_INTERPRET=1`` (16 x 16 tiles: a side group spans 16 block ids).
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
