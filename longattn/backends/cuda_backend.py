"""The CUDA backend: hand-written kernels compiled into ``longattn._C`` (sources in ``csrc/``).

The extension registers four raw ops with the dispatcher (schemas in ``csrc/extension.cpp``, CUDA
implementations in ``csrc/*_api.cpp``); this module gives them fake (meta) implementations so they trace
under ``torch.compile`` / FakeTensor, says when the backend cannot run, and maps the backend contract of
``longattn.backends`` onto them. Nothing here touches CUDA unless the device asked about is a CUDA device.

Kernel design (see csrc/band_side/*.h): flash-attention-2 style tiles of 64 queries x 64 keys, 4 warps,
``mma.sync.m16n8k16`` + ``ldmatrix`` + ``cp.async`` double buffering, online softmax, lse saved; backward
as three kernels (delta, dQ per query tile, dK/dV per key tile) with no atomics, so gradients are bitwise
reproducible. Attention dropout (``dropout_p > 0``) runs in separate instantiations of the same kernels
(``csrc/band_side/dropout.h``: Philox bits of ``longattn._dropout``'s counter layout, regenerated in the
backward), so ``dropout_p = 0`` runs exactly the dropout-free code. Per-row key ranges (``key_ranges`` /
``side_ranges``, the feature ``"ranges"`` of packed variable-length batches) likewise
(``csrc/band_side/ranges.h``): a query tile walks only the key tiles its rows' ranges meet and masks element
by element only on a range's edge tiles; a dK/dV key tile visits only the query tiles whose rows' ranges meet it.
"""

from __future__ import annotations

import torch

from . import _longformer

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# block_aggregate is a segment sum + RMS norm, no tensor cores: float32 is supported as well.
AGGREGATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MIN_CAPABILITY = (8, 0)  # mma.sync bf16, cp.async, ldmatrix

_BUILD_HINT = ("build it with `TORCH_CUDA_ARCH_LIST=<arch> pip install --no-build-isolation -e .` "
               "in an environment with a CUDA toolkit (nvcc) and a CUDA build of torch")

try:
    from .. import _C  # noqa: F401  (loads the library: registers the raw ops)

    _IMPORT_ERROR = None
except ImportError as exc:  # a pure-Python install: the backend reports itself unavailable
    _C = None
    _IMPORT_ERROR = exc

_ARCH_NAMES = {"Ampere": "8.0;8.6", "Ada": "8.9", "Hopper": "9.0", "Blackwell": "10.0;12.0"}


def built_archs() -> list[tuple[int, int, bool]]:
    """The (major, minor, has_ptx) archs longattn._C was compiled for, parsed from TORCH_CUDA_ARCH_LIST."""
    if _C is None:
        return []
    spec = getattr(_C, "cuda_archs", "")
    for name, value in _ARCH_NAMES.items():
        spec = spec.replace(name, value)
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX").rstrip("afAF")  # 9.0a -> 9.0
        try:
            major, minor = (int(x) for x in item.split(".", 1))
        except ValueError:
            continue
        archs.append((major, minor, ptx))
    return archs


def _runs_on(capability: tuple[int, int]) -> bool:
    # Cubins run on the same major and any minor >= theirs; PTX JIT-compiles for any newer arch.
    major, minor = capability
    for a_major, a_minor, ptx in built_archs():
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= capability):
            return True
    return False


def unavailable_reasons(device) -> list[str]:
    device = torch.device(device)
    if _C is None:
        return [f"the CUDA extension longattn._C is not built ({_IMPORT_ERROR}); {_BUILD_HINT}"]
    if device.type != "cuda":
        return [f"needs a CUDA device; got {device.type}"]
    if not torch.cuda.is_available():
        return ["needs a CUDA device; none is visible"]
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return [f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (mma.sync bf16, cp.async); "
                f"{device} has {capability[0]}.{capability[1]}"]
    if not _runs_on(capability):
        return [f"longattn._C was built for TORCH_CUDA_ARCH_LIST={_C.cuda_archs}, which does not include "
                f"sm_{capability[0]}{capability[1]}; rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}"]
    return []


GROUPED_KV_REASON = "grouped-query attention (H_kv < H) is not supported by the CUDA kernels yet"


def unsupported_reasons(device, dtype, head_dim, op, features=()) -> list[str]:
    """Accepts the features ``"dropout"`` and ``"ranges"`` (per-row key ranges); declines ``"grouped_kv"``."""
    reasons = unavailable_reasons(device)
    if "grouped_kv" in features and op == "band_side":
        reasons.append(GROUPED_KV_REASON)  # the csrc kernels index K/V by the query head
    if reasons:
        return reasons
    if op == "block_aggregate":
        if dtype not in AGGREGATE_DTYPES:
            reasons.append(f"block_aggregate takes {AGGREGATE_DTYPES}; got {dtype}")
        return reasons
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"the attention kernels take float16 / bfloat16 (tensor-core mma); got {dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        # 16 would need its own tile shape (a 16-wide k-step per tile); the torch/Triton backends cover it.
        reasons.append(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {head_dim}")
    return reasons


# ------------------------------------------------------------------------------------------------------
# The backend contract (see longattn.backends)
# ------------------------------------------------------------------------------------------------------


def band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                      left, right, scale, dropout_p=0.0, rng=None, global_rows=False, key_ranges=None,
                      side_ranges=None):
    """``global_rows``: the rows are Longformer global rows (slot s = row s; the global-row dropout counters).
    ``key_ranges`` / ``side_ranges``: None or contiguous int32 (B, S, 2), row i's band / side keys [lo, hi)
    (with ``global_rows``, ``side_ranges`` holds each slot's key range: the tokens are the side keys)."""
    return tuple(torch.ops.longattn.cuda_band_side_fwd(
        q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
        float(scale), float(dropout_p), rng, global_rows, key_ranges, side_ranges))


def band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                       band_bias, side_bias, left, right, scale, dropout_p=0.0, rng=None, global_rows=False,
                       key_ranges=None, side_ranges=None):
    return tuple(torch.ops.longattn.cuda_band_side_bwd(
        dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
        left, right, float(scale), float(dropout_p), rng, global_rows, key_ranges, side_ranges))


def block_aggregate_forward(x, block_ids, num_blocks, weight, eps):
    return tuple(torch.ops.longattn.cuda_block_aggregate_fwd(x, block_ids, num_blocks, weight, float(eps)))


def block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    return tuple(torch.ops.longattn.cuda_block_aggregate_bwd(dout, x, block_ids, num_blocks, weight, sums, rstd,
                                                             float(eps)))


# Longformer global rows (longattn.backends._longformer): the raw band op with the slot queries as the sequence
# and all S tokens as side keys (no split-KV kernel in csrc yet: the side loop of one query tile walks all S).
global_rows_forward, global_rows_backward = _longformer.rows_via_band_side(band_side_forward, band_side_backward)


# ------------------------------------------------------------------------------------------------------
# Fake (meta) implementations of the raw ops: shapes and dtypes only, matching csrc/*_api.cpp.
# ------------------------------------------------------------------------------------------------------


def _register_fakes():
    from .. import _fake

    @torch.library.register_fake("longattn::cuda_band_side_fwd")
    def _(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
          scale, dropout_p=0.0, rng=None, dropout_global_rows=False, key_ranges=None, side_ranges=None):
        return _fake.band_side_forward(q)

    @torch.library.register_fake("longattn::cuda_band_side_bwd")
    def _(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
          side_bias, left, right, scale, dropout_p=0.0, rng=None, dropout_global_rows=False, key_ranges=None,
          side_ranges=None):
        return _fake.band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias)

    @torch.library.register_fake("longattn::cuda_block_aggregate_fwd")
    def _(x, block_ids, num_blocks, weight, eps):
        return _fake.block_aggregate_forward(x, num_blocks, weight)

    @torch.library.register_fake("longattn::cuda_block_aggregate_bwd")
    def _(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
        return _fake.block_aggregate_backward(x, weight)


if _C is not None and hasattr(torch.ops.longattn, "cuda_band_side_fwd"):
    _register_fakes()
