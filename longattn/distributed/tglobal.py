"""Sequence-parallel LongT5 transient-global glue: block ids and block aggregates on a rank's shard.

- ``tglobal_block_ids``: LongT5's rule (``id = min(pos // bs, full_blocks - 1)``, padding -1, orphans join the
  last full block) needs, per row, the number of real tokens sitting at a block end and the last real position
  over the *whole* sequence: one all-gather of ``2 * B`` int64 per forward.
- ``block_aggregate``: every block is owned by one rank, which assembles its complete sum, applies the RMS
  norm (the public op again, one block per id) and contributes it to one all-gather that replicates the
  ``(B, G, C)`` result. With ``block_size`` (LongT5 ids) a block belongs to the rank holding its first
  position and the only partial sums that move are each row's one edge block (straddling or orphans): one
  all-gather of ``(B, C)`` per rank. Without it (any ids) the partial sums of all blocks are reduce-scattered.
  All collectives are autograd ones (the all-gather's backward reduce-scatters ``d_agg``, summing the ranks'
  shares, to the owners). Half-precision inputs are summed and normalised in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

import longattn

from .._validation import debug_checks
from . import _comm
from .band import shards_len, validate
from .shards import SeqShards


def tglobal_block_ids(mask: Tensor, block_size: int, *, seq_parallel: SeqShards) -> tuple[Tensor, Tensor]:
    """:func:`longattn.tglobal_block_ids` for this rank's ``(B, S_r)`` slice of the mask.

    Returns this rank's ``(B, S_r)`` int32 ids (global block numbering) and the replicated ``(B, G)`` block
    mask, ``G = S // block_size`` of the whole sequence ``S``.
    """
    shards, _, _ = validate("tglobal_block_ids", seq_parallel, dict(mask=mask), dict(mask=mask), 0,
                            (block_size, shards_len(seq_parallel)))
    if shards.size == 1:
        return longattn.tglobal_block_ids(mask, block_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    real = mask != 0
    pos = torch.arange(shards.start, shards.stop, device=mask.device)
    full = (real & (pos % block_size == block_size - 1)[None, :]).sum(-1)
    last = torch.where(real, pos[None, :], -1).amax(-1)
    both = _comm.all_gather_ints(torch.stack([full, last], -1).long(), shards.group)  # (P, B, 2)
    full, last = both[..., 0].sum(0, keepdim=True).T, both[..., 1].amax(0, keepdim=True).T  # (B, 1) each
    ids = torch.minimum(torch.where(real, (pos // block_size)[None, :], -1), full - 1)
    top = torch.minimum(torch.div(last, block_size, rounding_mode="floor"), full - 1)  # the row's largest id
    G = shards.seq_len // block_size
    return ids.to(torch.int32), torch.arange(G, device=mask.device)[None, :] <= top


def block_aggregate(x: Tensor, block_ids: Tensor, num_blocks: int, *, seq_parallel: SeqShards,
                    weight: Tensor | None = None, eps: float = 1e-6, block_size: int | None = None,
                    backend: str = "auto") -> Tensor:
    """:func:`longattn.block_aggregate` over the whole sequence from this rank's ``(B, S_r, C)`` slice of ``x``.

    ``block_ids (B, S_r)`` are this rank's ids in the global numbering; the result ``(B, num_blocks, C)`` is
    replicated on every rank (its gradient, from each rank's loss, is summed over the ranks in the backward).

    ``block_size``: the ids' LongT5 block size, when they come from :func:`tglobal_block_ids` (position
    ``// block_size``, orphans folded into the last full block). Then block ``g`` belongs to the rank holding
    position ``g * block_size``, a row touches at most one block it does not own (its first: straddling or
    orphans), and the traffic per rank is that edge partial ``(B, C)`` plus its ``~G / P`` owned aggregates.
    Without it any ids work: the partial sums of all ``G`` blocks are reduce-scattered (``~G * C`` per rank).
    """
    shards, _, _ = validate("block_aggregate", seq_parallel, dict(x=x, block_ids=block_ids, weight=weight),
                            dict(x=x, block_ids=block_ids), 0,
                            (num_blocks, eps, block_size, backend, shards_len(seq_parallel)))
    kw = dict(eps=eps, backend=backend)
    if shards.size == 1 or int(num_blocks) == 0:
        return longattn.block_aggregate(x, block_ids, num_blocks, weight=weight, **kw)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if block_size is None:
        own, owned = _owned_sums_any(shards, x.to(acc), block_ids, int(num_blocks), backend)
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: expected a positive int or None, got {block_size!r}")
        own, owned = _owned_sums_edges(shards, x.to(acc), block_ids, int(num_blocks), block_size, backend)
    B, n_own, C = own.shape
    if weight is not None and n_own:  # the norm is per block: each owner normalises its own (the public op)
        slots = torch.arange(n_own, device=x.device, dtype=torch.int32).expand(B, n_own)
        own = longattn.block_aggregate(own, slots, n_own, weight=weight.to(acc), **kw)
    elif weight is not None:  # no owned block: still give ``weight`` a (zero) gradient on this rank, as DDP expects
        own = own * weight.to(acc)
    most = max(h - lo for lo, h in owned)
    # Cast before gathering (the result is x's dtype anyway: same values, half the bytes for bf16), and pad to
    # equal sizes (gloo's all-gather needs them).
    own = torch.cat([own, own.new_zeros(B, most - n_own, C)], 1).to(x.dtype)
    allg = _comm.all_gather(own, shards.group, shards.size).transpose(0, 1).reshape(B, shards.size * most, C)
    where = [r * most + g - lo for r, (lo, h) in enumerate(owned) for g in range(lo, h)]
    return allg.index_select(1, torch.tensor(where, device=x.device))


def _owned_sums_any(shards: SeqShards, x: Tensor, block_ids: Tensor, G: int, backend: str):
    """Any ids: rank r owns blocks ``[r * per, (r + 1) * per)``; all partial sums are reduce-scattered."""
    P = shards.size
    per = -(-G // P)
    owned = [(min(r * per, G), min((r + 1) * per, G)) for r in range(P)]
    sums = longattn.block_aggregate(x, block_ids, P * per, backend=backend)  # (B, P * per, C) partial sums
    own = _comm.reduce_scatter_sum(sums.transpose(0, 1), shards.group, P).transpose(0, 1)  # (B, per, C)
    lo, hi = owned[shards.rank]
    return own[:, :hi - lo], owned


def _owned_sums_edges(shards: SeqShards, x: Tensor, block_ids: Tensor, G: int, bs: int, backend: str):
    """LongT5 ids: complete sums of the blocks starting in this shard, from local sums plus the edge partials."""
    owned = [(min(-(-shards.bounds[r] // bs), G), min(-(-shards.bounds[r + 1] // bs), G))
             for r in range(shards.size)]
    lo, hi = owned[shards.rank]
    n_own, C = hi - lo, x.shape[2]
    ids = block_ids.long()
    # Owned blocks -> slots [0, n_own); the one block a row may touch below its first owned one -> slot n_own.
    edge = (ids >= 0) & (ids < lo)
    slot = torch.where(edge, n_own, torch.where(ids >= lo, ids - lo, -1))
    if debug_checks() and bool(((ids >= hi) | (edge & (ids != torch.where(edge, ids, -1).amax(1, keepdim=True))))
                               .any()):
        raise ValueError(f"block_ids: not LongT5 ids of block_size={bs} on this shard")
    sums = longattn.block_aggregate(x, slot.to(torch.int32), n_own + 1, backend=backend)
    edge_id = torch.where(edge, ids, -1).amax(1)  # (B,), -1 = no edge block
    # One all-gather of every rank's edge partial (B, C), its block id riding along as one more float.
    parts = _comm.all_gather(torch.cat([sums[:, n_own], edge_id[:, None].to(x.dtype)], 1), shards.group, shards.size)
    hit = (parts[..., C:].round().long() == torch.arange(lo, hi, device=x.device)).to(x.dtype)  # (P, B, n_own)
    return sums[:, :n_own] + torch.einsum("pbj,pbc->bjc", hit, parts[..., :C]), owned
