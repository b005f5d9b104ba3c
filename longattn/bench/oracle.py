"""``--check``: compare an implementation's output with the float64 oracle (``tests/reference.py``).

The oracle lives in the source tree's ``tests/`` (it is the tests' oracle too, DESIGN.md section 4), so it
is loaded by path from the checkout this package is imported from; an installed wheel without the tree
reports ``--check`` as unavailable. The oracle builds dense S x (S + G) tensors in float64, so only the
first ``CHECK_HEADS`` heads are checked (heads are independent) and a check that would not fit is skipped
with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from .cases import Case
from .impls import free_memory_bytes

CHECK_HEADS = 1
# A loose sanity bound on the max abs error vs the oracle (O(1) inputs); the strict per-backend rule
# (2x the torch backend's error + a floor) is enforced by the tests, not here.
CHECK_BOUND = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "tests" / "reference.py"


class CheckUnavailable(Exception):
    """The oracle cannot be run for this case; the message says why."""


@functools.cache
def _reference():
    if not REFERENCE_PATH.is_file():
        raise CheckUnavailable(f"the oracle {REFERENCE_PATH} is not there (installed without the source tree)")
    spec = importlib.util.spec_from_file_location("_longattn_bench_reference", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _heads(t, h):
    return None if t is None else t[:, :, :h]


def oracle_output(case: Case) -> torch.Tensor:
    """The float64 oracle output of ``case`` (heads ``[:CHECK_HEADS]`` for attention ops)."""
    ref, t, S = _reference(), case.tensors, case.S
    G = case.num_blocks if case.op == "tglobal" else 0
    if case.op == "aggregate":
        need = case.B * S * (case.num_blocks + case.H * case.D) * 8 * 3
    else:
        need = case.B * CHECK_HEADS * S * (S + G) * 8 * 6  # bias, scores, probs and masked copies
    free = free_memory_bytes(case.device)
    if need > 0.3 * free:
        raise CheckUnavailable(f"the dense float64 oracle needs ~{need / 2**30:.1f} GiB "
                               f"({free / 2**30:.1f} GiB free)")
    with torch.no_grad():
        if case.op == "aggregate":
            return ref.block_aggregate(t["x"], t["block_ids"], case.num_blocks, weight=t["weight"])
        h = CHECK_HEADS
        q, k, v = _heads(t["q"], h), _heads(t["k"], h), _heads(t["v"], h)
        if case.op == "longformer":
            return ref.longformer_attention(q, k, v, case.window, t["global_mask"])
        rel_bias = t["rel_bias"][:h] if "rel_bias" in t else None
        if case.op == "local":
            return ref.band_side_attention(q, k, v, window=case.window, band_bias=rel_bias, scale=case.scale)
        return ref.band_side_attention(q, k, v, _heads(t["side_k"], h), _heads(t["side_v"], h), case.window,
                                       side_mask=t["side_mask"], query_block=t["query_block"],
                                       band_bias=rel_bias, side_bias=t["side_bias"][:h] if "side_bias" in t else None,
                                       scale=case.scale)


def max_error(case: Case, out: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max abs difference between ``out`` (the full output) and the oracle's slice of it."""
    if case.op != "aggregate":
        out = out[:, :, :CHECK_HEADS]
    return (out.detach().double() - oracle).abs().max().item()


def within_bound(case: Case, err: float) -> bool:
    return err <= CHECK_BOUND.get(case.dtype, 1e-2)
