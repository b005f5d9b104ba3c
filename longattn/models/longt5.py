"""LongT5 local and transient-global encoder attention on :func:`longattn.local_attention` /
:func:`longattn.tglobal_attention` + :func:`longattn.block_aggregate`.

What the modules receive (transformers 5.x, ``LongT5Stack.forward``):

- ``LongT5LocalAttention``: ``mask`` is the boolean *blocked* mask ``(B, 1, nb, bl, 3 bl)`` from
  ``_get_local_attention_mask`` (``bl = local_radius + 1``); token ``n * bl + t`` attends itself at
  ``[.., n, t, bl + t]``, so that diagonal is the ``(B, S)`` key padding mask.
- ``LongT5TransientGlobalAttention``: ``mask`` is the raw 2-D ``(B, S)`` attention mask.

Position bias: only layer 0 owns ``relative_attention_bias`` (and ``global_relative_attention_bias``); the stock
layer 0 returns a dense blocked ``position_bias`` that later layers reuse. The patched layer 0 returns instead a
*compact* one, ``(1, H, 2r + 1)`` for local and ``(1, H, (2r + 1) + (2G + 1))`` for transient-global: the band
table by offset ``j - i`` in ``[-r, r]``, then the side table by block offset ``g - block(i)`` in ``[-G, G]``.
It is a Tensor (reentrant gradient checkpointing passes it positionally) and carries the embedding lookups'
graph, so the tables get gradients from every layer. The masks are rebuilt per layer from ``mask`` (cheap,
``(B, S)``), never baked into the bias.
"""

from __future__ import annotations

import torch

from ..api import block_aggregate, local_attention, tglobal_attention, tglobal_block_ids
from ._common import fallback_reason, patch_state, stock_forward, warn_fallback

FORWARD_PARAMS = ("hidden_states", "mask", "position_bias", "output_attentions")


def longt5_local_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
    """Drop-in for ``LongT5LocalAttention.forward``: returns ``(attn_output (B, S, d_model), compact position_bias)``.

    ``mask=None`` means every token is real (the stock forward would instead attend the zero-padding of its last
    block; the stack always passes a mask).
    """
    stock = _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions)
    if stock is not None:
        return stock
    B, S, _ = hidden_states.shape
    r = self.local_radius
    if position_bias is None:
        position_bias = _compact_bias(self, G=None)
    key_padding_mask = _unblock_local_mask(mask, S, self.block_len)
    q, k, v = (_heads(proj(hidden_states), self) for proj in (self.q, self.k, self.v))
    out = local_attention(q, k, v, r, key_padding_mask=key_padding_mask, rel_bias=_band_table(position_bias, r, q),
                          scale=1.0, backend=patch_state(self).backend)
    return self.o(out.reshape(B, S, self.inner_dim)), position_bias


def longt5_tglobal_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
    """Drop-in for ``LongT5TransientGlobalAttention.forward``: returns ``(attn_output, compact position_bias)``."""
    stock = _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions)
    if stock is not None:
        return stock
    B, S, _ = hidden_states.shape
    r, G = self.local_radius, S // self.global_block_size
    real = torch.ones(B, S, dtype=torch.bool, device=hidden_states.device) if mask is None else mask != 0
    block_ids, block_mask = tglobal_block_ids(real, self.global_block_size)  # (B, S), (B, G)
    norm = self.global_input_layer_norm
    # Block sums of the (already layer-normed) inputs, RMS-normed by global_input_layer_norm, in one pass.
    aggregates = block_aggregate(hidden_states, block_ids, G, weight=norm.weight, eps=norm.variance_epsilon,
                                 backend=patch_state(self).backend)  # (B, G, d_model)
    if position_bias is None:
        position_bias = _compact_bias(self, G=G)
    q, k, v = (_heads(proj(hidden_states), self) for proj in (self.q, self.k, self.v))
    side_k, side_v = _heads(self.k(aggregates), self), _heads(self.v(aggregates), self)
    side_bias = _side_table(position_bias, r, G, q)
    out = tglobal_attention(q, k, v, side_k, side_v, r, block_ids, key_padding_mask=real, side_mask=block_mask,
                            rel_bias=_band_table(position_bias, r, q), side_bias=side_bias, scale=1.0,
                            backend=patch_state(self).backend)
    return self.o(out.reshape(B, S, self.inner_dim)), position_bias


def _heads(x, module):
    """(B, S, H * D) -> (B, S, H, D) view."""
    return x.view(*x.shape[:2], module.n_heads, module.key_value_proj_dim)


def _is_compact(position_bias) -> bool:
    return position_bias is None or position_bias.dim() == 3


def _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions):
    """The stock forward's outputs when it must run instead (see ``fallback_reason``), else None.

    A stock layer 0 hands later layers HF's dense blocked bias: they then run stock too. The reverse (a patched
    layer 0 with a stock later layer) only happens with per-layer train/eval states and is refused, since the
    stock forward would misread the compact bias.
    """
    reason = fallback_reason(self, output_attentions, self.dropout)
    if reason is None and _is_compact(position_bias):
        return None
    if not _is_compact(position_bias):
        reason = reason or "the previous layer ran the stock forward and passed its dense position_bias"
    elif position_bias is not None:
        raise RuntimeError(
            f"longattn: {type(self).__name__} must fall back to the stock forward ({reason}) but received the "
            "compact position_bias of a patched first layer; put all encoder layers in the same train/eval mode "
            "(or call longattn.revert_longattn(model))")
    warn_fallback(self, reason)
    return stock_forward(self)(hidden_states, mask=mask, position_bias=position_bias,
                               output_attentions=output_attentions)


def _unblock_local_mask(mask, S: int, block_len: int):
    """``(B, S)`` bool key padding mask from the stack's blocked local mask (or a 2-D mask), None if no mask."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask != 0
    # (B, 1, nb, bl, 3 bl): token n*bl + t sits at [.., n, t, bl + t], i.e. diagonal offset bl of each block.
    diag = torch.diagonal(mask[:, 0], offset=block_len, dim1=-2, dim2=-1)  # (B, nb, bl)
    return diag.reshape(mask.shape[0], -1)[:, :S] != 0


def _compact_bias(self, G: int | None):
    """Layer 0's compact bias ``(1, H, 2r + 1 [+ 2G + 1])`` (see the module docstring); zeros without tables."""
    r = self.local_radius
    weight = self.q.weight
    band = torch.arange(-r, r + 1, device=weight.device)
    tables = [_bucketed(self, "relative_attention_bias", band)]
    if G is not None:
        tables.append(_bucketed(self, "global_relative_attention_bias", torch.arange(-G, G + 1, device=weight.device)))
    return torch.cat(tables, dim=-1)[None]


def _bucketed(self, name: str, offsets):
    """``(H, len(offsets))``: embedding ``name`` at the T5 bucket of each relative offset (zeros if absent)."""
    if not self.has_relative_attention_bias:
        return self.q.weight.new_zeros(self.n_heads, offsets.numel())
    buckets = self._relative_position_bucket(offsets, bidirectional=not self.is_decoder,
                                             num_buckets=self.relative_attention_num_buckets,
                                             max_distance=self.relative_attention_max_distance)
    return getattr(self, name)(buckets).t()


def _band_table(position_bias, r: int, q):
    """``(H, 2r + 1)`` band table in q's dtype (the stock forward adds the bias in the scores' dtype)."""
    return position_bias[0, :, : 2 * r + 1].to(q.dtype)


def _side_table(position_bias, r: int, G: int, q):
    """``(H, 2G + 1)`` side table; checks that the compact bias was made for the same number of blocks."""
    side = position_bias[0, :, 2 * r + 1 :]
    if side.shape[-1] != 2 * G + 1:
        raise ValueError(f"position_bias: a compact transient-global bias for G={(side.shape[-1] - 1) // 2} blocks "
                         f"was passed to a layer that sees G={G} (S // global_block_size)")
    return side.to(q.dtype)
