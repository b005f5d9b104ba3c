"""The public attention functions of longattn (DESIGN.md section 2).

Layout everywhere is ``(B, S, H, D)``: batch, sequence, heads, head dim. Any strides are accepted as long
as the last dim is contiguous (a ``(B, H, S, D).transpose(1, 2)`` view needs no copy). Every function
validates its inputs before computing (``TypeError`` / ``ValueError`` naming the argument), then resolves
``backend`` ("auto", "cuda", "triton", "torch") in ``longattn.dispatch`` and runs one custom op of
``longattn._ops`` (forward and backward), so autograd, ``torch.compile`` and autocast all work. With
``seq_parallel=`` (a ``longattn.distributed.SeqShards``) a call is handed to ``longattn.distributed`` instead,
which runs the plain ops on this rank's shard and what it gathers from the others (``dropout_p > 0`` with it:
local and TGlobal only).

No call reads device data on the host when its sizes are known (``max_globals`` for Longformer): checks of
index values (``query_block``, ``block_ids``), of integer masks holding only 0/1 and of ``max_globals`` against
the real count run only in debug mode (``longattn.set_debug(True)`` or ``LONGATTN_DEBUG=1``); otherwise every
backend makes out-of-range values safe (clamped or dropped, never an out-of-bounds access; see
``longattn.backends``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops
from ._dropout import check_dropout_p, philox_increment, philox_seed_offset
from ._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    _as_int,
    _is_compiling,
    check_backend_name,
    check_bias_table,
    check_index_tensor,
    check_last_dim_contiguous,
    check_like,
    check_mask,
    check_qkv,
    check_scale,
    check_side_kv,
    check_tensor,
    debug_checks,
    normalize_window,
)
from .dispatch import resolve

_autocast_enabled = torch._C._is_any_autocast_enabled


def _cast_for_autocast(*tensors):
    """Under CUDA/CPU autocast, run in the autocast dtype (attention is a matmul-like op). Callers on the hot path
    check ``_autocast_enabled()`` first (one C call instead of this call and its tuples)."""
    if not _autocast_enabled():
        return tensors
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device) and tensors[0].dtype == torch.float32:
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if t is not None else None for t in tensors)
    return tensors


def _dropout_rng(q: Tensor, dropout_p: float):
    """``[seed, offset]`` of one dropout call, drawn from the device's generator (``longattn._dropout``), or None for
    ``dropout_p = 0`` (no generator is touched). Counters are per (batch, query head)."""
    if not dropout_p:
        return None
    return philox_seed_offset(q.device, philox_increment(q.shape[0], q.shape[2]))


def _sequence_parallel(name: str, seq_parallel, *args, dropout_p: float = 0.0, **kwargs):
    """Hand a call with ``seq_parallel`` to ``longattn.distributed.<name>`` (imported only then), which validates
    the shard and runs this function on its shard plus the halo; see the README's "Sequence parallel". Dropout runs
    there for the band ops (local, TGlobal); Longformer's raises."""
    if dropout_p and name == "longformer_attention":
        raise ValueError("dropout_p: not supported by longformer_attention with seq_parallel yet; pass dropout_p=0.0")
    from . import distributed

    return getattr(distributed, name)(*args, seq_parallel=seq_parallel, **({"dropout_p": dropout_p} if dropout_p
                                                                             else {}), **kwargs)


def _dropout_feature(dropout_p: float) -> tuple[str, ...]:
    return ("dropout",) if dropout_p else ()


def _band_side(q, k, v, side_k, side_v, left, right, band_key_mask, side_mask, query_block, band_bias, side_bias,
               scale, backend, dropout_p=0.0, *, key_ranges=None, side_ranges=None, span=None, halo=None,
               with_lse=False, dropout_offset=0):
    """Run the primitive on validated inputs: clamp the window to [0, span-1] and pick the backend.

    A window reaching past the sequence is the same as one reaching exactly to its edge, so the kernels
    only ever see ``left, right <= span - 1``; the band bias table is sliced to the offsets that remain.
    ``span``: the longest run of keys a row can see (S; a packed batch's ``max_seqlen``, whose rows see only
    their sequence through ``key_ranges`` / ``side_ranges``, ``longattn.varlen_api``).

    ``halo``: ``(halo_k, halo_v, halo_mask, halo_left)``, band keys before / after the sequence read in place
    (``longattn.distributed``; contract in ``longattn.backends``, "Halo keys"): the window then reaches
    ``halo_left`` keys further left and the rest further right. ``with_lse``: return ``(out, lse)``, both
    differentiable (the backward takes the lse gradient: a split-KV merge by log-sum-exp, as the
    sequence-parallel global rows do). ``dropout_offset``: the dropout counters' position of row 0 and band key 0
    (a sequence-parallel shard's start, so its keep bits are the whole sequence's).
    """
    shape = q.shape
    S = shape[1] if span is None else min(span, shape[1])
    hl, hr = (0, 0) if halo is None else (halo[3], halo[0].shape[1] - halo[3])
    left_eff, right_eff = min(left, S + hl - 1), min(right, S + hr - 1)
    if band_bias is not None:
        if left_eff != left or right_eff != right:
            band_bias = band_bias[:, left - left_eff : left + right_eff + 1]
        band_bias = band_bias.contiguous()
    if side_bias is not None:
        side_bias = side_bias.contiguous()
    ranged = key_ranges is not None or side_ranges is not None
    features = ("grouped_kv",) if k.shape[2] != shape[2] else ()
    if dropout_p:
        features += ("dropout",)
    if ranged or halo is not None or with_lse or dropout_offset:
        features += ((("ranges",) if ranged else ()) + (("halo",) if halo is not None else ())
                     + (("lse_grad",) if with_lse else ())
                     + (("dropout_offset",) if dropout_p and dropout_offset else ()))
    name = resolve(backend, q.device, q.dtype, shape[3], "local" if side_k is None else "tglobal", S, features)
    # Today's call, unchanged, without dropout, ranges or halo: the op's defaults fill its optional tail.
    offset = dropout_offset if dropout_p else 0
    if offset and (offset % 4 or offset < hl):
        raise ValueError(f"dropout_offset: expected a multiple of 4 (the counters' groups of 4 keys) and at least the "
                         f"halo's left width {hl}, got {offset}")
    tail = (dropout_p, _dropout_rng(q, dropout_p)) if dropout_p or ranged or halo is not None else ()
    if ranged or halo is not None or offset:
        tail += (key_ranges, side_ranges)
    if halo is not None or offset:
        tail += (None, None, None, 0) if halo is None else halo
    run = _ops.run_band_side_with_lse if with_lse else _ops.run_band_side
    out, lse = run(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block if side_bias is not None else None,
                   band_bias, side_bias, left_eff, right_eff, scale, name, *tail, *((offset,) if offset else ()))
    return (out, lse) if with_lse else out


def local_attention(q: Tensor, k: Tensor, v: Tensor, window, *, key_padding_mask: Tensor | None = None,
                    rel_bias: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                    backend: str = "auto", seq_parallel=None) -> Tensor:
    """Sliding-window (banded) attention.

    Query ``i`` attends keys ``j`` with ``i - left <= j <= i + right`` (and ``0 <= j < S``) whose
    ``key_padding_mask`` is true: ``out_i = softmax_j(scale * <q_i, k_j> + rel_bias[h, j - i + left]) @ v``.

    Args:
        q: ``(B, S, H, D)`` float16 / bfloat16 / float32 / float64, last dim contiguous.
        k, v: ``(B, S, H_kv, D)`` like q, with ``H % H_kv == 0``: ``H_kv < H`` is grouped-query attention
            (``H_kv = 1``: multi-query), query head ``h`` reading K/V head ``h // (H // H_kv)`` as in HF and
            flash-attn. K/V are never repeated in memory; their gradients have ``H_kv`` heads.
        window: ``w`` (same as ``(w, w)``) or ``(left, right)`` non-negative ints, as flash-attn's
            ``window_size``; ``(w, 0)`` is causal. Windows ``>= S`` give dense attention.
        key_padding_mask: ``(B, S)`` bool or 0/1 ints, True = a real token (padding is never a key).
            Padding *query* rows still attend the real keys of their window; mask them yourself if needed.
        rel_bias: ``(H, left + right + 1)`` additive bias by offset ``j - i`` (LongT5's bucketed bias);
            gets a gradient.
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: attention-probability dropout in ``[0, 1)``, applied after the softmax (kept probabilities
            scaled by ``1 / (1 - dropout_p)``); the keep mask is a Philox function of a seed/offset drawn from
            torch's generator for q's device (``longattn._dropout``). 0 (default) draws nothing.
        backend: "auto", "cuda", "triton" or "torch".
        seq_parallel: a ``longattn.distributed.SeqShards``: the sequence tensors are this rank's shard of one
            sequence split over a process group, and the result is this rank's rows (``longattn.distributed``).

    Returns:
        ``(B, S, H, D)`` in q's dtype; a query with no key to attend gets zeros.
    """
    if seq_parallel is not None:
        return _sequence_parallel("local_attention", seq_parallel, q, k, v, window, dropout_p=dropout_p,
                                  key_padding_mask=key_padding_mask, rel_bias=rel_bias, scale=scale, backend=backend)
    return _band_side(*_local_inputs(q, k, v, window, key_padding_mask, rel_bias, scale, dropout_p, backend))


def _local_inputs(q, k, v, window, key_padding_mask, rel_bias, scale, dropout_p, backend) -> tuple:
    """:func:`local_attention`'s arguments validated, as :func:`_band_side`'s positional arguments."""
    B, S, H, D = check_qkv(q, k, v, grouped=True)
    left, right = normalize_window(window)
    key_padding_mask = check_mask("key_padding_mask", key_padding_mask, (B, S), q.device)
    rel_bias = check_bias_table("rel_bias", rel_bias, H, left + right + 1, q)
    scale = check_scale(scale, D, None)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    if _autocast_enabled():
        q, k, v = _cast_for_autocast(q, k, v)
    return q, k, v, None, None, left, right, key_padding_mask, None, None, rel_bias, None, scale, backend, dropout_p


def tglobal_attention(q: Tensor, k: Tensor, v: Tensor, side_k: Tensor, side_v: Tensor, window, query_block: Tensor,
                      *, key_padding_mask: Tensor | None = None, side_mask: Tensor | None = None,
                      rel_bias: Tensor | None = None, side_bias: Tensor | None = None, scale: float = 1.0,
                      dropout_p: float = 0.0, backend: str = "auto", seq_parallel=None) -> Tensor:
    """Band attention plus ``G`` side keys attended by every query (LongT5 transient-global).

    Query ``i`` attends, in one softmax, its band keys (as :func:`local_attention`) and every side key
    ``g`` with ``side_mask[b, g]``, scored ``scale * <q_i, side_k_g> + side_bias[h, g - query_block[b, i] + G]``.

    Args:
        q, k, v: ``(B, S, H, D)``, last dim contiguous; k, v may have ``H_kv`` heads (grouped-query attention,
            as :func:`local_attention`).
        side_k, side_v: ``(B, G, H_kv, D)`` side keys / values (e.g. from :func:`block_aggregate`), with k's head
            count (query head ``h`` reads side head ``h // (H // H_kv)``); G may be 0.
        window: ``w`` or ``(left, right)``; LongT5's ``local_radius`` r is ``window=r``.
        query_block: ``(B, S)`` integer block id of each query in ``[-1, G - 1]`` (-1 = padding), as from
            :func:`tglobal_block_ids`; used to index ``side_bias``.
        key_padding_mask: ``(B, S)`` bool / 0-1, True = a real token (a band key).
        side_mask: ``(B, G)`` bool / 0-1, True = an attendable side key.
        rel_bias: ``(H, left + right + 1)`` band bias by offset ``j - i``.
        side_bias: ``(H, 2G + 1)`` side bias by block offset ``g - query_block[i]``.
        scale: default 1.0 (T5 does not scale scores).
        dropout_p: attention-probability dropout over the band and side probabilities together (as
            :func:`local_attention`; LongT5's ``dropout_rate`` in training).
        backend: "auto", "cuda", "triton" or "torch".
        seq_parallel: a ``longattn.distributed.SeqShards``: the sequence tensors are this rank's shard of one
            sequence split over a process group, and the result is this rank's rows (``longattn.distributed``).

    Returns:
        ``(B, S, H, D)`` in q's dtype.
    """
    if seq_parallel is not None:
        return _sequence_parallel("tglobal_attention", seq_parallel, q, k, v, side_k, side_v, window, query_block,
                                  dropout_p=dropout_p, key_padding_mask=key_padding_mask, side_mask=side_mask,
                                  rel_bias=rel_bias, side_bias=side_bias, scale=scale, backend=backend)
    return _band_side(*_tglobal_inputs(q, k, v, side_k, side_v, window, query_block, key_padding_mask, side_mask,
                                       rel_bias, side_bias, scale, dropout_p, backend))


def _tglobal_inputs(q, k, v, side_k, side_v, window, query_block, key_padding_mask, side_mask, rel_bias, side_bias,
                    scale, dropout_p, backend) -> tuple:
    """:func:`tglobal_attention`'s arguments validated, as :func:`_band_side`'s positional arguments."""
    B, S, H, D = check_qkv(q, k, v, grouped=True)
    G = check_side_kv(side_k, side_v, q, k)
    left, right = normalize_window(window)
    device = q.device
    query_block = check_index_tensor("query_block", query_block, (B, S), device, -1, G - 1)
    key_padding_mask = check_mask("key_padding_mask", key_padding_mask, (B, S), device)
    side_mask = check_mask("side_mask", side_mask, (B, G), device)
    rel_bias = check_bias_table("rel_bias", rel_bias, H, left + right + 1, q)
    side_bias = check_bias_table("side_bias", side_bias, H, 2 * G + 1, q)
    scale = check_scale(scale, D, 1.0)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    if _autocast_enabled():
        q, k, v, side_k, side_v = _cast_for_autocast(q, k, v, side_k, side_v)
    return (q, k, v, side_k, side_v, left, right, key_padding_mask, side_mask, query_block, rel_bias, side_bias, scale,
            backend, dropout_p)


def longformer_attention(q: Tensor, k: Tensor, v: Tensor, window, global_mask: Tensor, *,
                         key_padding_mask: Tensor | None = None, q_global: Tensor | None = None,
                         k_global: Tensor | None = None, v_global: Tensor | None = None,
                         scale: float | None = None, max_globals: int | None = None, dropout_p: float = 0.0,
                         backend: str = "auto", seq_parallel=None) -> Tensor:
    """Longformer / LED self-attention: sliding window plus global tokens.

    - A local (non-global) real query attends, in one softmax, the real non-global keys of its window and
      every global token's key (through ``k``, ``v``), as Hugging Face's ``LongformerSelfAttention``.
    - A global query attends all real tokens, with its own projections ``q_global``, ``k_global``,
      ``v_global`` (default: ``q``, ``k``, ``v``), and its row of the output is that result.
    - Padding query rows are 0.

    Args:
        q, k, v: ``(B, S, H, D)``, last dim contiguous (equal head counts: grouped-query K/V is taken by
            :func:`local_attention` and :func:`tglobal_attention` only).
        window: ``w`` or ``(left, right)``; HF's ``attention_window=512`` is ``window=256``.
        global_mask: ``(B, S)`` bool / 0-1, True = a global token (padding tokens are never global).
        key_padding_mask: ``(B, S)`` bool / 0-1, True = a real token.
        q_global, k_global, v_global: ``(B, S, H, D)`` global projections of every token; only the rows of
            global tokens of ``q_global`` are read.
        scale: default ``1 / sqrt(D)``.
        max_globals: an upper bound on the number of global tokens per row (a looser bound costs only
            memory and time in the global-rows pass). Without it the count is read from ``global_mask`` (one
            host sync); under ``torch.compile`` it is required. A row with more global tokens keeps its first
            ``max_globals`` (the output rows of the others are undefined); debug mode
            (``longattn.set_debug(True)``) raises instead.
        dropout_p: attention-probability dropout (as :func:`local_attention`) on the band rows' probabilities
            (band and global keys) and on the global rows' (HF's ``attention_probs_dropout_prob``); the two kinds
            of rows draw independent bits from one seed/offset.
        backend: "auto", "cuda", "triton" or "torch".
        seq_parallel: a ``longattn.distributed.SeqShards``: the sequence tensors are this rank's shard of one
            sequence split over a process group (``max_globals`` bounds the whole sequence's rows), and the result
            is this rank's rows (``longattn.distributed``).

    Returns:
        ``(B, S, H, D)`` in q's dtype.
    """
    if seq_parallel is not None:
        return _sequence_parallel("longformer_attention", seq_parallel, q, k, v, window, global_mask,
                                  dropout_p=dropout_p, key_padding_mask=key_padding_mask, q_global=q_global,
                                  k_global=k_global, v_global=v_global, scale=scale, max_globals=max_globals,
                                  backend=backend)
    B, S, H, D = check_qkv(q, k, v)
    left, right = normalize_window(window)
    device = q.device
    global_mask = check_mask("global_mask", global_mask, (B, S), device)
    if global_mask is None:
        raise TypeError("global_mask: expected a (B, S) bool or 0/1 tensor, got None")
    key_padding_mask = check_mask("key_padding_mask", key_padding_mask, (B, S), device)
    if q_global is not None or k_global is not None or v_global is not None:
        for name, x in (("q_global", q_global), ("k_global", k_global), ("v_global", v_global)):
            if x is not None:
                check_like(name, x, q, "q")
    scale = check_scale(scale, D, None)
    dropout_p = check_dropout_p(dropout_p)
    check_backend_name(backend)
    # The global count is read only without max_globals (or in debug mode): no device op otherwise.
    max_globals = resolve_max_globals(max_globals, lambda: (global_mask if key_padding_mask is None else global_mask
                                                            & key_padding_mask).sum(1).max(), "a row has")
    if _autocast_enabled():
        q, k, v, q_global, k_global, v_global = _cast_for_autocast(q, k, v, q_global, k_global, v_global)
    return _longformer(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale,
                       max_globals, dropout_p, backend)


def resolve_max_globals(max_globals, count, counted: str) -> int:
    """``max_globals`` validated, or, when None (or in debug mode, to check it), ``count()`` (a 0-d tensor) read
    on the host: the one sync of a Longformer call, only without ``max_globals``. ``counted`` names what was
    counted in the error ("a row has", "the batch has")."""
    if type(max_globals) is int and max_globals >= 0 and not debug_checks():
        return max_globals  # the common case: what the checks below return
    if max_globals is not None:
        max_globals = _as_int("max_globals", max_globals)
        if max_globals < 0:
            raise ValueError(f"max_globals: expected a non-negative int, got {max_globals}")
    elif _is_compiling():
        raise ValueError("max_globals: required under torch.compile (the global count is data-dependent)")
    if max_globals is None or debug_checks():
        found = int(count())
        if max_globals is not None and found > max_globals:
            raise ValueError(f"max_globals: {counted} {found} global tokens, more than {max_globals}")
        max_globals = found if max_globals is None else max_globals
    return max_globals


def _longformer(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale,
                max_globals, dropout_p, backend, *, key_ranges=None, span=None) -> Tensor:
    """Run the Longformer op on validated inputs (window clamped to ``span``, see :func:`_band_side`)."""
    shape = q.shape
    S = shape[1] if span is None else min(span, shape[1])
    features = _dropout_feature(dropout_p) + (("ranges",) if key_ranges is not None else ())
    name = resolve(backend, q.device, q.dtype, shape[3], "longformer", S, features)
    left, right = min(left, S - 1), min(right, S - 1)
    drop = (dropout_p, _dropout_rng(q, dropout_p)) if dropout_p or key_ranges is not None else ()  # p = 0: unchanged
    # More than S slots could never be filled: a looser bound is clamped (a size, not data: no sync).
    return _ops.run_longformer(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right,
                               scale, min(max_globals, shape[1]), name, *drop,
                               *((key_ranges,) if key_ranges is not None else ()))[0]


def block_aggregate(x: Tensor, block_ids: Tensor, num_blocks: int, *, weight: Tensor | None = None,
                    eps: float = 1e-6, backend: str = "auto", seq_parallel=None,
                    block_size: int | None = None) -> Tensor:
    """Sum tokens into blocks, optionally RMS-normalised (LongT5's global aggregates + global layer norm).

    ``sums[b, g] = sum of x[b, s] over s with block_ids[b, s] == g``; with ``weight``, the result is
    ``weight * sums / sqrt(mean(sums**2, -1) + eps)`` (T5's RMS norm), computed in one fused pass.

    Args:
        x: ``(B, S, C)`` float, last dim contiguous.
        block_ids: ``(B, S)`` integers in ``[-1, num_blocks - 1]``; -1 drops the token.
        num_blocks: ``G >= 0``.
        weight: ``(C,)`` norm weight, or None for plain sums.
        eps: the norm's epsilon (> 0).
        backend: "auto", "cuda", "triton" or "torch".
        seq_parallel: a ``longattn.distributed.SeqShards``: ``x`` and ``block_ids`` are this rank's ``(B, S_r, ...)``
            shard of one sequence (ids in the whole sequence's numbering); the result is replicated on every rank.
        block_size: with ``seq_parallel`` only: the LongT5 block size the ids come from (consecutive blocks of
            that size, as :func:`tglobal_block_ids`), which lets each block be owned by one rank (less traffic).

    Returns:
        ``(B, G, C)`` in x's dtype.
    """
    if seq_parallel is not None:
        return _sequence_parallel("block_aggregate", seq_parallel, x, block_ids, num_blocks, weight=weight, eps=eps,
                                  block_size=block_size, backend=backend)
    if block_size is not None:
        raise ValueError("block_size: only used with seq_parallel; got it without")
    check_tensor("x", x, ndim=3)
    if min(x.shape) == 0:
        raise ValueError(f"x: expected a non-empty (B, S, C) tensor, got shape {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    B, S, C = x.shape
    num_blocks = _as_int("num_blocks", num_blocks)
    if num_blocks < 0:
        raise ValueError(f"num_blocks: expected a non-negative int, got {num_blocks}")
    block_ids = check_index_tensor("block_ids", block_ids, (B, S), x.device, -1, num_blocks - 1)
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device)
        if weight.shape[0] != C:
            raise ValueError(f"weight: expected shape ({C},) to match x's last dim, got {tuple(weight.shape)}")
        weight = weight.contiguous()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    check_backend_name(backend)
    name = resolve(backend, x.device, x.dtype, C, "aggregate", S)
    out, _, _ = _ops.run_block_aggregate(x, block_ids, num_blocks, weight, float(eps), name)
    return out


def tglobal_block_ids(mask: Tensor, block_size: int, *, seq_parallel=None) -> tuple[Tensor, Tensor]:
    """LongT5's transient-global block ids, as ``_make_global_fixed_block_ids`` in transformers.

    Token ``s`` of a real row belongs to block ``s // block_size``; tokens of a trailing partial block join
    the last full block ("orphans"); padding gets -1; with no full block every token is -1.

    Args:
        mask: ``(B, S)`` bool / 0-1 integers, True = a real token.
        block_size: LongT5's ``global_block_size`` (> 0).
        seq_parallel: a ``longattn.distributed.SeqShards``: ``mask`` is this rank's ``(B, S_r)`` shard; the ids
            returned are this rank's (in the whole sequence's numbering) and the block mask is replicated.

    Returns:
        ``block_ids``: ``(B, S)`` int32 in ``[-1, G - 1]`` with ``G = S // block_size``;
        ``block_mask``: ``(B, G)`` bool, True for the blocks of each row that hold a real token.
    """
    if seq_parallel is not None:
        return _sequence_parallel("tglobal_block_ids", seq_parallel, mask, block_size)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool, *INT_DTYPES, *FLOAT_DTYPES))
    block_size = _as_int("block_size", block_size)
    if block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size}")
    B, S = mask.shape
    real = mask != 0
    pos = torch.arange(S, device=mask.device)
    ids = torch.where(real, (pos // block_size)[None, :], -1)
    # Number of complete blocks = real tokens sitting at a block's last position (HF counts it so).
    full_blocks = (real & (pos % block_size == block_size - 1)[None, :]).sum(-1, keepdim=True) - 1
    ids = torch.minimum(ids, full_blocks)
    G = S // block_size
    block_mask = torch.arange(G, device=mask.device)[None, :] <= ids.amax(-1, keepdim=True)
    return ids.to(torch.int32), block_mask
