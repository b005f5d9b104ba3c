"""How many of longattn's raw ops each public op runs on the CUDA backend (issue 12, target 2), pinned per call.

``tests/test_backend_glue.py`` replays every public op's custom-op calls on the CUDA backend on meta tensors (the raw
ops run their fakes) and asserts that no torch glue runs around them. This file pins the raw ops themselves, in order,
for the forward and the backward op of each pattern: a raw op added to a path (a copy kernel in disguise, such as the
per-split copy of the global rows that ``query_index`` replaced) fails here and needs its reason written beside the
table. A raw op counts as one however many kernels it launches inside (the band op's forward: the band kernel, after a
conversion of 16-bit bias tables to float32 when given such tables; its backward: delta (which converts them), dQ,
dK/dV and, when partials are owed, the finish kernel; kernels are counted on GPU by
``tests/test_host_sync.py::test_gpu_no_sync_and_kernel_count``).
"""

from __future__ import annotations

import pytest
import torch

from longattn.backends import _longformer
from tests.test_backend_glue import PATTERNS, replay

_CUDA_BUILT = hasattr(torch.ops.longattn, "cuda_band_side_fwd")

_BAND_FWD, _BAND_BWD = "longattn.cuda_band_side_fwd", "longattn.cuda_band_side_bwd"
_SLOTS, _FUSED = ("longattn.cuda_longformer_" + x for x in ("global_slots", "fwd"))
# Longformer: forward = the slot layout (whose launch also zeroes the fused launch's arrival counters), then the fused
# forward, one launch: the global rows' split CTAs over the key splits (side_only, query_index: the slots' rows read in
# place; the last CTA of a slot tile to arrive merges the splits into out) leading the band pass's CTAs (kIndexed:
# global keys read in place) (cuda_backend.longformer_forward; dropout keeps the composed 4, slots / band pass / global
# rows / merge). Packed (per-row key ranges): the same raw ops, the band CTAs taking the ranges (kIndexed && kRanges),
# pinned from the second call on (the first computes the ranges) by
# tests/test_backend_glue.py::test_cuda_packed_longformer_glue_is_the_first_calls_only.
# The backward is one raw op, cuda_longformer_bwd (cuda_backend.longformer_backward: 4 launches, delta / dQ of both
# passes / band dK/dV / the global rows' dK/dV with the band's side-key finish and the splits' dq sum), with or
# without separate global projections; dropout keeps the composed three (band pass, global rows, dq add).
_LONGFORMER = ([_SLOTS, _FUSED], ["longattn.cuda_longformer_bwd"])
CUDA_RAW_OPS = {  # pattern -> (forward op's raw ops, backward op's raw ops)
    "local": ([_BAND_FWD], [_BAND_BWD]),
    "tglobal": ([_BAND_FWD], [_BAND_BWD]),
    "block_aggregate": (["longattn.cuda_block_aggregate_fwd"], ["longattn.cuda_block_aggregate_bwd"]),
    "longformer": _LONGFORMER,
    "longformer-global-projections": _LONGFORMER,
}


def test_every_pattern_is_pinned():
    assert sorted(CUDA_RAW_OPS) == sorted(PATTERNS)


@pytest.mark.skipif(not _CUDA_BUILT, reason="the CUDA extension longattn._C is not built")
@pytest.mark.parametrize("split_keys", [None, 16], ids=["one-split", "key-splits"])
@pytest.mark.parametrize("name", PATTERNS)
def test_cuda_raw_ops_per_call(name, split_keys, monkeypatch):
    """``key-splits``: Longformer's global rows over three 16-key splits (S = 48), which once added a copy of the slots'
    rows per split (three of them in the backward): the same raw ops as one split."""
    if split_keys:
        if not name.startswith("longformer"):
            pytest.skip("only Longformer's global rows split their keys")
        monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    report = replay(name, "cuda", "meta")
    assert len(report) == 2, report  # one forward op, one backward op
    (_, fwd_glue, fwd, _), (_, bwd_glue, bwd, _) = report
    assert (fwd, bwd) == CUDA_RAW_OPS[name], report
    assert fwd_glue == [] and bwd_glue == [], report
