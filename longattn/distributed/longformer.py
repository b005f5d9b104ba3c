"""Sequence-parallel Longformer / LED self-attention (sliding window + global tokens) on a rank's shard.

- Global tokens as side keys of the local rows: every rank packs its own global tokens (their k, v, the
  global-query rows and a slot-used flag) into ``M`` slots and one autograd all-gather gives every rank all
  ``P * M`` of them (backward: a reduce-scatter returns each token's gradient to its owner). ``M`` is
  ``max_globals`` when given (no host sync) or the largest per-rank count (one int all-gather, one sync).
  The local rows are then the band op (halo exchange of k, v and the band-key mask ``real & ~global``, the halo
  read in place) with those side keys and no side bias.
- Global rows (a global query attends every real token with ``q_global / k_global / v_global``) are split-KV:
  every rank attends all ``P * M`` global queries over its own keys with the band primitive (the queries as the
  sequence, an empty band, the local keys as side keys, cut into key splits as batch rows), which returns the
  partial ``(out, lse)`` with a gradient for both (the kernels' lse gradient); one autograd all-to-all sends each
  owner the ``P`` partials of its slots, merged by log-sum-exp in rank order (deterministic). Nothing
  ``S_r``-sized is kept beyond the kernels' own statistics.
- Overlap: the global rows' partials are computed while the band's halo is in flight, and their all-to-all runs
  while the band computes (``_comm``'s ``wait_now=False``; each result is waited where it is first used).
"""

from __future__ import annotations

import torch
from torch import Tensor

import longattn

from ..backends._longformer import SPLIT_KEYS, KeySplits
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


def _partials(qg: Tensor, kg: Tensor, vg: Tensor, real: Tensor, scale: float, backend: str):
    """Attention of ``qg (B, Q, H, D)`` over this rank's real keys ``kg, vg (B, S_r, H, D)``:
    ``(B, Q, H, D + 1)`` = [normalised out, lse] (lse = +inf and out = 0 for a rank with no real key).

    The keys are cut into ``SPLIT_KEYS``-key splits, each a batch row of the band primitive (the queries of one
    (b, h) are one query tile: unsplit, one program would walk all ``S_r`` keys), merged by log-sum-exp here;
    autograd carries the merge's lse gradients back into the kernels."""
    splits = KeySplits(kg.shape[1], SPLIT_KEYS)
    qs = splits.rows(qg)
    no_band = torch.zeros(qs.shape[:2], dtype=torch.bool, device=qg.device)
    out, lse = longattn.api._band_side(qs, qs, qs, splits.keys(kg), splits.keys(vg), 0, 0, band_key_mask=no_band,
                                       side_mask=splits.key_mask(real, real.shape[0], real.device), query_block=None,
                                       band_bias=None, side_bias=None, scale=scale, backend=backend, with_lse=True)
    out, lse = splits.merge(out, lse)
    return torch.cat([out.to(lse.dtype), lse.transpose(1, 2)[..., None]], -1)


def _merge(parts: Tensor) -> Tensor:
    """``(P, ..., D + 1)`` partials [out, lse] from ranks 0..P-1 -> the merged ``(..., D)`` (0 with no key)."""
    out, lse = parts[..., :-1], parts[..., -1]
    lse = torch.where(lse == torch.inf, -torch.inf, lse)  # an empty partial (+inf) weighs nothing
    top = lse.amax(0, keepdim=True).detach()  # any shift gives the same result: no gradient through it
    w = torch.exp(lse - torch.where(top > -torch.inf, top, torch.zeros_like(top)))  # each rank's unnormalised share
    total = w.sum(0)
    num = (w[..., None] * out).sum(0)
    return torch.where(total[..., None] > 0, num / total.clamp_min(torch.finfo(parts.dtype).tiny)[..., None],
                       torch.zeros_like(num))


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
    qg_src = q if q_global is None else q_global
    # Collectives in issue order, the same on every rank: the global tokens' all-gather, the band's halo all-to-all,
    # the global rows' partials all-to-all. Each is waited where its result is first used: the partials are
    # computed while the halo is in flight, and their all-to-all runs during the band.
    gathered = None
    if M > 0:
        idx, used = _slots(is_global, M)
        flag = used[:, :, None, None].to(q.dtype).expand(-1, -1, H, 1)
        packed = torch.cat([_take(k, idx), _take(v, idx), _take(qg_src, idx), flag], -1)  # (B, M, H, 3D + 1)
        gathered = _comm.all_gather(packed, shards.group, P, wait_now=False)
    g = dict(side_k=q.new_zeros(B, 0, H, D), side_v=q.new_zeros(B, 0, H, D),
             side_mask=torch.zeros(B, 0, dtype=torch.bool, device=q.device), recv=None)

    def global_rows():  # while the halo is in flight
        if M == 0:
            return
        allg = _comm.wait(gathered).transpose(0, 1).reshape(B, P * M, H, 3 * D + 1)
        g.update(side_k=allg[..., :D], side_v=allg[..., D:2 * D], side_mask=allg[..., 0, 3 * D] > 0.5)
        kg = k if k_global is None else k_global
        vg = v if v_global is None else v_global
        parts = _partials(allg[..., 2 * D:3 * D], kg, vg, real, scale, backend)  # (B, P*M, H, D+1): all globals
        # Slot-major rows so the all-to-all's equal splits of M rows send each owner its own slots' partials.
        g["recv"] = _comm.all_to_all(parts.transpose(0, 1), [M] * P, [M] * P, shards.group, shards.rank,
                                     wait_now=False)

    band_keys = real & ~is_global
    no_block = torch.full((B, S_r), -1, dtype=torch.int32, device=q.device)  # no side bias: any id

    def run(halo):
        inputs = longattn.api._tglobal_inputs(q, k, v, g["side_k"], g["side_v"], (left, right), no_block, band_keys,
                                              g["side_mask"], None, None, scale, 0.0, backend)
        return longattn.api._band_side(*inputs, halo=halo)

    out = band(shards, k, v, left, right, band_keys, run, overlap=global_rows)
    if M > 0:
        og = _merge(_comm.wait(g["recv"]).reshape(P, M, B, H, D + 1)).transpose(0, 1).to(q.dtype)  # my slots
        slot = (torch.cumsum(is_global.to(torch.int64), 1) - 1).clamp(0, M - 1)
        out = torch.where(is_global[..., None, None], _take(og, slot), out)
    return torch.where(real[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
