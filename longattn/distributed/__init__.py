"""Sequence parallelism: one long sequence split over the ranks of a process group (torch.distributed).

Each rank passes its contiguous shard ``[bounds[r], bounds[r+1])`` of q, k, v and the masks and gets its rows
of the output; windows, global positions and block ids mean what they mean on the whole sequence. The band
moves only its ``left + right`` edge tokens between neighbours (one all-to-all), Longformer's global tokens are
all-gathered and their rows computed split-KV with a log-sum-exp merge, TGlobal's block sums are completed by the
block's owner (from the edge partials with ``block_size``, else reduce-scattered), normalised there and
all-gathered. Every collective is a torch functional collective with autograd.

    from longattn.distributed import SeqShards, local_attention
    sh = SeqShards.even(S, group)                      # or SeqShards(group, bounds=(0, 5, 30, 37))
    out_r = local_attention(q_r, k_r, v_r, 256, key_padding_mask=pad_r, seq_parallel=sh)

A patched Hugging Face encoder runs sharded inside :func:`sequence_parallel` (``hf.py``).

``P = 1`` calls the plain ops (bitwise equal to them). See the README's "Sequence parallel" section.
"""

from ._comm import reset_stats, stats
from .band import local_attention, tglobal_attention
from .hf import gather_sequence, sequence_parallel
from .longformer import longformer_attention
from .shards import SeqShards
from .tglobal import block_aggregate, tglobal_block_ids

__all__ = ["SeqShards", "local_attention", "longformer_attention", "tglobal_attention", "block_aggregate",
           "tglobal_block_ids", "stats", "reset_stats", "sequence_parallel", "gather_sequence"]
