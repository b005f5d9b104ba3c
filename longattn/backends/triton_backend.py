"""The Triton backend: fused kernels from ``longattn.triton_kernels`` (sources in the top-level ``triton_kernels/``).

Implements the contract of ``longattn.backends``. Triton is imported only when a kernel runs or a
capability is asked for, so ``import longattn`` works without Triton; nothing here initialises CUDA for a
CPU device. On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, a test
vehicle, not a fast path).

What it takes:
- dtypes float16, bfloat16 (CUDA only: the interpreter cannot run bf16) and float32 (exact fp32 products,
  no TF32); float64 is left to the torch backend.
- band_side: head dims 1..128 (padded to a power of two >= 16 inside the kernels, masked), any S >= 1,
  any G >= 0, any strides with a unit last stride; grouped-query K/V (``H_kv`` dividing H: the kernels index
  K/V by ``h // (H // H_kv)`` and sum dK/dV over each group in registers).
- block_aggregate: any channel count C.
- global_slots: Longformer's slot layout in one launch (``triton_kernels/slots.py``), masks with any strides.
- features: ``"grouped_kv"``, ``"dropout"``, ``"ranges"`` (per-row key ranges of packed variable-length batches,
  ``key_ranges`` / ``side_ranges`` on the band and global-rows functions), ``"halo"`` (band keys beyond both ends
  read in place from halo buffers: ``halo_k``, ``halo_v``, ``halo_mask``, ``halo_left`` on the band functions, with or
  without dropout), ``"lse_grad"`` (``dlse`` on ``band_side_backward``) and ``"dropout_offset"`` (``dropout_offset``
  on the band functions: rows and band keys draw their dropout bits that many positions on), see
  ``notes/halo_contract.md``; any other is declined.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from . import _longformer

NAME = "triton"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
FEATURES = ("grouped_kv", "dropout", "ranges", "halo", "lse_grad", "dropout_offset")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reasons(device) -> list[str]:
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed (pip install triton)"]
    try:
        import triton  # noqa: F401  (does not touch the GPU)
    except Exception as exc:  # a broken install says why
        return [f"importing Triton failed: {exc!r}"]
    if device.type == "cpu":
        if _interpret():
            return []
        return ["Triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1 (tests)"]
    if device.type != "cuda":
        return [f"Triton kernels need a CUDA device, got {device.type!r}"]
    if not torch.cuda.is_available():
        return ["no CUDA device is visible (torch.cuda.is_available() is False)"]
    return []


def unsupported_reasons(device, dtype, head_dim, op, features=()) -> list[str]:
    reasons = unavailable_reasons(device)
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not one of {SUPPORTED_DTYPES} (float64 runs on the torch backend)")
    elif dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        reasons.append("bfloat16 cannot run under Triton's CPU interpreter (TRITON_INTERPRET=1)")
    elif dtype == torch.bfloat16 and not reasons and torch.cuda.get_device_capability(device) < (8, 0):
        reasons.append("bfloat16 tensor-core products need compute capability >= 8.0")
    reasons += [f"feature {f!r} is not supported (the Triton backend takes {FEATURES})" for f in features
                if f not in FEATURES]
    if op == "band_side" and not 1 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is not in [1, {MAX_HEAD_DIM}] (tiles are sized for D <= 128)")
    elif op not in ("band_side", "block_aggregate"):
        reasons.append(f"unknown op {op!r}")
    return reasons


def band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                      left, right, scale, dropout_p=0.0, rng=None, *, key_ranges=None, side_ranges=None, halo_k=None,
                      halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0):
    """``halo_*``: band keys beyond both ends of the sequence (``notes/halo_contract.md``), passed only when used.
    ``dropout_offset``: an int >= 0, a multiple of 4; with dropout, query i and band key j (halo keys at their local
    j) draw the bits of row i + o and key j + o (a sequence-parallel shard's start), side keys keep theirs."""
    from longattn.triton_kernels import band_side

    return band_side.forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias,
                             side_bias, left, right, scale, dropout_p, rng, key_ranges=key_ranges,
                             side_ranges=side_ranges, halo_k=halo_k, halo_v=halo_v, halo_mask=halo_mask,
                             halo_left=halo_left, dropout_offset=dropout_offset)


def band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                       band_bias, side_bias, left, right, scale, dropout_p=0.0, rng=None, *, key_ranges=None,
                       side_ranges=None, halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dlse=None,
                       dropout_offset=0):
    """With a halo (as in ``band_side_forward``) a 9-tuple: the 7 gradients, then dhalo_k, dhalo_v. ``dlse``: None
    or float32 (B, H, S), the gradient w.r.t. the forward's lse. ``dropout_offset``: as in ``band_side_forward``."""
    from longattn.triton_kernels import band_side

    return band_side.backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                              band_bias, side_bias, left, right, scale, dropout_p, rng, key_ranges=key_ranges,
                              side_ranges=side_ranges, halo_k=halo_k, halo_v=halo_v, halo_mask=halo_mask,
                              halo_left=halo_left, dlse=dlse, dropout_offset=dropout_offset)


def longformer_forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, G,
                       dropout_p=0.0, rng=None, key_ranges=None):
    """The whole Longformer op (``longattn.backends._longformer.forward``) in two launches: the slots, then the band
    pass with the global rows' split-KV programs in front (``triton_kernels/longformer.py``)."""
    from longattn.triton_kernels import longformer

    return longformer.forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale,
                              G, dropout_p, rng, key_ranges)


def longformer_backward(dout, q, k, v, q_global, k_global, v_global, *rest):
    """Backward of ``longformer_forward`` (``_longformer.backward``'s arguments) in the band backward's four launches;
    a separate k_global without a separate v_global (or the reverse) takes the composed backward."""
    if (k_global is None) != (v_global is None):
        return _longformer.composed_backward(sys.modules[__name__], dout, q, k, v, q_global, k_global, v_global, *rest)
    from longattn.triton_kernels import longformer

    return longformer.backward(dout, q, k, v, q_global, k_global, v_global, *rest)


def longformer_band_forward(q, k, v, pos, used, band_rows, key_padding_mask, left, right, scale, dropout_p=0.0,
                            rng=None, *, key_ranges=None, side_ranges=None):
    """Longformer's band pass (``longattn.backends._longformer`` step 2) in one launch: the used slots' tokens
    ``pos`` (B, G) of k, v read in place as side keys; rows not in ``key_padding_mask`` get out = 0 and rows not
    in ``band_rows`` lse = +inf inside the kernel. -> (out, lse). ``key_ranges`` / ``side_ranges`` (B, S, 2) as
    in ``band_side_forward`` (side key g = slot g)."""
    from longattn.triton_kernels import band_side

    return band_side.forward(q, k, v, k, v, band_rows, used, None, None, None, left, right, scale, dropout_p, rng,
                             side_index=pos, query_mask=key_padding_mask, band_rows_only=True, key_ranges=key_ranges,
                             side_ranges=side_ranges)


def longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, left, right, scale, dropout_p=0.0,
                             rng=None, *, key_ranges=None, side_ranges=None):
    """Backward of ``longformer_band_forward`` -> (dq, dk, dv), the side keys' dK/dV added into the rows ``pos``
    of dk, dv by a kernel (no scatter)."""
    from longattn.triton_kernels import band_side

    dq, dk, dv, *_ = band_side.backward(dout, q, k, v, k, v, out, lse, band_rows, used, None, None, None, left, right,
                                        scale, dropout_p, rng, side_index=pos, key_ranges=key_ranges,
                                        side_ranges=side_ranges)
    return dq, dk, dv


def block_aggregate_forward(x, block_ids, num_blocks, weight, eps):
    from longattn.triton_kernels import block_aggregate

    return block_aggregate.forward(x, block_ids, num_blocks, weight, eps)


def block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    from longattn.triton_kernels import block_aggregate

    return block_aggregate.backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps)


def global_slots(global_mask, key_padding_mask, G):
    """Longformer's slot layout (``longattn.backends._longformer.global_slots``, bitwise equal) in one kernel launch:
    -> (band_rows (B, S) bool, pos (B, G) int64, used (B, G) bool); the masks are read in place (any strides)."""
    from longattn.triton_kernels import slots

    return slots.global_slots(global_mask, key_padding_mask, G)


def global_rows_forward(q, k, v, pos, used, key_mask, scale, out, dropout_p=0.0, rng=None, *, key_ranges=None):
    """Longformer's global rows (contract: ``longattn.backends._longformer.rows_by_gather``), split over keys;
    ``key_ranges`` (B, G, 2) int32: the keys each slot may attend."""
    from longattn.triton_kernels import global_rows

    return global_rows.forward(q, k, v, pos, used, key_mask, scale, out, dropout_p, rng, key_ranges=key_ranges)


def global_rows_backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into,
                         dropout_p=0.0, rng=None, *, key_ranges=None):
    from longattn.triton_kernels import global_rows

    return global_rows.backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into,
                                dropout_p, rng, key_ranges=key_ranges)
