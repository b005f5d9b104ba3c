"""Halo exchange for the band: each rank receives the ``left`` keys before its shard and the ``right`` after it.

Rank ``r`` holds ``[a, b)``. Its band queries need keys ``[a - left, b + right)`` clipped to ``[0, S)``: a left
halo of ``hl = min(left, a)`` tokens and a right halo of ``hr = min(right, S - b)``. For every peer ``p`` the
part of ``[a, b)`` that ``p`` needs is one contiguous slice (``p``'s left halo if ``p > r``, its right halo if
``p < r``), so the whole exchange is **one** autograd all-to-all of the packed ``[k | v | key mask]`` rows:
halos wider than a shard (they span several ranks), uneven shards, the first and last rank (zero splits) and
``P = 1`` (no exchange) all take the same path. What a rank receives, in source-rank order, is
``[left halo | right halo]`` in position order. The all-to-all's backward is the transposed all-to-all, so the
halo rows' dK / dV go back to their owners and add onto the local ones.

The band kernels read the received buffer in place as their halo keys (``halo_k`` / ``halo_v`` of the primitive,
contract in ``longattn.backends``): no extended copy of the shard is made (``band.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _comm
from .shards import SeqShards


def _overlap(lo0: int, hi0: int, lo1: int, hi1: int) -> int:
    return max(0, min(hi0, hi1) - max(lo0, lo1))


def halo_plan(bounds: tuple, rank: int, left: int, right: int):
    """Split sizes of the halo all-to-all: ``(send_sizes, send_starts, recv_sizes, hl, hr)`` (local send offsets)."""
    P, S = len(bounds) - 1, bounds[-1]

    def needs(p):  # the left and right halo ranges of rank p, in global positions
        a, b = bounds[p], bounds[p + 1]
        return (max(0, a - left), a), (b, min(S, b + right))

    a, b = bounds[rank], bounds[rank + 1]
    send_sizes, send_starts, recv_sizes = [], [], []
    for p in range(P):
        (l0, l1), (r0, r1) = needs(p)
        lo, hi = (l0, l1) if p > rank else (r0, r1) if p < rank else (a, a)
        n = _overlap(a, b, lo, hi)
        send_sizes.append(n)
        send_starts.append(max(a, lo) - a if n else 0)
    (l0, l1), (r0, r1) = needs(rank)
    for p in range(P):
        a_p, b_p = bounds[p], bounds[p + 1]
        recv_sizes.append(_overlap(a_p, b_p, l0, l1) if p < rank else _overlap(a_p, b_p, r0, r1) if p > rank else 0)
    return send_sizes, send_starts, recv_sizes, l1 - l0, r1 - r0


def exchange_halo(shards: SeqShards, left: int, right: int, tensors: list[Tensor], masks: list[Tensor | None],
                  overlap=None):
    """The halos of ``(B, S_r, H, D)`` tensors and ``(B, S_r)`` bool masks, in one all-to-all.

    Returns ``(halos, mask_halos, hl)``: ``halos[i]`` is the ``(B, hl + hr, H, D)`` halo of ``tensors[i]`` (its
    left part, rows ``[:hl]``, then its right part: views of the one receive buffer, last dim contiguous),
    ``mask_halos[i]`` the ``(B, hl + hr)`` bool halo of ``masks[i]`` (None for a None mask: all halo keys are
    then real). With no exchange at all they are 0-row slices of the inputs. ``overlap()``, if given, runs once on
    every rank while the all-to-all is in flight (the caller's work that does not need the halo).
    """
    overlap = overlap or (lambda: None)
    send, starts, recv, hl, hr = halo_plan(shards.bounds, shards.rank, left, right)
    none = ([t[:, :0] for t in tensors], [None if m is None else m[:, :0] for m in masks])
    if sum(send) == 0 and sum(recv) == 0:
        # Nothing moves for this rank; since every rank computes the same plan, a rank skips the collective
        # only when P = 1 or when no rank sends anything (left = right = 0) -- never one rank alone.
        if shards.size == 1 or not any(
                sum(halo_plan(shards.bounds, p, left, right)[0]) for p in range(shards.size)):
            overlap()
            return *none, 0
    x0 = tensors[0]
    B, _, H, _ = x0.shape
    widths = [t.shape[-1] for t in tensors]
    present = [m for m in masks if m is not None]
    # Pack rows as (tokens, B, H, features): the all-to-all splits dim 0. Masks ride as 0/1 in the float dtype.
    cols = [t.transpose(0, 1) for t in tensors] + [m.transpose(0, 1)[:, :, None, None].to(x0.dtype).expand(-1, -1, H, 1)
                                                   for m in present]
    # A rank that sends nothing still sends a 0-row slice *of its inputs*: every rank must record the
    # all-to-all in its autograd graph, or its backward skips the transposed all-to-all the others wait in.
    pieces = [torch.cat([c[s:s + n] for c in cols], dim=-1) for s, n in zip(starts, send) if n]
    buf = torch.cat(pieces, 0) if pieces else torch.cat([c[:0] for c in cols], dim=-1)
    got = _comm.all_to_all(buf, send, recv, shards.group, shards.rank, wait_now=False)
    overlap()
    got = _comm.wait(got).transpose(0, 1)  # (B, hl + hr, H, F)
    parts = torch.split(got, widths + [1] * len(present), dim=-1)
    recv_masks = iter(p[:, :, 0, 0] > 0.5 for p in parts[len(tensors):])
    return list(parts[:len(tensors)]), [None if m is None else next(recv_masks) for m in masks], hl
