"""Drop-in attention modules for your own torch models, built on the longattn ops.

Each module owns its projections and maps ``x (B, S, E) -> (B, S, E)``; no ``S x S`` or ``S x window``
tensor is ever formed. Masks are ``(B, S)`` bool / 0-1 tensors with True = a real token (or a global token).

- :class:`SlidingWindowAttention`: banded local attention (optionally causal, optionally a learned per-head
  relative bias by offset).
- :class:`LongformerAttention`: sliding window plus global tokens with separate global projections
  (Longformer / LED semantics).
- :class:`TGlobalAttention`: LongT5's transient-global attention (local band + block aggregates as side keys,
  T5 bucketed relative biases); its parameter names match Hugging Face's ``LongT5TransientGlobalAttention``, so
  a LongT5 layer's weights load with ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import api, varlen_api
from ._validation import normalize_window


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., H * D) -> (..., H, D) view: (B, S, H, D), or (T, H, D) for packed tokens."""
    return x.view(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, S, H, D) -> (B, S, H * D)."""
    return x.reshape(*x.shape[:2], -1)


def _dropout_p(module: nn.Module) -> float:
    """The op's ``dropout_p``: the module's attention dropout in training mode, 0 in eval mode (as
    ``nn.MultiheadAttention``'s ``dropout``)."""
    return module.dropout if module.training else 0.0


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _check_heads(embed_dim: int, num_heads: int) -> int:
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
    return embed_dim // num_heads


class SlidingWindowAttention(nn.Module):
    """Multi-head sliding-window self-attention.

    Query ``i`` attends the real keys ``j`` with ``i - left <= j <= i + right``; ``window=(w, 0)`` is causal.

    Args:
        embed_dim: E; num_heads: H (``E % H == 0``, head dim ``D = E / H``).
        window: ``w`` (same as ``(w, w)``) or ``(left, right)``.
        bias: whether the q/k/v/out projections have biases.
        relative_bias: learn a per-head additive bias by offset ``j - i`` (parameter ``rel_bias``
            ``(H, left + right + 1)``, initialised to 0).
        scale: score scale, default ``1 / sqrt(D)``.
        dropout: attention-probability dropout in training mode (fused in the op), 0.0 by default.
        backend: "auto", "cuda", "triton" or "torch".

    Shapes:
        ``forward(x (B, S, E), key_padding_mask (B, S) | None) -> (B, S, E)``. Padding query rows are 0 before
        the output projection.
    """

    def __init__(self, embed_dim: int, num_heads: int, window, *, bias: bool = True, relative_bias: bool = False,
                 scale: float | None = None, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(embed_dim, num_heads)
        self.dropout = _check_dropout(dropout)
        self.num_heads, self.window, self.scale, self.backend = num_heads, normalize_window(window), scale, backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        width = self.window[0] + self.window[1] + 1
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, width)) if relative_bias else None

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q, k, v = (_split_heads(proj(x), self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        rel_bias = None if self.rel_bias is None else self.rel_bias.to(q.dtype)
        out = api.local_attention(q, k, v, self.window, key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                                  scale=self.scale, dropout_p=_dropout_p(self), backend=self.backend)
        if key_padding_mask is not None:
            out = torch.where(key_padding_mask.bool()[:, :, None, None], out, 0.0)
        return self.out_proj(_merge_heads(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"


class LongformerAttention(nn.Module):
    """Longformer self-attention: a sliding window plus global tokens with their own projections.

    A local query attends, in one softmax, the real non-global keys of its window and every global token; a
    global query attends every real token through ``query_global`` / ``key_global`` / ``value_global``.
    Projection names follow Hugging Face's ``LongformerSelfAttention`` (plus ``output``).

    Args:
        embed_dim: E; num_heads: H (``E % H == 0``).
        window: one-sided window ``w`` (HF's ``attention_window = 2 w``) or ``(left, right)``.
        bias: whether the projections have biases.
        dropout: attention-probability dropout in training mode (local and global rows, as HF's
            ``attention_probs_dropout_prob``), 0.0 by default.
        backend: "auto", "cuda", "triton" or "torch".

    Shapes:
        ``forward(x (B, S, E), global_mask (B, S), key_padding_mask (B, S) | None, max_globals=None) -> (B, S, E)``.
        ``max_globals`` bounds the global tokens per row (required under ``torch.compile``; otherwise read from
        the mask with one host sync). Padding rows are 0 before the output projection.
    """

    def __init__(self, embed_dim: int, num_heads: int, window, *, bias: bool = True, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(embed_dim, num_heads)
        self.dropout = _check_dropout(dropout)
        self.num_heads, self.window, self.backend = num_heads, normalize_window(window), backend
        for name in ("query", "key", "value", "query_global", "key_global", "value_global", "output"):
            setattr(self, name, nn.Linear(embed_dim, embed_dim, bias=bias))

    def forward(self, x: Tensor, global_mask: Tensor, key_padding_mask: Tensor | None = None,
                max_globals: int | None = None) -> Tensor:
        H = self.num_heads
        q, k, v = (_split_heads(proj(x), H) for proj in (self.query, self.key, self.value))
        qg, kg, vg = (_split_heads(proj(x), H) for proj in (self.query_global, self.key_global, self.value_global))
        out = api.longformer_attention(q, k, v, self.window, global_mask, key_padding_mask=key_padding_mask,
                                       q_global=qg, k_global=kg, v_global=vg, max_globals=max_globals,
                                       dropout_p=_dropout_p(self), backend=self.backend)
        return self.output(_merge_heads(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"


def t5_relative_bucket(relative_position: Tensor, *, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> Tensor:
    """T5's bucket of each relative position (key - query): exact below ``num_buckets / 4`` (bidirectional), then
    logarithmic up to ``max_distance``. Same values as Hugging Face's ``_relative_position_bucket``."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(relative_position < max_exact, relative_position, large)


def tglobal_heads(x: Tensor, blocks: tuple[Tensor, Tensor, Tensor], q_proj: nn.Module, k_proj: nn.Module,
                  v_proj: nn.Module, norm_weight: Tensor, eps: float, num_heads: int, local_radius: int,
                  rel_bias: Tensor | None, side_bias: Tensor | None, *, scale: float, backend: str,
                  dropout_p: float = 0.0, varlen: tuple[Tensor, int] | None = None, seq_parallel=None,
                  block_size: int | None = None) -> Tensor:
    """LongT5 transient-global attention of ``x`` before the output projection: ``(B, S, H, D)``.

    The one implementation behind :class:`TGlobalAttention` and the patched Hugging Face layer: block sums of
    ``x`` RMS-normed by ``norm_weight`` (fused), projected by the same ``k_proj`` / ``v_proj`` as the tokens into
    the side keys / values, then the band of radius ``local_radius`` plus the side keys in one softmax.

    Args:
        x: ``(B, S, E)``.
        blocks: ``(real (B, S) bool, block_ids (B, S) int32, block_mask (B, G) bool)``, ``block_ids`` and
            ``block_mask`` from :func:`longattn.tglobal_block_ids` of ``real``.
        q_proj, k_proj, v_proj: ``E -> H * D`` projections.
        norm_weight, eps: the global input RMS norm's ``(E,)`` weight and epsilon.
        rel_bias: ``(H, 2 local_radius + 1)`` by offset ``j - i``; side_bias: ``(H, 2G + 1)`` by block offset
            (cast to the projections' dtype here, as the stock layer adds them to its scores).
        dropout_p: attention-probability dropout (LongT5's ``dropout_rate`` on the attention weights in training).
        varlen: ``(cu_seqlens, max_seqlen)`` for a packed batch: ``x`` is ``(T, E)``, ``blocks`` is
            ``(block_ids (T,), block_mask (G,), cu_blocks)`` from :func:`longattn.tglobal_block_ids_varlen`, and the
            result ``(T, H, D)`` (the ``*_varlen`` ops; side keys of all sequences concatenated).
        seq_parallel, block_size: a ``longattn.distributed.SeqShards``: ``x`` and ``blocks`` are this rank's shard
            (from ``tglobal_block_ids(..., seq_parallel=)``), and the LongT5 block size the ids come from.
    """
    if varlen is not None:
        return _tglobal_heads_varlen(x, blocks, q_proj, k_proj, v_proj, norm_weight, eps, num_heads, local_radius,
                                     rel_bias, side_bias, scale=scale, backend=backend, dropout_p=dropout_p,
                                     varlen=varlen)
    real, block_ids, block_mask = blocks
    aggregates = api.block_aggregate(x, block_ids, block_mask.shape[1], weight=norm_weight, eps=eps, backend=backend,
                                     seq_parallel=seq_parallel,
                                     block_size=None if seq_parallel is None else block_size)  # (B, G, E)
    q, k, v = (_split_heads(proj(x), num_heads) for proj in (q_proj, k_proj, v_proj))
    side_k, side_v = (_split_heads(proj(aggregates), num_heads) for proj in (k_proj, v_proj))
    rel_bias, side_bias = (None if t is None else t.to(q.dtype) for t in (rel_bias, side_bias))
    return api.tglobal_attention(q, k, v, side_k, side_v, local_radius, block_ids, key_padding_mask=real,
                                 side_mask=block_mask, rel_bias=rel_bias, side_bias=side_bias, scale=scale,
                                 dropout_p=dropout_p, backend=backend, seq_parallel=seq_parallel)


def _tglobal_heads_varlen(x, blocks, q_proj, k_proj, v_proj, norm_weight, eps, num_heads, local_radius, rel_bias,
                          side_bias, *, scale, backend, dropout_p, varlen):
    """:func:`tglobal_heads` of a packed batch (see its ``varlen`` argument)."""
    cu_seqlens, max_seqlen = varlen
    block_ids, block_mask, cu_blocks = blocks
    aggregates = varlen_api.block_aggregate_varlen(x, block_ids, block_mask.shape[0], weight=norm_weight, eps=eps,
                                                   backend=backend)  # (G, E)
    q, k, v = (_split_heads(proj(x), num_heads) for proj in (q_proj, k_proj, v_proj))
    side_k, side_v = (_split_heads(proj(aggregates), num_heads) for proj in (k_proj, v_proj))
    rel_bias, side_bias = (None if t is None else t.to(q.dtype) for t in (rel_bias, side_bias))
    return varlen_api.tglobal_attention_varlen(q, k, v, side_k, side_v, cu_seqlens, max_seqlen, local_radius,
                                               block_ids, cu_blocks, side_mask=block_mask, rel_bias=rel_bias,
                                               side_bias=side_bias, scale=scale, dropout_p=dropout_p, backend=backend)


class TGlobalAttention(nn.Module):
    """LongT5 transient-global self-attention.

    Query ``i`` attends, in one softmax, the real keys with ``|i - j| <= local_radius`` and the ``G = S //
    global_block_size`` block aggregates of its row (sum of the block's inputs, RMS-normed by
    ``global_input_layer_norm``, then the same ``k`` / ``v`` projections). Scores get T5 bucketed relative
    biases: ``relative_attention_bias`` by ``j - i``, ``global_relative_attention_bias`` by block offset.
    Tokens of a trailing partial block join the last full block (as Hugging Face's LongT5).

    Args:
        embed_dim: d_model; num_heads: H; head_dim: d_kv (default ``embed_dim // num_heads``).
        local_radius: r (the band is ``[i - r, i + r]``).
        global_block_size: tokens per global block.
        num_buckets, max_distance: T5 relative-position bucketing.
        eps: the global input norm's epsilon.
        scale: score scale; 1.0 as T5 (which folds the scaling into the initialisation of ``q``).
        dropout: attention-probability dropout in training mode (LongT5's ``dropout_rate`` on the attention
            weights), 0.0 by default.
        backend: "auto", "cuda", "triton" or "torch".

    Shapes:
        ``forward(x (B, S, d_model), key_padding_mask (B, S) | None) -> (B, S, d_model)``. Padding rows are 0
        before the output projection (unlike a patched Hugging Face LongT5 layer, whose padding rows attend like
        real ones: see :mod:`longattn.models.longt5`).
    """

    def __init__(self, embed_dim: int, num_heads: int, local_radius: int, global_block_size: int, *,
                 head_dim: int | None = None, num_buckets: int = 32, max_distance: int = 128, eps: float = 1e-6,
                 scale: float = 1.0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.dropout = _check_dropout(dropout)
        head_dim = _check_heads(embed_dim, num_heads) if head_dim is None else head_dim
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.local_radius = num_heads, head_dim, local_radius
        self.global_block_size, self.num_buckets, self.max_distance = global_block_size, num_buckets, max_distance
        self.scale, self.backend = scale, backend
        self.q = nn.Linear(embed_dim, inner, bias=False)
        self.k = nn.Linear(embed_dim, inner, bias=False)
        self.v = nn.Linear(embed_dim, inner, bias=False)
        self.o = nn.Linear(inner, embed_dim, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.global_relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        # Only its weight and eps are used, by the fused block_aggregate (T5's RMS norm, no mean, no bias).
        self.global_input_layer_norm = nn.RMSNorm(embed_dim, eps=eps)

    def bias_table(self, embedding: nn.Embedding, radius: int) -> Tensor:
        """``(H, 2 radius + 1)``: ``embedding`` at the bucket of each offset in ``[-radius, radius]``."""
        offsets = torch.arange(-radius, radius + 1, device=embedding.weight.device)
        buckets = t5_relative_bucket(offsets, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return embedding(buckets).t()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        B, S, _ = x.shape
        real = torch.ones(B, S, dtype=torch.bool, device=x.device) if key_padding_mask is None \
            else key_padding_mask != 0
        blocks = (real, *api.tglobal_block_ids(real, self.global_block_size))
        r, G = self.local_radius, blocks[2].shape[1]
        out = tglobal_heads(x, blocks, self.q, self.k, self.v, self.global_input_layer_norm.weight,
                            self.global_input_layer_norm.eps, self.num_heads, r,
                            self.bias_table(self.relative_attention_bias, r),
                            self.bias_table(self.global_relative_attention_bias, G),
                            scale=self.scale, dropout_p=_dropout_p(self), backend=self.backend)
        out = torch.where(real[:, :, None, None], out, 0.0)  # padding rows 0, as SlidingWindowAttention's
        return self.o(_merge_heads(out))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, local_radius={self.local_radius}, "
                f"global_block_size={self.global_block_size}")


__all__ = ["LongformerAttention", "SlidingWindowAttention", "TGlobalAttention", "t5_relative_bucket",
           "tglobal_heads"]
