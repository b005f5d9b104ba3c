"""Sequence-parallel band ops: ``local_attention`` and ``tglobal_attention`` on a rank's shard.

Each rank passes its local ``(B, S_r, H, D)`` shard (and ``(B, S_r)`` masks / query blocks); the keys its
window reaches on other ranks arrive by the halo exchange (``halo.py``), and the band primitive runs on the shard
with those keys as its halo, read in place by the kernels (no extended copy, no extra query rows). Side keys of
TGlobal are replicated (every rank passes the same ``(B, G, H, D)``), so each rank's gradient of them is a partial
sum: the all-gather that replicated them (``block_aggregate(..., seq_parallel=)``) sums them back in its backward.

Dropout: every rank draws the call's ``[seed, offset]`` from its own generator, and the shard's rows and keys take
their counters at their positions in the whole sequence (the primitive's ``dropout_offset``). So each (row, key)
pair's keep bit is drawn once, by the rank owning the row, the same in forward and backward; with the same
generator state on every rank (``torch.manual_seed`` alike, as data-parallel training does) the result is bitwise
the single-process op's with that seed. Shard bounds must be multiples of 4 (the counters' groups of 4 keys).
"""

from __future__ import annotations

import torch
from torch import Tensor

import longattn

from .._validation import normalize_window
from .halo import exchange_halo
from .shards import SeqShards, check_local, check_shards


def _dtype_code(x) -> str:
    return str(x.dtype) if isinstance(x, Tensor) else "-"


def validate(what: str, shards, tensors: dict, local: dict, window, extra: tuple = (), dropout_p: float = 0.0):
    """Local checks, then the cross-rank agreement; returns ``(shards, left, right)``.

    ``tensors``: name -> tensor or None (reported in the fingerprint by shape-without-seq-dim and dtype);
    ``local``: name -> tensor whose dim 1 must be this rank's shard length.
    """
    shards = check_shards(shards)
    error, left, right = None, 0, 0
    try:
        left, right = normalize_window(window)
        if dropout_p and any(b % 4 for b in shards.bounds):
            raise ValueError(f"dropout_p: with seq_parallel the shard bounds must be multiples of 4 (the dropout "
                             f"counters come in groups of 4 keys), got {shards.bounds}; use "
                             f"SeqShards.even(S, group, multiple_of=4) or pad")
        for name, x in tensors.items():
            if x is not None and not isinstance(x, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(x).__name__}")
        for name, x in local.items():
            check_local(name, x, shards)
        if isinstance(tensors.get("q"), Tensor):
            for name in ("q", "k", "v"):
                x = tensors[name]
                if not isinstance(x, Tensor) or x.dim() != 4 or x.shape != tensors["q"].shape:
                    raise ValueError(f"{name}: expected a (B, S_r, H, D) tensor of q's shape "
                                     f"{tuple(tensors['q'].shape)}, got {getattr(x, 'shape', x)}")
    except (TypeError, ValueError) as e:
        error = e
    shapes = tuple((n, tuple(x.shape[:1]) + tuple(x.shape[2:]) if n in local else tuple(x.shape), _dtype_code(x))
                   for n, x in tensors.items() if isinstance(x, Tensor))
    device = next((x.device for x in tensors.values() if isinstance(x, Tensor)), torch.device("cpu"))
    shards.agree(what, (left, right, shapes, extra, float(dropout_p)), error, device)
    return shards, left, right


def band(shards: SeqShards, k, v, left, right, key_mask, run, overlap=None):
    """The band op on this rank's shard: ``run(halo)`` with ``halo = (halo_k, halo_v, halo_mask, halo_left)``, the
    keys the window reaches on other ranks, which the kernels read in place (``longattn.api._band_side``'s
    ``halo``: no extended copy of the shard). ``key_mask``: the ``(B, S_r)`` bool mask of band keys (None = all
    real). ``overlap()`` runs while the halo is in flight."""
    (kh, vh), (mh,), hl = exchange_halo(shards, left, right, [k, v], [key_mask], overlap)
    # The same ops on every rank, even one that receives nothing (0-row halos): every rank's backward then reaches
    # the transposed all-to-all the others wait in. (A rank-dependent shortcut here made torch.compile's backward
    # order the collectives differently per rank: a deadlock.)
    return run((kh, vh, mh, hl))


def _bool_mask(m):
    return None if m is None else (m != 0)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window, *, seq_parallel: SeqShards,
                    key_padding_mask: Tensor | None = None, rel_bias: Tensor | None = None,
                    scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """:func:`longattn.local_attention` on this rank's shard of the sequence.

    Args: as :func:`longattn.local_attention`, with q, k, v ``(B, S_r, H, D)`` and ``key_padding_mask``
    ``(B, S_r)`` this rank's slice (``S_r = seq_parallel.local_len``); ``rel_bias (H, left + right + 1)`` is
    replicated (its gradient on each rank is that rank's share: sum it over the group, as for any parameter).
    ``dropout_p``: the keep bits are the whole sequence's (counters at global positions; see the module docstring).
    Returns this rank's ``(B, S_r, H, D)`` rows of the output on the whole sequence.
    """
    shards, left, right = validate(
        "local_attention", seq_parallel, dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask, rel_bias=rel_bias),
        dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask), window, (scale, backend, shards_len(seq_parallel)),
        dropout_p)
    inputs = longattn.api._local_inputs(q, k, v, (left, right), key_padding_mask, rel_bias, scale, dropout_p,
                                        backend)
    return _run_band(shards, inputs, k, v, left, right, key_padding_mask)


def _run_band(shards, inputs: tuple, k, v, left, right, key_padding_mask):
    if shards.size == 1:
        return longattn.api._band_side(*inputs)
    return band(shards, k, v, left, right, _bool_mask(key_padding_mask),
                lambda halo: longattn.api._band_side(*inputs, halo=halo, dropout_offset=shards.start))


def tglobal_attention(q: Tensor, k: Tensor, v: Tensor, side_k: Tensor, side_v: Tensor, window, query_block: Tensor,
                      *, seq_parallel: SeqShards, key_padding_mask: Tensor | None = None,
                      side_mask: Tensor | None = None, rel_bias: Tensor | None = None,
                      side_bias: Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                      backend: str = "auto") -> Tensor:
    """:func:`longattn.tglobal_attention` on this rank's shard.

    q, k, v ``(B, S_r, H, D)``, ``query_block`` and ``key_padding_mask`` ``(B, S_r)`` are local (block ids in the
    global numbering, as from ``longattn.distributed.tglobal_block_ids``); ``side_k``, ``side_v (B, G, H, D)``,
    ``side_mask (B, G)`` and the bias tables are replicated. ``dropout_p``: as :func:`local_attention` (side keys
    keep their block ids: the same bits on every rank's rows as on the whole sequence).
    """
    shards, left, right = validate(
        "tglobal_attention", seq_parallel,
        dict(q=q, k=k, v=v, side_k=side_k, side_v=side_v, query_block=query_block, key_padding_mask=key_padding_mask,
             side_mask=side_mask, rel_bias=rel_bias, side_bias=side_bias),
        dict(q=q, k=k, v=v, query_block=query_block, key_padding_mask=key_padding_mask), window,
        (scale, backend, shards_len(seq_parallel)), dropout_p)
    inputs = longattn.api._tglobal_inputs(q, k, v, side_k, side_v, (left, right), query_block, key_padding_mask,
                                          side_mask, rel_bias, side_bias, scale, dropout_p, backend)
    return _run_band(shards, inputs, k, v, left, right, key_padding_mask)


def shards_len(shards) -> int:
    """The sequence length ``S`` of a SeqShards, or -1 for anything else (its type error is raised later)."""
    return shards.seq_len if isinstance(shards, SeqShards) else -1
