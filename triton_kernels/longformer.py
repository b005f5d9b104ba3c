"""Longformer / LED attention on the Triton kernels in the fewest launches (``longattn.backends._longformer`` is the
spec: the same slot layout, band pass and global rows, bitwise the same steps).

- Forward, two launches: the slots kernel (``slots.global_slots``, which also zeroes the global rows' arrival
  counters), then one ``band_side._rows_kernel`` launch whose leading programs are the global rows' split-KV programs
  (the last of each slot tile to finish merges them: ``global_rows.combine_when_last``) and whose other programs are
  the band pass with the slots' tokens as side keys.
- Backward, the band backward's four launches (``band_side.backward`` with ``fused_rows``): the global rows' partial
  dq lead the dQ pass, their dK/dV are summed into the band dK/dV programs' registers, the side keys' pass is the
  band's, and the one reduction also adds the global rows' dq.

Packed batches (``key_ranges``): the slots kernel also writes the slots' ranges (``_longformer.slot_ranges``) and
their per-tile bounds, kept for the next call with the same masks and ranges (``slots._PACKED_RANGES``): the
backward, and the other layers' calls, reuse them (else, e.g. under ``torch.compile``, the backward recomputes them
in one more launch of the slots kernel). Separate
global key and value projections must come together (both or neither) for the fused backward (the Triton backend
runs the composed backward otherwise).
"""

from __future__ import annotations

import torch

from longattn.backends import _longformer

from . import band_side, global_rows, slots
from ._common import attention_tiles


def forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, G,
            dropout_p=0.0, rng=None, key_ranges=None):
    """-> (out, lse, glse, band_rows, pos, used), as ``_longformer.forward``."""
    B, S, H, D = q.shape
    qg, kg, vg = _longformer.global_projections(q, k, v, q_global, k_global, v_global)
    counter = torch.empty(global_rows.FusedRows.counter_shape(q, G), dtype=torch.int32, device=q.device) if G else None
    band_rows, pos, used, *ranges = slots.global_slots(global_mask, key_padding_mask, G, zero=counter,
                                                       key_ranges=key_ranges, tiles=_tiles(D))
    band_ranges, row_ranges = ranges or ({}, {})
    fused = None
    if G:
        fused = global_rows.FusedRows(qg, kg, vg, pos, used, key_padding_mask, scale, **row_ranges, counter=counter)
    out, lse = band_side.forward(q, k, v, k, v, band_rows, used, None, None, None, left, right, scale, dropout_p, rng,
                                 side_index=pos, query_mask=key_padding_mask, band_rows_only=True,
                                 fused_rows=fused, **band_ranges)
    glse = fused.glse if G else lse.new_empty(B, H, 0)
    return out, lse, glse, band_rows, pos, used


def backward(dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
             key_padding_mask, left, right, scale, dropout_p=0.0, rng=None, key_ranges=None):
    """-> (dq, dk, dv, dq_global, dk_global, dv_global), as ``_longformer.backward`` (absent global gradients empty)."""
    G = glse.shape[-1]
    band_ranges, row_ranges = slots.slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges,
                                                _tiles(q.shape[-1]))
    if (k_global is None) != (v_global is None):
        raise ValueError("k_global, v_global: the fused backward takes both or neither "
                         "(longattn.backends._longformer.composed_backward runs the others)")
    fused = None
    if G:
        qg, kg, vg = _longformer.global_projections(q, k, v, q_global, k_global, v_global)
        fused = global_rows.FusedRows(qg, kg, vg, pos, used, key_padding_mask, scale, **row_ranges, out=out,
                                      glse=glse, new_q=q_global is not None, new_kv=k_global is not None)
    dq, dk, dv, *_ = band_side.backward(dout, q, k, v, k, v, out, lse, band_rows, used, None, None, None, left, right,
                                        scale, dropout_p, rng, side_index=pos, fused_rows=fused, **band_ranges)
    # Distinct empty tensors for absent gradients: a custom op's outputs may not alias one another.
    if G == 0:
        return dq, dk, dv, *_longformer.no_global_rows_grads(q, q_global, k_global, v_global)
    return dq, dk, dv, *(q.new_empty(0) if g is None else g for g in (fused.dq, fused.dk, fused.dv))


def _tiles(D: int) -> tuple[int, int]:
    """(the band pass's BLOCK_M, the global rows' slot tile): the tilings of the packed ranges' bounds."""
    return attention_tiles(D)[0], global_rows.SLOT_BLOCK
