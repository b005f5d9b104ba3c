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
graph, so the tables get gradients from every layer. The masks are never baked into the bias: what the layers
derive from ``mask`` (block ids, the key padding mask) is computed once per forward by layer 0 and handed to the
later layers on the bias tensor as a Python attribute (``_once_per_forward``).

Which rows equal stock. Every *real* token's row equals the stock forward's (within rounding), and so does
everything computed from real rows: the loss, logits, generated tokens and every gradient. *Padding* query rows do
not, by design:

- Stock: every score of a padding query gets the ``-1e10`` mask, and in the softmax (fp32, even for fp64 models)
  ``score - 1e10`` rounds to ``-1e10`` (for ``|score| < 512``), so the row's weights are uniform.
  LocalAttention: the plain mean of the values of the 3 blocks around the query's block (``3 * block_len``
  slots, zeros past either end): keys up to ``2 * block_len - 1`` away, padding included. TransientGlobalAttention:
  HF's side mask compares the 0/1 token mask with the 0/1 valid-block flags, so a padding query attends exactly
  the blocks that hold no real token, whose aggregates are 0: its output is 0 when its row has such a block (fewer
  than ``G = S // global_block_size`` full blocks of real tokens), else the plain mean of those ``3 * block_len``
  values and all ``G`` aggregate values. In fp16 ``-1e10`` overflows to ``-inf``: every padding row with all
  its scores masked (all of LocalAttention's; TransientGlobalAttention's when its row has no empty block) is NaN,
  and the next layer spreads the NaN to real rows (0 x NaN in the weighted sums).
- Patched: a padding query attends like a real one: the real keys within ``local_radius``, with the band bias,
  and for transient-global the valid blocks, with the side bias at block offset ``g + 1`` (HF's block id for
  padding is -1); a row with nothing to attend is 0. Finite in every dtype. Matching stock would mean computing,
  beside the kernel, a block-aligned uniform average that exists only because of how ``-1e10`` rounds.

Why padding rows cannot reach real tokens (patched; stock too, except fp16 as above): a real query attends
only real keys and valid blocks, whose aggregates sum real tokens only (padding has block id -1); everything else
in the encoder (layer norms, feed-forward, residuals) is per token; the decoder's cross-attention masks the
encoder's padding (an additive ``finfo.min``: weight exactly 0). So with a loss that reads no padding row (the
seq2seq loss never does), real-token outputs, the loss and the gradients w.r.t. real tokens and parameters are
bitwise the same whatever finite values the padding rows hold (``tests/test_models.py``:
``test_longt5_padding_rows_cannot_reach_real_tokens``; the values above are pinned by
``test_longt5_padding_rows_are_the_documented_values``). Read ``LongT5EncoderModel``'s ``last_hidden_state``
through the attention mask, as with stock.
"""

from __future__ import annotations

import torch

from ..api import local_attention, tglobal_block_ids
from ..nn import tglobal_heads
from ..varlen_api import local_attention_varlen, tglobal_block_ids_varlen
from ._common import (
    active_seq_parallel,
    attention_dropout,
    fallback_reason,
    once_per_forward,
    patch_state,
    stock_forward,
    warn_fallback,
)
from ._packing import packed_layout

FORWARD_PARAMS = ("hidden_states", "mask", "position_bias", "output_attentions")


def longt5_local_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
    """Drop-in for ``LongT5LocalAttention.forward``: returns ``(attn_output (B, S, d_model), compact position_bias)``.

    ``mask=None`` means every token is real (the stock forward would instead attend the zero-padding of its last
    block; the stack always passes a mask). Rows of real tokens equal stock; padding rows do not (module docstring).
    """
    stock = _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions)
    if stock is not None:
        return stock
    B, S, _ = hidden_states.shape
    r = self.local_radius
    if position_bias is None:
        position_bias = _compact_bias(self, G=None)
    key_padding_mask = once_per_forward(position_bias, mask, ("local", S, self.block_len),
                                         lambda: _unblock_local_mask(mask, S, self.block_len))
    layout = _packed_layout(self, position_bias, mask, key_padding_mask, aligned_start=False)
    if layout is not None:
        x = layout.pack(hidden_states)
        q, k, v = (proj(x).view(x.shape[0], self.n_heads, self.key_value_proj_dim) for proj in (self.q, self.k, self.v))
        out = local_attention_varlen(q, k, v, layout.index.cu_seqlens, layout.index.max_seqlen, r,
                                     rel_bias=_band_table(position_bias, r).to(q.dtype), scale=1.0,
                                     dropout_p=attention_dropout(self, self.dropout), backend=patch_state(self).backend)
        return layout.unpack(self.o(out.reshape(x.shape[0], self.inner_dim))), position_bias
    q, k, v = (_heads(proj(hidden_states), self) for proj in (self.q, self.k, self.v))
    out = local_attention(q, k, v, r, key_padding_mask=key_padding_mask,
                          rel_bias=_band_table(position_bias, r).to(q.dtype), scale=1.0,
                          dropout_p=attention_dropout(self, self.dropout), backend=patch_state(self).backend,
                          seq_parallel=getattr(active_seq_parallel(), "shards", None))
    return self.o(out.reshape(B, S, self.inner_dim)), position_bias


def longt5_tglobal_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
    """Drop-in for ``LongT5TransientGlobalAttention.forward``: returns ``(attn_output, compact position_bias)``.

    Rows of real tokens equal stock; padding rows do not (module docstring).
    """
    stock = _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions)
    if stock is not None:
        return stock
    B, S, _ = hidden_states.shape
    sp = getattr(active_seq_parallel(), "shards", None)  # sequence-parallel: G and block ids of the whole sequence
    r, G = self.local_radius, (S if sp is None else sp.seq_len) // self.global_block_size
    if position_bias is None:
        position_bias = _compact_bias(self, G=G)
    norm = self.global_input_layer_norm
    real = None if mask is None else once_per_forward(position_bias, mask, ("real", B, S), lambda: mask != 0)
    layout = _packed_layout(self, position_bias, mask, real, aligned_start=True)
    if layout is not None:
        x = layout.pack(hidden_states)
        T, bs = x.shape[0], self.global_block_size
        blocks = once_per_forward(position_bias, mask, ("tglobal-packed", T, bs),
                                  lambda: tglobal_block_ids_varlen(layout.index.cu_seqlens, T, bs))
        side = _recentre(_side_table(position_bias, r, G), T // bs)
        out = tglobal_heads(x, blocks, self.q, self.k, self.v, norm.weight, norm.variance_epsilon, self.n_heads, r,
                            _band_table(position_bias, r), side, scale=1.0,
                            dropout_p=attention_dropout(self, self.dropout), backend=patch_state(self).backend,
                            varlen=(layout.index.cu_seqlens, layout.index.max_seqlen))
        return layout.unpack(self.o(out.reshape(T, self.inner_dim))), position_bias
    blocks = once_per_forward(position_bias, mask, ("tglobal", B, S, self.global_block_size),
                               lambda: _tglobal_blocks(mask, hidden_states, self.global_block_size, sp))
    out = tglobal_heads(hidden_states, blocks, self.q, self.k, self.v, norm.weight, norm.variance_epsilon,
                        self.n_heads, r, _band_table(position_bias, r), _side_table(position_bias, r, G),
                        scale=1.0, dropout_p=attention_dropout(self, self.dropout), backend=patch_state(self).backend,
                        seq_parallel=sp, block_size=self.global_block_size)
    return self.o(out.reshape(B, S, self.inner_dim)), position_bias


def _packed_layout(self, position_bias, mask, real, *, aligned_start: bool):
    """The packed layout of this forward (``apply_longattn(packed=True)``; ``longattn.models._packing``), or None
    to run padded (not packed, no mask, or a layout packing cannot serve)."""
    if not patch_state(self).packed or real is None:
        return None
    return packed_layout(self, position_bias, mask, real, None, aligned_start=aligned_start)


def _recentre(side_table, G: int):
    """A ``(H, 2G' + 1)`` side table by block offset re-centred for ``G`` side keys: ``(H, 2G + 1)``.

    Packed, the side keys of all sequences are concatenated (``G = T // block_size`` of them), but a query only
    scores its own sequence's blocks, at in-sequence offsets ``|g - block(i)| < G'``, so the entries added (zeros)
    or cut are never read.
    """
    old = (side_table.shape[-1] - 1) // 2
    if G >= old:
        return torch.nn.functional.pad(side_table, (G - old, G - old))
    return side_table[:, old - G : old + G + 1]


def _tglobal_blocks(mask, hidden_states, block_size: int, seq_parallel=None):
    """``(real (B, S) bool, block_ids (B, S) int32, block_mask (B, G) bool)`` as :func:`tglobal_heads` takes them."""
    B, S, _ = hidden_states.shape
    real = torch.ones(B, S, dtype=torch.bool, device=hidden_states.device) if mask is None else mask != 0
    sharded = {} if seq_parallel is None else {"seq_parallel": seq_parallel}
    return (real, *tglobal_block_ids(real, block_size, **sharded))


def _heads(x, module):
    """(B, S, H * D) -> (B, S, H, D) view."""
    return x.view(*x.shape[:2], module.n_heads, module.key_value_proj_dim)


def _is_compact(position_bias) -> bool:
    return position_bias is None or position_bias.dim() == 3


def _stock_if_needed(self, hidden_states, mask, position_bias, output_attentions):
    """The stock forward's outputs when it must run instead (see ``fallback_reason``), else None.

    A stock layer 0 hands later layers HF's dense blocked bias: they then run stock too. The reverse (a patched
    layer 0 with a stock later layer) only happens when layers get different ``output_attentions`` (e.g. modules
    called one by one; attention dropout no longer makes a layer fall back) and is refused, since the stock
    forward would misread the compact bias.
    """
    reason = fallback_reason(self, output_attentions)
    if reason is None and _is_compact(position_bias):
        return None
    if not _is_compact(position_bias):
        reason = reason or "the previous layer ran the stock forward and passed its dense position_bias"
    elif position_bias is not None:
        raise RuntimeError(
            f"longattn: {type(self).__name__} must fall back to the stock forward ({reason}) but received the "
            "compact position_bias of a patched first layer; pass the same output_attentions to every encoder "
            "layer (or call longattn.revert_longattn(model))")
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


def _band_table(position_bias, r: int):
    """``(H, 2r + 1)`` band table (cast to the scores' dtype by the caller, as the stock forward adds it)."""
    return position_bias[0, :, : 2 * r + 1]


def _side_table(position_bias, r: int, G: int):
    """``(H, 2G + 1)`` side table; checks that the compact bias was made for the same number of blocks."""
    side = position_bias[0, :, 2 * r + 1 :]
    if side.shape[-1] != 2 * G + 1:
        raise ValueError(f"position_bias: a compact transient-global bias for G={(side.shape[-1] - 1) // 2} blocks "
                         f"was passed to a layer that sees G={G} (S // global_block_size)")
    return side
