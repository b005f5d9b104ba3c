"""Packed variable-length attention: the public ``*_varlen`` functions (issue 14).

A packed batch holds the real tokens of B sequences back to back, flash-attn's layout: ``x (T, ...)`` with
``cu_seqlens (B + 1,)`` int32 (``cu_seqlens[b]:cu_seqlens[b + 1]`` are sequence b's tokens) and ``max_seqlen``
(an upper bound on the lengths). :func:`longattn.varlen.pack` / ``unpack`` convert from and to padding.

Each function runs the padded op's kernels on the packed tokens as one sequence (``B = 1``, ``S = T``) and gives
every query row its sequence's bounds as a per-row key range (``key_ranges``, and ``side_ranges`` for side keys;
the contract is in ``longattn.backends``): no window crosses a sequence boundary, no query sees another
sequence's global tokens or side keys, and a key tile of another sequence is never visited. The cost therefore
follows the real tokens: nothing is computed for padding.

What stays the same as the padded ops, per sequence: every result of a packed call equals the padded op run on
each sequence alone (right-aligned, without padding). Offsets ``j - i`` (band bias) and block offsets
``g - block(i)`` (side bias) are in-sequence offsets, exactly as there. Dropout draws other bits than the
padded call (its counters follow packed positions).

Host syncs: none, except ``longformer_attention_varlen`` without ``max_globals`` (one read of the global count,
as the padded op). The per-row ranges are computed on the device from ``cu_seqlens`` (three small ops) and kept for
the next call with the same ``cu_seqlens`` tensor, unmodified (the layers of one model forward): from the second
layer on, a packed op runs its kernel op alone. Value checks of
``cu_seqlens`` (starts at 0, non-decreasing, ends at T, lengths ``<= max_seqlen``) run in debug mode only; out of
debug mode a wrong ``cu_seqlens`` gives wrong rows but never an out-of-bounds access, and a wrong (too small)
``max_seqlen`` narrows the windows (it bounds them).

Zero-length sequences are allowed (``cu_seqlens`` repeats a value); ``T = 0`` returns an empty result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import api
from ._dropout import check_dropout_p
from ._memo import LastCall
from ._validation import (
    _as_int,
    check_backend_name,
    check_bias_table,
    check_index_tensor,
    check_like,
    check_mask,
    check_qkv,
    check_scale,
    check_side_kv,
    check_tensor,
    debug_checks,
    normalize_window,
)
from .varlen import check_cu_seqlens

__all__ = [
    "block_aggregate_varlen",
    "local_attention_varlen",
    "longformer_attention_varlen",
    "tglobal_attention_varlen",
    "tglobal_block_ids_varlen",
    "token_ranges",
]


def _sequence_of_tokens(cu_seqlens: Tensor, total: int) -> Tensor:
    """``(T,)`` int64: the sequence index of each packed token (no sync), in two ops. Zero-length sequences own no
    token; a token past ``cu_seqlens[-1]`` (a wrong ``cu_seqlens``) is given the last sequence, so indices stay in
    range: only the interior boundaries ``cu_seqlens[1:-1]`` are searched, which gives ``0 .. B - 1`` directly."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:-1], tokens, right=True)


def _bounds(cu: Tensor, seq: Tensor) -> Tensor:
    """``(1, T, 2)``: ``[cu[s], cu[s + 1])`` of each token's ``seq`` in one gather (``unfold``: the ``(B, 2)`` pairs of
    consecutive entries, a view)."""
    return cu.unfold(0, 2, 1)[seq][None]


def token_ranges(cu_seqlens: Tensor, total: int) -> Tensor:
    """``(1, T, 2)`` int32: ``[cu_seqlens[s], cu_seqlens[s + 1])`` of the sequence ``s`` of each packed token, the
    ``key_ranges`` of the packed ops. Deterministic and sync-free (three device ops)."""
    return _bounds(cu_seqlens, _sequence_of_tokens(cu_seqlens, total))


def _key_and_side_ranges(cu_seqlens: Tensor, cu_side: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``(key_ranges, side_ranges)``, each ``(1, T, 2)`` int32: the token's sequence bounds and that sequence's
    side-key range ``[cu_side[s], cu_side[s + 1])``."""
    seq = _sequence_of_tokens(cu_seqlens, total)
    return _bounds(cu_seqlens, seq), _bounds(cu_side, seq)


def _last_ranges(cu_seqlens: Tensor, cu_side: Tensor | None, total: int):
    """``token_ranges`` (``cu_side`` None) or ``_key_and_side_ranges``, kept for the next call with the same, unmodified
    ``cu_seqlens`` (and ``cu_side``) tensors and ``total`` (``longattn._memo``): the layers of one model forward share
    them."""
    if cu_side is None:
        return _LAST_RANGES.get(lambda: token_ranges(cu_seqlens, total), (cu_seqlens, None), (total,))
    return _LAST_RANGES.get(lambda: _key_and_side_ranges(cu_seqlens, cu_side, total), (cu_seqlens, cu_side), (total,))


_LAST_RANGES = LastCall()


def _check_packed_qkv(q, k, v, *, grouped: bool) -> tuple[int, int, int]:
    """q ``(T, H, D)``, k, v ``(T, H_kv, D)`` (``H_kv = H`` unless grouped), as the padded ops check them.
    Returns ``(T, H, D)``; ``T`` may be 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=3)
    if q.shape[0] == 0 and k.shape[0] == 0 and v.shape[0] == 0:
        return tuple(q.shape)
    check_qkv(q[None], k[None], v[None], grouped=grouped)
    return tuple(q.shape)


def _packed_ints(cu_seqlens, max_seqlen, total, device, window) -> tuple[int, int, int, int]:
    """Validated ``(max_seqlen, total, left, right)``, the window clamped to the longest sequence (a wider one
    is the same window: in-sequence keys are all within ``max_seqlen - 1``)."""
    max_seqlen, total = check_cu_seqlens(cu_seqlens, max_seqlen, total, device)
    left, right = normalize_window(window)
    return max_seqlen, total, left, right


def _empty_like(q: Tensor) -> Tensor:
    """The output of a call with no token: ``(0, H, D)``, still in q's autograd graph."""
    return q.clone()


def local_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window, *,
                           rel_bias: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                           backend: str = "auto") -> Tensor:
    """:func:`longattn.local_attention` of each packed sequence (windows never cross a sequence boundary).

    Args:
        q: ``(T, H, D)``; k, v: ``(T, H_kv, D)`` (grouped-query when ``H_kv < H``), last dim contiguous.
        cu_seqlens: ``(B + 1,)`` int32 on q's device, cumulative lengths from 0 to T.
        max_seqlen: an int ``>=`` every length.
        window, rel_bias, scale, dropout_p, backend: as :func:`longattn.local_attention`.

    Returns:
        ``(T, H, D)`` in q's dtype.
    """
    T, H, D = _check_packed_qkv(q, k, v, grouped=True)
    max_seqlen, T, left, right = _packed_ints(cu_seqlens, max_seqlen, T, q.device, window)
    rel_bias = check_bias_table("rel_bias", rel_bias, H, left + right + 1, q)
    scale = check_scale(scale, D, None)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    if T == 0:
        return _empty_like(q)
    q, k, v = api._cast_for_autocast(q, k, v)
    out = api._band_side(q[None], k[None], v[None], None, None, left, right, band_key_mask=None, side_mask=None,
                         query_block=None, band_bias=rel_bias, side_bias=None, scale=scale, backend=backend,
                         dropout_p=dropout_p, key_ranges=_last_ranges(cu_seqlens, None, T), span=max_seqlen)
    return out.squeeze(0)  # a view both ways ([0]'s backward would fill zeros and copy)


def tglobal_block_ids_varlen(cu_seqlens: Tensor, total: int, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """LongT5's transient-global blocks of each packed sequence (:func:`longattn.tglobal_block_ids` per sequence,
    each sequence's blocks numbered after the previous sequences' ones).

    Token ``t`` of a sequence of length ``L`` is in local block ``t // block_size``; a trailing partial block
    joins the last full block; a sequence with no full block (``L < block_size``) has every token at -1.

    Args:
        cu_seqlens: ``(B + 1,)`` int32; total: T (``cu_seqlens[-1]``); block_size: > 0.

    Returns:
        ``block_ids (T,)`` int32 in ``[-1, G - 1]`` with ``G = T // block_size`` (a host-known bound on the number
        of blocks, so nothing syncs); ``block_mask (G,)`` bool, True for the blocks that exist (the first
        ``cu_blocks[-1]``); ``cu_blocks (B + 1,)`` int32, cumulative block counts (sequence b owns blocks
        ``cu_blocks[b]:cu_blocks[b + 1]``).
    """
    block_size = _as_int("block_size", block_size)
    if block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size}")
    _, total = check_cu_seqlens(cu_seqlens, 1, total, cu_seqlens.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=0)
    blocks_per_seq = torch.div(lengths, block_size, rounding_mode="floor").to(torch.int32)
    cu_blocks = torch.zeros_like(cu_seqlens)
    cu_blocks[1:] = torch.cumsum(blocks_per_seq, 0)
    seq = _sequence_of_tokens(cu_seqlens, total)
    offset = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32) - cu_seqlens[seq]
    last = blocks_per_seq[seq] - 1  # -1 for a sequence without a full block
    local = torch.minimum(torch.div(offset, block_size, rounding_mode="floor"), last)
    block_ids = torch.where(last >= 0, cu_blocks[seq] + local, -1).to(torch.int32)
    G = total // block_size
    block_mask = torch.arange(G, device=cu_seqlens.device) < cu_blocks[-1]
    return block_ids, block_mask, cu_blocks


def block_aggregate_varlen(x: Tensor, block_ids: Tensor, num_blocks: int, *, weight: Tensor | None = None,
                           eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """:func:`longattn.block_aggregate` of packed tokens ``x (T, C)`` into ``(G, C)`` by ``block_ids (T,)`` (as
    from :func:`tglobal_block_ids_varlen`: blocks never span two sequences, so this is the padded op on one row)."""
    check_tensor("x", x, ndim=2)
    check_tensor("block_ids", block_ids, ndim=1, dtypes=None, device=x.device)  # dtype / values: block_aggregate's
    return api.block_aggregate(x[None], block_ids[None], num_blocks, weight=weight, eps=eps,
                               backend=backend).squeeze(0)


def tglobal_attention_varlen(q: Tensor, k: Tensor, v: Tensor, side_k: Tensor, side_v: Tensor, cu_seqlens: Tensor,
                             max_seqlen: int, window, query_block: Tensor, cu_blocks: Tensor, *,
                             side_mask: Tensor | None = None, rel_bias: Tensor | None = None,
                             side_bias: Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                             backend: str = "auto") -> Tensor:
    """:func:`longattn.tglobal_attention` of each packed sequence: its band plus its own sequence's side keys.

    Side-key layout: the side keys of all sequences concatenated, ``(G, H_kv, D)``, sequence b's being rows
    ``cu_blocks[b]:cu_blocks[b + 1]`` (what :func:`tglobal_block_ids_varlen` + :func:`block_aggregate_varlen`
    produce). Why concatenated: the aggregation and the k/v projections of the side tokens then run as one
    op each over all sequences, and the kernels restrict each query to its sequence's contiguous slice, so no
    query scores another sequence's side keys (a per-sequence ``(B, G_max)`` layout would pad every short
    sequence's side keys to the longest's). ``query_block`` uses the same numbering, so ``g - query_block[i]``
    is the in-sequence block offset of every pair attended.

    Args:
        q: ``(T, H, D)``; k, v: ``(T, H_kv, D)``; side_k, side_v: ``(G, H_kv, D)``; last dims contiguous.
        cu_seqlens, max_seqlen: as :func:`local_attention_varlen`.
        window: ``w`` or ``(left, right)``.
        query_block: ``(T,)`` integer block of each token in ``[-1, G - 1]`` (concatenated numbering).
        cu_blocks: ``(B + 1,)`` int32 cumulative side-key counts per sequence.
        side_mask: ``(G,)`` bool / 0-1, True = an attendable side key (default all).
        rel_bias: ``(H, left + right + 1)``; side_bias: ``(H, 2G + 1)`` by block offset ``g - query_block[i]``
            (only offsets within one sequence's blocks are ever read).
        scale, dropout_p, backend: as :func:`longattn.tglobal_attention`.

    Returns:
        ``(T, H, D)`` in q's dtype.
    """
    T, H, D = _check_packed_qkv(q, k, v, grouped=True)
    for name, x in (("side_k", side_k), ("side_v", side_v)):
        check_tensor(name, x, ndim=3)
    G = check_side_kv(side_k[None], side_v[None], q[None], k[None])
    max_seqlen, T, left, right = _packed_ints(cu_seqlens, max_seqlen, T, q.device, window)
    _check_cu_blocks(cu_blocks, cu_seqlens, q.device)
    query_block = check_index_tensor("query_block", query_block, (T,), q.device, -1, G - 1)
    side_mask = check_mask("side_mask", side_mask, (G,), q.device)
    rel_bias = check_bias_table("rel_bias", rel_bias, H, left + right + 1, q)
    side_bias = check_bias_table("side_bias", side_bias, H, 2 * G + 1, q)
    scale = check_scale(scale, D, 1.0)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    if T == 0:
        return _empty_like(q)
    q, k, v, side_k, side_v = api._cast_for_autocast(q, k, v, side_k, side_v)
    key_ranges, side_ranges = _last_ranges(cu_seqlens, cu_blocks, T)
    out = api._band_side(q[None], k[None], v[None], side_k[None], side_v[None], left, right, band_key_mask=None,
                         side_mask=None if side_mask is None else side_mask[None], query_block=query_block[None],
                         band_bias=rel_bias, side_bias=side_bias, scale=scale, backend=backend, dropout_p=dropout_p,
                         key_ranges=key_ranges, side_ranges=side_ranges, span=max_seqlen)
    return out.squeeze(0)


def _check_cu_blocks(cu_blocks, cu_seqlens, device) -> None:
    """``cu_blocks``: int32 ``(B + 1,)`` like ``cu_seqlens`` (values, cumulative from 0, checked in debug mode)."""
    check_tensor("cu_blocks", cu_blocks, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_blocks.shape != cu_seqlens.shape:
        raise ValueError(f"cu_blocks: expected shape {tuple(cu_seqlens.shape)} like cu_seqlens (B + 1 counts), got "
                         f"{tuple(cu_blocks.shape)}")
    if debug_checks() and bool((cu_blocks[0] != 0) | (cu_blocks[1:] < cu_blocks[:-1]).any()):
        raise ValueError("cu_blocks: expected non-decreasing cumulative counts starting at 0")


def longformer_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window,
                                global_mask: Tensor, *, q_global: Tensor | None = None,
                                k_global: Tensor | None = None, v_global: Tensor | None = None,
                                scale: float | None = None, max_globals: int | None = None, dropout_p: float = 0.0,
                                backend: str = "auto") -> Tensor:
    """:func:`longattn.longformer_attention` of each packed sequence: a local token attends its sequence's
    window and its sequence's global tokens; a global token attends every token of its own sequence.

    Args:
        q, k, v: ``(T, H, D)``, last dim contiguous.
        cu_seqlens, max_seqlen, window: as :func:`local_attention_varlen`.
        global_mask: ``(T,)`` bool / 0-1, True = a global token.
        q_global, k_global, v_global: ``(T, H, D)`` global projections (default q, k, v).
        max_globals: an upper bound on the number of global tokens in the whole packed batch (all sequences
            together); without it the count is read (one host sync; required under ``torch.compile``).
        scale, dropout_p, backend: as :func:`longattn.longformer_attention`.

    Returns:
        ``(T, H, D)`` in q's dtype.
    """
    T, H, D = _check_packed_qkv(q, k, v, grouped=False)
    max_seqlen, T, left, right = _packed_ints(cu_seqlens, max_seqlen, T, q.device, window)
    global_mask = check_mask("global_mask", global_mask, (T,), q.device)
    if global_mask is None:
        raise TypeError(f"global_mask: expected a ({T},) bool or 0/1 tensor, got None")
    for name, x in (("q_global", q_global), ("k_global", k_global), ("v_global", v_global)):
        if x is not None:
            check_like(name, x, q, "q")
    scale = check_scale(scale, D, None)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    if T == 0:
        return _empty_like(q)
    max_globals = api.resolve_max_globals(max_globals, global_mask.sum, "the batch has")
    q, k, v, q_global, k_global, v_global = api._cast_for_autocast(q, k, v, q_global, k_global, v_global)
    return api._longformer(q[None], k[None], v[None], *(None if x is None else x[None] for x in
                                                         (q_global, k_global, v_global)),
                           global_mask[None], None, left, right, scale, max_globals, dropout_p, backend,
                           key_ranges=_last_ranges(cu_seqlens, None, T), span=max_seqlen).squeeze(0)
