"""Longformer / LED encoder self-attention on :func:`longattn.longformer_attention`.

``LEDEncoderSelfAttention`` is line for line ``LongformerSelfAttention`` (same projections, same arguments),
so one forward serves both. What the layer receives (transformers 5.x, DESIGN.md section 3):

- ``hidden_states`` ``(B, S, E)``;
- ``attention_mask`` ``(B, S)`` float: ``finfo.min`` / 0 / ``finfo.max`` for padding / local / global;
- ``is_index_masked`` ``(B, S)`` (padding), ``is_index_global_attn`` ``(B, S)`` and the Python bool
  ``is_global_attn`` (some row has a global token), all derived from that mask by the encoder.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from ..api import longformer_attention
from ..backends._longformer import global_slots
from ..varlen_api import longformer_attention_varlen
from ._common import active_seq_parallel, attention_dropout, fallback_reason, patch_state, stock_forward, warn_fallback
from ._packing import packed_layout

# The stock forward's parameters, in order; the patched forward takes the same ones.
FORWARD_PARAMS = ("hidden_states", "attention_mask", "is_index_masked", "is_index_global_attn", "is_global_attn",
                  "output_attentions")


def longformer_forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                       is_global_attn=None, output_attentions=False):
    """Drop-in for ``LongformerSelfAttention.forward`` / ``LEDEncoderSelfAttention.forward``.

    Returns ``(attn_output,)`` with ``attn_output`` ``(B, S, E)`` (padding rows exactly 0), as the stock forward
    does without ``output_attentions``. In training mode the layer's ``dropout`` (``attention_probs_dropout_prob``
    / LED's ``attention_dropout``) runs in the op on the local and the global rows' probabilities, as stock.
    """
    reason = fallback_reason(self, output_attentions)
    if reason is not None:
        warn_fallback(self, reason)
        return _stock_any_length(self, hidden_states, attention_mask, is_index_masked, is_index_global_attn,
                                 is_global_attn, output_attentions)
    B, S, E = hidden_states.shape
    H, D = self.num_heads, self.head_dim
    real, is_global = _token_masks(hidden_states, attention_mask, is_index_masked, is_index_global_attn)
    if patch_state(self).packed:
        # The encoder hands every layer the same is_index_masked: the layout is computed once per forward.
        layout = packed_layout(self, is_index_masked, is_index_masked, real, is_global, aligned_start=False)
        if layout is not None:
            return (_packed_forward(self, hidden_states, is_global, layout),)
    if is_global_attn is None:
        is_global_attn = bool(is_global.any())
    q = self.query(hidden_states).view(B, S, H, D)
    k = self.key(hidden_states).view(B, S, H, D)
    v = self.value(hidden_states).view(B, S, H, D)
    q_global = k_global = v_global = None
    # The encoder already synced once for is_global_attn; reading the per-row count costs one more sync
    # (and is a graph break under torch.compile), and only when some row has a global token.
    sp = active_seq_parallel()  # sequence-parallel: count over the whole sequence (is_global_attn is this rank's)
    num_global = sp.max_globals(is_global) if sp is not None else int(is_global.sum(1).max()) if is_global_attn else 0
    if num_global > 0:
        q_global = _project_global_queries(self.query_global, hidden_states, is_global, min(num_global, S))
        q_global = q_global.view(B, S, H, D)
        k_global = self.key_global(hidden_states).view(B, S, H, D)
        v_global = self.value_global(hidden_states).view(B, S, H, D)
    out = longformer_attention(q, k, v, self.one_sided_attn_window_size, is_global, key_padding_mask=real,
                               q_global=q_global, k_global=k_global, v_global=v_global, max_globals=num_global,
                               dropout_p=attention_dropout(self, self.dropout), backend=patch_state(self).backend,
                               seq_parallel=None if sp is None else sp.shards)
    return (out.reshape(B, S, E),)


def _packed_forward(self, hidden_states, is_global, layout):
    """``longformer_forward`` on the real tokens only (``apply_longattn(packed=True)``): ``(B, S, E)``, padding
    rows 0 as the padded patch gives them."""
    H, D = self.num_heads, self.head_dim
    x = layout.pack(hidden_states)  # (T, E)
    T, E = x.shape
    q, k, v = (proj(x).view(T, H, D) for proj in (self.query, self.key, self.value))
    glob = layout.pack(is_global)
    q_global = k_global = v_global = None
    if layout.num_global > 0:
        q_global = _project_global_queries(self.query_global, x[None], glob[None], layout.num_global).view(T, H, D)
        k_global, v_global = (proj(x).view(T, H, D) for proj in (self.key_global, self.value_global))
    out = longformer_attention_varlen(q, k, v, layout.index.cu_seqlens, layout.index.max_seqlen,
                                      self.one_sided_attn_window_size, glob, q_global=q_global, k_global=k_global,
                                      v_global=v_global, max_globals=layout.num_global,
                                      dropout_p=attention_dropout(self, self.dropout),
                                      backend=patch_state(self).backend)
    return layout.unpack(out.reshape(T, E))


def _token_masks(hidden_states, attention_mask, is_index_masked, is_index_global_attn):
    """``(real, is_global)`` ``(B, S)`` bools from what the encoder passes (only the mask's sign matters)."""
    B, S = hidden_states.shape[:2]
    if is_index_masked is None:
        is_index_masked = (attention_mask < 0) if attention_mask is not None else \
            torch.zeros(B, S, dtype=torch.bool, device=hidden_states.device)
    if is_index_global_attn is None:
        is_index_global_attn = (attention_mask > 0) if attention_mask is not None else \
            torch.zeros(B, S, dtype=torch.bool, device=hidden_states.device)
    return ~is_index_masked, is_index_global_attn


def _project_global_queries(query_global, hidden_states, is_global, num_global):
    """``query_global`` of the global tokens only, scattered into a ``(B, S, E)`` tensor.

    Only the global rows are ever read, so projecting every token (as the stock model's key/value do) would
    waste a full ``S x E x E`` matmul. Slots past a row's count point at distinct non-global tokens: their rows
    hold garbage that is never read (and so gets no gradient).
    """
    B, S, E = hidden_states.shape
    _, slot_pos, _ = global_slots(is_global, None, num_global)  # (B, G): the op's own slot order
    index = slot_pos[:, :, None].expand(B, num_global, E)
    rows = query_global(torch.gather(hidden_states, 1, index))  # (B, G, E)
    return hidden_states.new_zeros(B, S, rows.shape[-1]).scatter(1, index, rows)


def _stock_any_length(self, hidden_states, attention_mask, is_index_masked, is_index_global_attn, is_global_attn,
                      output_attentions):
    """The stock forward, padding S locally when ``pad_to_window=False`` left it not a multiple of the window.

    The stock chunked code needs ``S % attention_window == 0``; padding tokens never attend nor are attended,
    so padding here and slicing back leaves every real row as the model-level padding would.
    """
    forward = stock_forward(self)
    S = hidden_states.shape[1]
    pad = (-S) % (2 * self.one_sided_attn_window_size)
    if pad == 0:
        return forward(hidden_states, attention_mask, is_index_masked, is_index_global_attn, is_global_attn,
                       output_attentions)
    real, is_global = _token_masks(hidden_states, attention_mask, is_index_masked, is_index_global_attn)
    if attention_mask is None:
        attention_mask = torch.where(is_global, torch.finfo(hidden_states.dtype).max, 0.0)
        attention_mask = torch.where(real, attention_mask, torch.finfo(hidden_states.dtype).min)
    outputs = forward(F.pad(hidden_states, (0, 0, 0, pad)),
                      F.pad(attention_mask, (0, pad), value=torch.finfo(attention_mask.dtype).min),
                      F.pad(~real, (0, pad), value=True), F.pad(is_global, (0, pad), value=False),
                      is_global_attn, output_attentions)
    # (attn_output (B, S', E), [local probs (B, S', H, window + G + 1), [global probs (B, H, G, S')]])
    trimmed = [outputs[0][:, :S]]
    if len(outputs) > 1:
        trimmed.append(outputs[1][:, :S])
    if len(outputs) > 2:
        trimmed.append(outputs[2][..., :S])
    return tuple(trimmed)


def no_pad_to_window_size(returns: tuple[str, ...]):
    """A ``_pad_to_window_size`` that pads nothing, for a model class whose stock one returns
    ``(padding_len, *returns)`` and takes the same names as parameters (plus ``pad_token_id``)."""

    def _pad_to_window_size(self, *args, **kwargs):
        bound = inspect.signature(type(self)._pad_to_window_size).bind(self, *args, **kwargs)
        return (0, *(bound.arguments.get(name) for name in returns))

    return _pad_to_window_size


def row_mask_only(stock):
    """LED's ``_prepare_4d_attention_mask_inverted`` without its ``(B, 1, T, S)`` temporaries.

    ``LEDEncoder.forward`` builds its ``(B, S)`` float mask as ``stock(mask, dtype)[:, 0, 0, :]``: the stock
    function materialises ``(B, 1, S, S)`` tensors first (1 GiB each at S = 16384 in fp32) to keep one row of
    them. Every element of the result depends only on ``mask[b, j]``, so the stock arithmetic on one target row,
    broadcast to ``T`` rows, gives bitwise the same values with O(B * S) memory (as a read-only expanded view).
    """

    @functools.wraps(stock)  # also keeps the stock function as ``prepare.__wrapped__``
    def prepare(mask, dtype, tgt_len=None):
        bsz, src_len = mask.size()
        return stock(mask, dtype, tgt_len=1).expand(bsz, 1, src_len if tgt_len is None else tgt_len, src_len)

    return prepare
