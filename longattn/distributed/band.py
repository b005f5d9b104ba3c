"""Sequence-parallel band ops: ``local_attention`` and ``tglobal_attention`` on a rank's shard.

Each rank passes its local ``(B, S_r, H, D)`` shard (and ``(B, S_r)`` masks / query blocks); the keys its
window reaches on other ranks arrive by the halo exchange (``halo.py``), then longattn's public op runs on
``[left halo | shard | right halo]`` and the output rows of the shard are returned. Side keys of TGlobal are
replicated (every rank passes the same ``(B, G, H, D)``), so each rank's gradient of them is a partial sum: the
all-gather that replicated them (``block_aggregate(..., seq_parallel=)``) sums them back in its backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

import longattn

from .._validation import normalize_window
from .halo import exchange_halo, pad_rows
from .shards import SeqShards, check_local, check_shards


def _dtype_code(x) -> str:
    return str(x.dtype) if isinstance(x, Tensor) else "-"


def validate(what: str, shards, tensors: dict, local: dict, window, extra: tuple = ()):
    """Local checks, then the cross-rank agreement; returns ``(shards, left, right)``.

    ``tensors``: name -> tensor or None (reported in the fingerprint by shape-without-seq-dim and dtype);
    ``local``: name -> tensor whose dim 1 must be this rank's shard length.
    """
    shards = check_shards(shards)
    error, left, right = None, 0, 0
    try:
        left, right = normalize_window(window)
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
    shards.agree(what, (left, right, shapes, extra), error, device)
    return shards, left, right


def band(shards: SeqShards, q, k, v, left, right, key_mask, run):
    """The band op on this rank's shard with its halos: the shard's ``(B, S_r, H, D)`` output rows.

    ``run(q_seg, k_seg, v_seg, mask_seg, q_lo, q_hi, before)`` runs longattn's public op on a segment of keys;
    the segment's rows ``[before, before + q_hi - q_lo)`` hold the queries of local rows ``[q_lo, q_hi)`` and
    its other query rows are zeros (their outputs are dropped and, with ``dout = 0``, they add nothing to
    dK / dV). ``key_mask`` is the ``(B, S_r)`` bool mask of band keys (None = all real).

    Until a kernel reads the halo in place, the segment is ``[left halo | shard | right halo]``: the price is
    copying q, k, v into it (O(S_r) memory traffic per layer) and ``hl + hr`` zero query rows. The other
    layout, the op on the shard itself plus two small ops recomputing the ``left`` first and ``right`` last
    rows, saves those forward copies but costs more in the backward: autograd turns every slice of k, v, q
    and of the output into a full-size zero-filled gradient plus an add (about twice the traffic overall, by
    count, not measured).
    """
    S_r = q.shape[1]
    (kh, vh), (mh,), hl, hr = exchange_halo(shards, left, right, [k, v], [key_mask])
    # The same ops on every rank, even one that receives nothing (0-row halos; it copies as its busier peers
    # do): every rank's backward then reaches the transposed all-to-all the others wait in. (A rank-dependent
    # shortcut here made torch.compile's backward order the collectives differently per rank: a deadlock.)

    def ext(t, halo):
        return torch.cat([halo[0], t, halo[1]], 1)

    m_ext = None if key_mask is None else ext(key_mask, mh)
    k_ext = ext(k, kh)
    out = run(pad_rows(q, hl, k_ext.shape[1]), k_ext, ext(v, vh), m_ext, 0, S_r, hl)
    return out[:, hl:hl + S_r]


def _bool_mask(m):
    return None if m is None else (m != 0)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window, *, seq_parallel: SeqShards,
                    key_padding_mask: Tensor | None = None, rel_bias: Tensor | None = None,
                    scale: float | None = None, backend: str = "auto") -> Tensor:
    """:func:`longattn.local_attention` on this rank's shard of the sequence.

    Args: as :func:`longattn.local_attention`, with q, k, v ``(B, S_r, H, D)`` and ``key_padding_mask``
    ``(B, S_r)`` this rank's slice (``S_r = seq_parallel.local_len``); ``rel_bias (H, left + right + 1)`` is
    replicated (its gradient on each rank is that rank's share: sum it over the group, as for any parameter).
    Returns this rank's ``(B, S_r, H, D)`` rows of the output on the whole sequence.
    """
    shards, left, right = validate(
        "local_attention", seq_parallel, dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask, rel_bias=rel_bias),
        dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask), window, (scale, backend, shards_len(seq_parallel)))
    if shards.size == 1:
        return longattn.local_attention(q, k, v, window, key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                                        scale=scale, backend=backend)

    def run(q_seg, k_seg, v_seg, m_seg, q_lo, q_hi, before):
        return longattn.local_attention(q_seg, k_seg, v_seg, (left, right), key_padding_mask=m_seg,
                                        rel_bias=rel_bias, scale=scale, backend=backend)

    return band(shards, q, k, v, left, right, _bool_mask(key_padding_mask), run)


def tglobal_attention(q: Tensor, k: Tensor, v: Tensor, side_k: Tensor, side_v: Tensor, window, query_block: Tensor,
                      *, seq_parallel: SeqShards, key_padding_mask: Tensor | None = None,
                      side_mask: Tensor | None = None, rel_bias: Tensor | None = None,
                      side_bias: Tensor | None = None, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """:func:`longattn.tglobal_attention` on this rank's shard.

    q, k, v ``(B, S_r, H, D)``, ``query_block`` and ``key_padding_mask`` ``(B, S_r)`` are local (block ids in the
    global numbering, as from ``longattn.distributed.tglobal_block_ids``); ``side_k``, ``side_v (B, G, H, D)``,
    ``side_mask (B, G)`` and the bias tables are replicated.
    """
    shards, left, right = validate(
        "tglobal_attention", seq_parallel,
        dict(q=q, k=k, v=v, side_k=side_k, side_v=side_v, query_block=query_block, key_padding_mask=key_padding_mask,
             side_mask=side_mask, rel_bias=rel_bias, side_bias=side_bias),
        dict(q=q, k=k, v=v, query_block=query_block, key_padding_mask=key_padding_mask), window,
        (scale, backend, shards_len(seq_parallel)))
    kw = dict(side_mask=side_mask, rel_bias=rel_bias, side_bias=side_bias, scale=scale, backend=backend)
    if shards.size == 1:
        return longattn.tglobal_attention(q, k, v, side_k, side_v, window, query_block,
                                          key_padding_mask=key_padding_mask, **kw)

    def run(q_seg, k_seg, v_seg, m_seg, q_lo, q_hi, before):
        # Zero query rows: padding (their output is dropped).
        qb = pad_rows(query_block[:, q_lo:q_hi], before, k_seg.shape[1], -1)
        return longattn.tglobal_attention(q_seg, k_seg, v_seg, side_k, side_v, (left, right), qb,
                                          key_padding_mask=m_seg, **kw)

    return band(shards, q, k, v, left, right, _bool_mask(key_padding_mask), run)


def shards_len(shards) -> int:
    """The sequence length ``S`` of a SeqShards, or -1 for anything else (its type error is raised later)."""
    return shards.seq_len if isinstance(shards, SeqShards) else -1
