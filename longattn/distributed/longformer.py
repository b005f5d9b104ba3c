"""Sequence-parallel Longformer / LED self-attention (sliding window + global tokens) on a rank's shard.

- Global tokens as side keys of the local rows: every rank packs its own global tokens (their k, v, the
  global-query rows and a slot-used flag) into ``M`` slots and one autograd all-gather gives every rank all
  ``P * M`` of them (backward: a reduce-scatter returns each token's gradient to its owner). ``M`` is
  ``max_globals`` when given (no host sync) or the largest per-rank count (one int all-gather, one sync).
  The local rows are then the band op (halo exchange of k, v and the band-key mask ``real & ~global``) with
  those side keys, through the public ``tglobal_attention`` (no side bias).
- Global rows (a global query attends every real token with ``q_global / k_global / v_global``) are split-KV:
  every rank scores all ``P * M`` global queries against its own keys and keeps the unnormalised partial
  ``(sum_j p_j v_j, sum_j p_j, max score)``; one autograd all-to-all sends each owner the ``P`` partials of its
  slots, merged by log-sum-exp in rank order (deterministic). Phase 1 computes the partials in plain torch,
  ``O(B * H * P * M * S_r)`` scores in memory; a kernel returning ``(out, lse)`` with a gradient for ``lse`` would
  replace it.
"""

from __future__ import annotations

import torch
from torch import Tensor

import longattn

from . import _comm
from .band import band, shards_len, validate
from .shards import SeqShards


def _slots(is_global: Tensor, M: int):
    """Local indices ``(B, M)`` of the first ``M`` global tokens of each row, and which slots are used."""
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :M]
    if order.shape[1] < M:  # a shard shorter than M: the extra slots are unused (index 0, flag False)
        order = torch.cat([order, order.new_zeros(order.shape[0], M - order.shape[1])], 1)
    used = torch.arange(M, device=is_global.device)[None, :] < is_global.sum(1, keepdim=True)
    return order, used


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx (B, M)`` of ``x (B, S, H, D)``."""
    return x.gather(1, idx[:, :, None, None].expand(-1, -1, *x.shape[2:]))


def _partials(qg: Tensor, kg: Tensor, vg: Tensor, real: Tensor, scale: float, stat):
    """Unnormalised attention of ``qg (B, Q, H, D)`` over the local keys: ``(B, Q, H, D + 2)`` = [acc, sum, max]."""
    s = torch.einsum("bqhd,bkhd->bhqk", qg.to(stat), kg.to(stat)) * scale
    s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).detach()  # the result does not depend on m: no gradient through it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a rank with no real key: empty partial
    p = torch.exp(s - m)
    acc = torch.einsum("bhqk,bkhd->bqhd", p, vg.to(stat))
    return torch.cat([acc, p.sum(-1).transpose(1, 2)[..., None], m[..., 0].transpose(1, 2)[..., None]], -1)


def _merge(parts: Tensor) -> Tensor:
    """``(P, ..., D + 2)`` partials from ranks 0..P-1 -> the softmax-normalised ``(..., D)`` (0 with no key)."""
    acc, denom, m = parts[..., :-2], parts[..., -2], parts[..., -1]
    w = torch.exp(m - m.amax(0, keepdim=True).detach())
    L = (w * denom).sum(0)
    num = (w[..., None] * acc).sum(0)
    tiny = torch.finfo(parts.dtype).tiny
    return torch.where(L[..., None] > 0, num / L.clamp_min(tiny)[..., None], torch.zeros_like(num))


def longformer_attention(q: Tensor, k: Tensor, v: Tensor, window, global_mask: Tensor, *, seq_parallel: SeqShards,
                         key_padding_mask: Tensor | None = None, q_global: Tensor | None = None,
                         k_global: Tensor | None = None, v_global: Tensor | None = None,
                         scale: float | None = None, max_globals: int | None = None,
                         backend: str = "auto") -> Tensor:
    """:func:`longattn.longformer_attention` on this rank's shard of the sequence.

    All sequence tensors (q, k, v, the ``*_global`` projections ``(B, S_r, H, D)``, ``global_mask`` and
    ``key_padding_mask (B, S_r)``) are this rank's slices; ``max_globals`` bounds the global tokens of a row of
    the *whole* sequence. Returns this rank's ``(B, S_r, H, D)`` output rows.
    """
    seqs = dict(q=q, k=k, v=v, global_mask=global_mask, key_padding_mask=key_padding_mask, q_global=q_global,
                k_global=k_global, v_global=v_global)
    shards, left, right = validate("longformer_attention", seq_parallel, seqs, seqs, window,
                                   (scale, max_globals, backend, shards_len(seq_parallel)))
    if shards.size == 1:
        return longattn.longformer_attention(q, k, v, window, global_mask, key_padding_mask=key_padding_mask,
                                             q_global=q_global, k_global=k_global, v_global=v_global, scale=scale,
                                             max_globals=max_globals, backend=backend)
    if global_mask is None:
        raise TypeError("global_mask: expected a (B, S_r) bool or 0/1 tensor, got None")
    B, S_r, H, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    real = torch.ones(B, S_r, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask != 0
    is_global = (global_mask != 0) & real
    if max_globals is None:  # the largest per-rank count: one tiny all-gather and a host sync, as the plain op
        M = int(_comm.all_gather_ints(is_global.sum(1).max().reshape(1).long(), shards.group).max())
    else:
        M = min(int(max_globals), max(b1 - b0 for b0, b1 in zip(shards.bounds, shards.bounds[1:])))
    P = shards.size
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg_src = q if q_global is None else q_global
    if M > 0:
        idx, used = _slots(is_global, M)
        flag = used[:, :, None, None].to(q.dtype).expand(-1, -1, H, 1)
        packed = torch.cat([_take(k, idx), _take(v, idx), _take(qg_src, idx), flag], -1)  # (B, M, H, 3D + 1)
        allg = _comm.all_gather(packed, shards.group, P).transpose(0, 1).reshape(B, P * M, H, 3 * D + 1)
        side_k, side_v, qg_all = allg[..., :D], allg[..., D:2 * D], allg[..., 2 * D:3 * D]
        side_mask = allg[..., 0, 3 * D] > 0.5
    else:
        side_k = side_v = q.new_zeros(B, 0, H, D)
        side_mask = torch.zeros(B, 0, dtype=torch.bool, device=q.device)

    def run(q_seg, k_seg, v_seg, m_seg, q_lo, q_hi, before):
        qb = torch.full((B, k_seg.shape[1]), -1, dtype=torch.int32, device=q.device)  # no side bias: any id
        return longattn.tglobal_attention(q_seg, k_seg, v_seg, side_k, side_v, (left, right), qb,
                                          key_padding_mask=m_seg, side_mask=side_mask, scale=scale, backend=backend)

    out = band(shards, q, k, v, left, right, real & ~is_global, run)
    if M > 0:
        kg = k if k_global is None else k_global
        vg = v if v_global is None else v_global
        parts = _partials(qg_all, kg, vg, real, scale, stat)  # (B, P*M, H, D+2): all ranks' globals, my keys
        # Slot-major rows so the all-to-all's equal splits of M rows send each owner its own slots' partials.
        recv = _comm.all_to_all(parts.transpose(0, 1), [M] * P, [M] * P, shards.group, shards.rank)
        og = _merge(recv.reshape(P, M, B, H, D + 2)).transpose(0, 1).to(q.dtype)  # (B, M, H, D), my slots
        slot = (torch.cumsum(is_global.to(torch.int64), 1) - 1).clamp(0, M - 1)
        out = torch.where(is_global[..., None, None], _take(og, slot), out)
    return torch.where(real[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
