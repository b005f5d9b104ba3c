"""Nothing but longattn's kernels inside the ops (issue 12, target 2, on the GPU backends).

``tests/test_host_sync.py`` counts what a public call dispatches around its custom ops (each op one entry). This
file looks inside them: every call a public op makes to a custom op's implementation is recorded on CPU (torch
backend), then replayed with the backend set to "cuda" or "triton", logging what the implementation runs:

- CUDA: replayed on meta tensors. The raw ops of ``longattn._C`` then run their fake implementations, so no GPU is
  needed, and every aten op the Python around them dispatches is one the GPU would run as a kernel. A raw op counts
  as one entry whatever it launches inside (block aggregation's raw op launches its order kernel, then the sums: 2
  kernels and no torch op, which this replay cannot see).
- Triton: replayed on CPU tensors under ``TRITON_INTERPRET=1``; each kernel launch is counted (the interpreter's own
  tensor copies during a launch are not logged).

Allocations (``empty*``) and views move no data and are not counted. Every other aten op is torch glue: a GPU
kernel that is not longattn's. The tests assert there is none, and bound the number of longattn launches.
"""

from __future__ import annotations

import os

import pytest
import torch

import longattn
from longattn import _ops
from longattn.backends import _longformer
from tests.conftest import DeviceWork
from tests.test_host_sync import _calls, _inputs

_OPS = {  # forward and backward op of each autograd formula, and the index of their backend argument
    "band_side_attention": 13, "band_side_attention_backward": 16, "band_side_halo_attention_backward": 16,
    "longformer_attention": 12, "longformer_attention_backward": 18,
    "block_aggregate": 5, "block_aggregate_backward": 8,
}


def record_op_calls(name: str):
    """(op name, args) of every custom-op implementation the pattern ``name`` runs in a torch-backend forward and
    backward on CPU, in order."""
    calls = []
    real_call = _ops._call

    def recording(op, *args):
        calls.append((op._name.split("::")[-1], args))
        return real_call(op, *args)

    t = _inputs()
    call, leaves = _calls(t, "torch")[name]
    _ops._call = recording
    try:
        out = call()
        torch.autograd.grad(out, [t[n] for n in leaves], torch.randn_like(out))
    finally:
        _ops._call = real_call
    assert [op for op, _ in calls if op in _OPS] == [op for op, _ in calls], calls
    return calls


def _replay_args(op: str, args, backend: str, device: str):
    moved = [x.detach().to(device) if isinstance(x, torch.Tensor) else x for x in args]
    assert moved[_OPS[op]] == "torch", (op, moved[_OPS[op]])
    moved[_OPS[op]] = backend
    return moved


def replay(name: str, backend: str, device: str, launches: list | None = None):
    """[(op, glue ops, longattn raw ops, Triton launches)] of pattern ``name``'s op calls replayed on ``backend``."""
    report = []
    for op, args in record_op_calls(name):
        impl = getattr(_ops, op)._init_fn
        moved = _replay_args(op, args, backend, device)
        if launches is not None:
            launches.clear()
        with torch.no_grad(), DeviceWork() as work:
            impl(*moved)
        report.append((op, work.glue, work.kernels, list(launches or ())))
    return report


PATTERNS = list(_calls(_inputs(), "torch"))


# ---------------------------------------------------------------------------------------------------------------
# CUDA backend, on meta tensors (the raw ops' fakes): needs longattn._C, not a GPU
# ---------------------------------------------------------------------------------------------------------------

_CUDA_BUILT = hasattr(torch.ops.longattn, "cuda_band_side_fwd")

# Torch glue the CUDA backend still runs, by (pattern, key splits) (issue 12): none. A listed pattern would have to
# run exactly its list; shrink, never grow. (With S that no split size near ``SPLIT_KEYS`` divides, e.g. a prime S,
# the last split is padded: copies of k, v and the key mask, pinned in tests/test_cuda_longformer.py.)
CUDA_KNOWN_GLUE: dict = {}


@pytest.mark.skipif(not _CUDA_BUILT, reason="the CUDA extension longattn._C is not built")
@pytest.mark.parametrize("split_keys", [None, 16, 20], ids=["one-split", "key-splits", "key-splits-of-16"])
@pytest.mark.parametrize("name", PATTERNS)
def test_cuda_backend_runs_only_its_kernels(name, split_keys, monkeypatch):
    """``key-splits``: Longformer's global rows cut into 16-key splits (S = 48: three, merged by log-sum-exp);
    ``key-splits-of-16``: about 20 keys asked, 16 taken (``_longformer.whole_split``: whole splits, no padded copy)."""
    if split_keys:
        if not name.startswith("longformer"):
            pytest.skip("only Longformer's global rows split their keys")
        monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    report = replay(name, "cuda", "meta")
    glue = [op for _, ops, _, _ in report for op in ops]
    assert sorted(glue) == sorted(CUDA_KNOWN_GLUE.get((name, split_keys), [])), report
    for op, _, kernels, _ in report:
        assert kernels, f"{op}: no longattn kernel ran ({report})"


@pytest.mark.skipif(not _CUDA_BUILT, reason="the CUDA extension longattn._C is not built")
@pytest.mark.parametrize("split_keys", [None, 16], ids=["one-split", "key-splits"])
def test_cuda_packed_longformer_glue_is_the_first_calls_only(split_keys, monkeypatch):
    """Packed Longformer on CUDA (meta replay): the slots' ranges and their shift into the key splits are torch ops
    (``_longformer.slot_ranges``, ``KeySplits.ranges``), run by the first call and kept: a repeated call with the
    same masks and ranges, and its backward, run only longattn's kernels, the padded op's raw ops (the band pass takes
    the ranges in its own launch)."""
    from tests.test_cuda_launch_counts import CUDA_RAW_OPS

    if split_keys:
        monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    T, H, D, G = 48, 2, 16, 3
    q, k, v, dout = (torch.empty(1, T, H, D, device="meta") for _ in range(4))
    glob = torch.zeros(1, T, dtype=torch.bool, device="meta")
    key_ranges = torch.empty(1, T, 2, dtype=torch.int32, device="meta")
    forward, backward = _ops.longformer_attention._init_fn, _ops.longformer_attention_backward._init_fn

    def call():
        with torch.no_grad(), DeviceWork() as fwd_work:
            out, lse, glse, band_rows, pos, used = forward(q, k, v, None, None, None, glob, None, 4, 4, 0.25, G,
                                                           "cuda", 0.0, None, key_ranges)
        with torch.no_grad(), DeviceWork() as bwd_work:
            backward(dout, q, k, v, None, None, None, out, lse, glse, band_rows, pos, used, glob, None, 4, 4, 0.25,
                     "cuda", 0.0, None, key_ranges)
        return fwd_work, bwd_work

    first_fwd, first_bwd = call()
    assert sorted(first_bwd.glue) == sorted(CUDA_PACKED_LONGFORMER_GLUE[1]), first_bwd.glue
    assert len(first_fwd.glue) > len(CUDA_PACKED_LONGFORMER_GLUE[0]), first_fwd.glue  # the ranges: computed here
    again_fwd, again_bwd = call()
    assert sorted(again_fwd.glue) == sorted(CUDA_PACKED_LONGFORMER_GLUE[0]), again_fwd.glue
    assert sorted(again_bwd.glue) == sorted(CUDA_PACKED_LONGFORMER_GLUE[1]), again_bwd.glue
    assert again_fwd.kernels == first_fwd.kernels and again_bwd.kernels == first_bwd.kernels
    assert (again_fwd.kernels, again_bwd.kernels) == CUDA_RAW_OPS["longformer"], (again_fwd.kernels, again_bwd.kernels)


# What the CUDA packed Longformer still runs around its kernels on every call (forward, backward): nothing. Its band
# pass is one raw op each way (the kIndexed && kRanges kernels read the slots' tokens in place and the rows' key and
# slot ranges; no gather, masked_fill or scatter_add of ``_longformer.gathered_band_*``); only the first call computes
# the ranges. Shrink, never grow.
CUDA_PACKED_LONGFORMER_GLUE = ([], [])


# ---------------------------------------------------------------------------------------------------------------
# Triton backend, under the interpreter: every launch counted
# ---------------------------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Longattn launches per op call (forward op, backward op) of each pattern, as measured: at most the 2 / 4.
# Longformer's forward is the slots kernel and one band launch led by the global rows' split-KV programs; its backward
# the band's four launches with the global rows folded in (``triton_kernels/longformer.py``). More fails: a new launch
# needs a reason here.
TRITON_LAUNCH_LIMITS = {"local": (1, 3), "tglobal": (1, 4), "block_aggregate": (2, 3),
                        "longformer": (2, 4), "longformer-global-projections": (2, 4)}


@pytest.mark.skipif(not _INTERPRET or bool(longattn.available_backends("cpu")["triton"]),
                    reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", PATTERNS)
def test_triton_backend_runs_only_its_kernels(name, triton_launches):
    report = replay(name, "triton", "cpu", triton_launches)
    assert [op for _, ops, _, _ in report for op in ops] == [], report
    fwd_limit, bwd_limit = TRITON_LAUNCH_LIMITS[name]
    (_, _, _, fwd), (_, _, _, bwd) = report
    assert 1 <= len(fwd) <= fwd_limit, report
    assert 1 <= len(bwd) <= bwd_limit, report
