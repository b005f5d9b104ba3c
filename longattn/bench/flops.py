"""Useful FLOPs (DESIGN.md section 5): forward = 4·B·H·S·keys·D, backward = 2.5 x forward.

``keys`` is the *real* mean number of keys a query attends (band keys inside the sequence, minus the
tokens that are not band keys, plus side keys), not the padded width a kernel happens to compute, so a
faster kernel cannot look better by doing wasted work. Counted in O(S) per row type, never with an S x S
mask (the tests check it against a brute-force count on small shapes).
"""

from __future__ import annotations

import torch

BACKWARD_FACTOR = 2.5  # 2 matmuls forward, 5 backward (dV, dP, dQ, dK and the recomputed P) -> 5/2


def band_counts(S: int, left: int, right: int) -> torch.Tensor:
    """(S,) int64: for each query i, how many j in [0, S) satisfy i - left <= j <= i + right."""
    i = torch.arange(S, dtype=torch.int64)
    return (torch.clamp(i + right, max=S - 1) - torch.clamp(i - left, min=0) + 1).clamp(min=0)


def mean_attended_keys(case) -> float | None:
    """Mean over all queries (and batch rows) of the number of attended keys; None for ``aggregate``."""
    S, (left, right) = case.S, case.window
    band = band_counts(S, left, right).double()
    if case.op == "local":
        return band.mean().item()
    if case.op == "tglobal":
        # Every valid block is a side key of every query (side_mask from tglobal_block_ids).
        side = case.tensors["side_mask"].sum(-1).double()  # (B,)
        return (band.mean() + side.mean()).item()
    if case.op == "longformer":
        is_global = case.tensors["global_mask"].cpu()  # (B, S)
        g = is_global.long()
        # Global keys inside each query's window, via a prefix sum: they leave the band, join as side keys.
        prefix = torch.nn.functional.pad(g.cumsum(-1), (1, 0))
        i = torch.arange(S)
        hi, lo = torch.clamp(i + right, max=S - 1) + 1, torch.clamp(i - left, min=0)
        globals_in_band = prefix[:, hi] - prefix[:, lo]
        num_global = g.sum(-1, keepdim=True)
        local_rows = band[None, :] - globals_in_band + num_global  # (B, S)
        keys = torch.where(is_global, torch.full_like(local_rows, S, dtype=torch.float64), local_rows.double())
        return keys.mean().item()
    return None


def attention_flops(case, keys: float | None = None) -> float | None:
    """Forward FLOPs of an attention case, 4·B·H·S·keys·D (None for ``aggregate``)."""
    keys = mean_attended_keys(case) if keys is None else keys
    if keys is None:
        return None
    return 4.0 * case.B * case.H * case.S * keys * case.D


def dense_flops(case) -> float:
    """Forward FLOPs of dense attention over the same q, k, v (every query attends all S keys)."""
    return 4.0 * case.B * case.H * case.S * case.S * case.D


def pass_flops(forward_flops: float | None, which: str) -> float | None:
    """FLOPs of a pass ("fwd", "bwd", "fwdbwd") given the forward count."""
    if forward_flops is None:
        return None
    return forward_flops * {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwdbwd": 1.0 + BACKWARD_FACTOR}[which]
