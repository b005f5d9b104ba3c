"""Output shapes and dtypes of the ops, for their fake (meta) implementations under ``torch.compile``.

One place for them, shared by the public custom ops (``longattn._ops``) and the raw CUDA extension ops
(``longattn.backends.cuda_backend``), which return the same tensors (contract in ``longattn.backends``).
"""

from __future__ import annotations

import torch
from torch import Tensor

_DENSE = torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of saved softmax / norm statistics: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_like(table: Tensor | None, like: Tensor) -> Tensor:
    """Gradient of an optional parameter: empty ``(0,)`` when it is absent."""
    return like.new_empty(0) if table is None else torch.empty_like(table, memory_format=_DENSE)


def band_side_forward(q: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, S, H, D) in q's dtype, lse (B, H, S) in the statistics dtype)."""
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=stat_dtype(q.dtype))


def band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias, halo_k=None) -> tuple[Tensor, ...]:
    """(dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias), contiguous, like their inputs (side keys may be
    None: no side keys, empty (B, 0, H_kv, D) gradients with k's head count); with ``halo_k`` also
    (dhalo_k, dhalo_v) like it."""
    if side_k is None:
        side_k = side_v = k.new_empty(k.shape[0], 0, k.shape[2], k.shape[3])
    halo = () if halo_k is None else tuple(torch.empty_like(halo_k, memory_format=_DENSE) for _ in range(2))
    return (
        *(torch.empty_like(x, memory_format=_DENSE) for x in (q, k, v, side_k, side_v)),
        _grad_like(band_bias, q),
        _grad_like(side_bias, q),
        *halo,
    )


def block_aggregate_forward(x: Tensor, num_blocks: int, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, num_blocks, C), sums (B, num_blocks, C), rstd (B, num_blocks)); stats empty without weight."""
    B, _, C = x.shape
    stat = stat_dtype(x.dtype)
    if weight is None:
        return x.new_empty(B, num_blocks, C), x.new_empty(0, dtype=stat), x.new_empty(0, dtype=stat)
    return (x.new_empty(B, num_blocks, C), x.new_empty(B, num_blocks, C, dtype=stat),
            x.new_empty(B, num_blocks, dtype=stat))


def block_aggregate_backward(x: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(dx (B, S, C) contiguous, dweight (C,) or empty)."""
    return torch.empty_like(x, memory_format=_DENSE), _grad_like(weight, x)
