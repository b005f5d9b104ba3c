"""``attn_implementation="longattn"``: longattn's banded ops as a Hugging Face attention implementation.

:func:`register_hf_attention` registers two functions with transformers (5.x; checked against 5.24):

- a *mask function* (``AttentionMaskInterface``) that returns a :class:`LongattnMask`: the ``(B, kv_len)``
  padding mask plus the recipe of the mask HF would have built. Nothing of size ``S x S`` is built unless a layer
  delegates to a dense implementation, and then once per forward, shared by the delegating layers;
- an *attention function* (``AttentionInterface``) that runs sliding-window layers on
  :func:`longattn.local_attention` (or :func:`longattn.tglobal_attention` with one side key for attention sinks)
  and delegates everything else to HF's own dense functions with a one-time warning naming the reason.

HF's window semantics, as the attention function maps them to longattn's ``window=(left, right)``:

- causal layers (Mistral, Qwen2, Gemma 2/3, GPT-OSS, ...) attend ``q - sliding_window < kv <= q``:
  ``window = (sliding_window - 1, 0)``;
- bidirectional layers attend ``|q - kv| <= sliding_window - 1``: ``window = (sliding_window - 1,) * 2``
  (ModernBERT passes ``sliding_window = config.sliding_window + 1 = local_attention // 2 + 1`` and masks
  ``|q - kv| <= local_attention // 2``).

Attention sinks (GPT-OSS ``s_aux``, one learnable logit per head in the softmax denominator) are one side key
with zero key and value whose ``side_bias`` is the sink logit, so the sink gets its gradient from the op.

Grouped-query and multi-query attention (``num_key_value_heads < num_attention_heads``) run on the fast path:
the ops take K/V with ``H_kv`` heads as they are (query head h reads K/V head ``h // (H // H_kv)``, as HF's
``repeat_kv``), with no repeated K/V in memory, on the backends that take grouped K/V (torch, Triton; ``"auto"``
skips CUDA for them, an explicit ``backend="cuda"`` raises).

Delegated (see :func:`fast_path_blocker`): global layers, KV-cache decoding and cross-attention
(``q_len != kv_len``), extra mask patterns, softcap, ``output_attentions``; to HF's ``sdpa``, or to the model's
own eager function where sdpa cannot express the call (softcap, sinks, ``output_attentions``). Attention dropout
in training is not delegated: it runs in the op (``dropout_p``).

Importing this module does not import transformers; :func:`register_hf_attention` does.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_backend_name
from .api import local_attention, tglobal_attention
from .models._common import fallback_reason, warn_once

NAME = "longattn"

# The backend the registered attention function passes to the ops; set by register_hf_attention.
_backend = "auto"


def register_hf_attention(*, backend: str = "auto") -> str:
    """Register ``"longattn"`` with transformers' attention and mask interfaces; returns ``"longattn"``.

    Idempotent. Afterwards ``Model.from_pretrained(..., attn_implementation="longattn")``,
    ``Model(config)`` with ``config._attn_implementation = "longattn"`` and
    ``model.set_attn_implementation("longattn")`` all work. ``backend`` ("auto", "cuda", "triton", "torch") is
    what the sliding-window layers of every model using ``"longattn"`` run on; calling again with another
    backend switches it.
    """
    global _backend
    check_backend_name(backend)
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("register_hf_attention needs transformers >= 4.53 (AttentionInterface and "
                          "AttentionMaskInterface); it was checked with transformers 5.24") from e
    _backend = backend
    AttentionInterface.register(NAME, longattn_attention_forward)
    AttentionMaskInterface.register(NAME, longattn_mask)
    return NAME


class LongattnMask:
    """What the ``"longattn"`` mask function returns instead of HF's dense ``(B, 1, q_len, kv_len)`` mask.

    Attributes:
        padding: ``(B, >= kv_offset + kv_len)`` bool, True = a real token, or None (no padding mask given).
        causal: built by one of HF's causal mask creators (else a bidirectional one).
        local_size: the ``local_size`` HF passed (the config's sliding window; None for full attention).
        plain: no overlay beyond the causal/bidirectional, window and padding pattern (no packed sequences,
            block ids or custom ``or``/``and`` mask functions), so the band op can express the mask.
        q_length, kv_length, q_offset, kv_offset: the sizes HF derived (offsets > 0 with a KV cache).

    :meth:`dense` builds HF's own mask from the same arguments, once per kind, for layers that delegate.
    """

    def __init__(self, hf_kwargs: dict):
        from transformers.masking_utils import prepare_padding_mask

        self._hf_kwargs = hf_kwargs
        self._dense: dict[str, Tensor | None] = {}
        self.q_length, self.kv_length = hf_kwargs["q_length"], hf_kwargs["kv_length"]
        self.q_offset, self.kv_offset = hf_kwargs.get("q_offset", 0), hf_kwargs.get("kv_offset", 0)
        self.padding = prepare_padding_mask(hf_kwargs.get("attention_mask"), self.kv_length, self.kv_offset)
        self.local_size = hf_kwargs.get("local_size")
        # HF's bidirectional creators pass `allow_is_bidirectional_skip`, the causal ones never do (5.24).
        self.causal = "allow_is_bidirectional_skip" not in hf_kwargs
        # Custom or/and mask functions set use_vmap; packed sequences and block ids turn off the causal skip
        # (bidirectional creators always pass allow_is_causal_skip=False, so it means nothing there).
        overlay = hf_kwargs.get("use_vmap", False) or (self.causal and not hf_kwargs.get("allow_is_causal_skip", True))
        self.plain = not overlay

    def key_padding_mask(self) -> Tensor | None:
        """``(B, kv_len)`` bool, True = a real key, aligned with the keys of this forward (or None)."""
        if self.padding is None:
            return None
        return self.padding[:, self.kv_offset : self.kv_offset + self.kv_length]

    def window(self) -> tuple[int, int] | None:
        """The band this mask allows as longattn's ``(left, right)``, None for full attention."""
        if self.local_size is None:
            return None
        # Causal creators mask `kv > q - local_size`; bidirectional ones `|q - kv| <= local_size`.
        return (self.local_size - 1, 0) if self.causal else (self.local_size, self.local_size)

    def dense(self, kind: str) -> Tensor | None:
        """HF's mask for ``kind`` "sdpa" (bool, or None when sdpa's own ``is_causal`` covers it) or "eager"
        (additive float) of shape ``(B, 1, q_len, kv_len)``; built on first use, then reused."""
        if kind not in self._dense:
            from transformers.masking_utils import eager_mask, sdpa_mask

            self._dense[kind] = (sdpa_mask if kind == "sdpa" else eager_mask)(**self._hf_kwargs)
        return self._dense[kind]


def longattn_mask(**hf_kwargs) -> LongattnMask:
    """The mask function registered for ``"longattn"`` (called by HF's ``create_*_mask`` with keywords)."""
    return LongattnMask(hf_kwargs)


def _layer_window(sliding_window: int, causal: bool) -> tuple[int, int]:
    """HF's ``sliding_window`` kwarg as longattn's window (see the module docstring)."""
    return (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)


def fast_path_blocker(module, query: Tensor, key: Tensor, attention_mask, *, sliding_window, dropout: float,
                      softcap, position_bias, is_causal, output_attentions: bool) -> str | None:
    """Why this call cannot run on longattn's band op (a reason for the warning), or None when it can."""
    if sliding_window is None:
        return "global attention: the layer has no sliding window"
    if getattr(module, "is_cross_attention", False):
        return "cross-attention"
    if not isinstance(attention_mask, LongattnMask):
        return ("no longattn mask reached the layer (a prepared 4-D mask was passed, a paged cache is used, or the "
                "module was called on its own)")
    S = query.shape[2]
    m = attention_mask
    offsets_zero = all(isinstance(o, int) and o == 0 for o in (m.q_offset, m.kv_offset))
    if key.shape[2] != S or (m.q_length, m.kv_length) != (S, S) or not offsets_zero:
        return "decoding or chunked prefill with a KV cache, or cross-attention (q_len != kv_len)"
    if not m.plain:
        return "extra mask patterns (packed sequences, block ids or a custom or/and mask function)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal != m.causal or _layer_window(sliding_window, causal) != m.window():
        return (f"the layer's window (sliding_window={sliding_window}, causal={causal}) does not match its mask "
                f"(local_size={m.local_size}, causal={m.causal})")
    if softcap is not None:
        return "attention logit softcapping is not in the kernels"
    if position_bias is not None:
        return "a dense position_bias"
    return fallback_reason(module, output_attentions)  # dropout runs in the op (``banded_attention``)


def _model_eager(module):
    """The ``eager_attention_forward`` of the module's own modeling file (it knows softcap, sinks, ...)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"longattn: {type(module).__name__} needs its model's eager attention to fall "
                                  "back to, and its module defines no eager_attention_forward")
    return fn


def delegate(reason: str, module, query, key, value, attention_mask, **kwargs):
    """Run the call on HF's ``sdpa`` function, or on the model's own eager function when sdpa cannot express it
    (softcap, attention sinks, ``output_attentions``), with HF's dense mask; warn once per reason."""
    eager = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("output_attentions")
    name, impl = type(module).__name__, "eager" if eager else "sdpa"
    warn_once(f"hf:{name}:{reason}", f"longattn: {name} delegates to HF's {impl} attention ({reason}).")
    if isinstance(attention_mask, LongattnMask):
        attention_mask = attention_mask.dense(impl)
    if eager:
        return _model_eager(module)(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def banded_attention(query: Tensor, key: Tensor, value: Tensor, mask: LongattnMask, window: tuple[int, int],
                     scaling: float | None, s_aux: Tensor | None, dropout: float = 0.0) -> Tensor:
    """The fast path on HF's ``(B, H, S, D)`` tensors: returns ``(B, S, H, D)`` as HF's attention functions do.

    Sinks: one side key with zero key and value; ``query_block = 0`` everywhere, so the bias index
    ``g - query_block[i] + G`` is 1 and ``side_bias[:, 1]`` (the sink logit) is its score.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device) and len({query.dtype, key.dtype, value.dtype}) > 1:
        # Under autocast, models hand over mixed dtypes (an fp32 rotary output next to a bf16 projection); the
        # matmuls of eager/sdpa would run in the autocast dtype, so the op does too.
        query, key, value = (x.to(torch.get_autocast_dtype(device)) for x in (query, key, value))
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D) views, last dim contiguous
    B, S, H, D = q.shape
    scale = D**-0.5 if scaling is None else float(scaling)
    kpm = mask.key_padding_mask()
    if s_aux is None:
        return local_attention(q, k, v, window, key_padding_mask=kpm, scale=scale, dropout_p=dropout,
                               backend=_backend)
    zeros = k.new_zeros(B, 1, k.shape[2], D)  # side keys have K's heads (grouped-query: H_kv < H)
    query_block = torch.zeros(B, S, dtype=torch.int32, device=q.device)
    side_bias = F.pad(s_aux.to(q.dtype).reshape(H, 1), (1, 1))  # (H, 2G + 1), G = 1: the sink sits at column 1
    return tglobal_attention(q, k, v, zeros, zeros, window, query_block, key_padding_mask=kpm,
                             side_bias=side_bias, scale=scale, dropout_p=dropout, backend=_backend)


def longattn_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                               dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                               softcap: float | None = None, s_aux: Tensor | None = None,
                               is_causal: bool | None = None, position_bias: Tensor | None = None, **kwargs):
    """The attention function registered as ``"longattn"`` (HF's attention-interface signature).

    Args:
        query: ``(B, H, S, D)``; key, value: ``(B, H_kv, S_kv, D)`` (HF's layout).
        attention_mask: a :class:`LongattnMask` from the registered mask function (or a tensor / None, which
            delegates).
        sliding_window, scaling, dropout, softcap, s_aux, is_causal, position_bias: as HF's models pass them.

    Returns:
        ``(attn_output (B, S, H, D), None)``, or what the dense implementation it delegates to returns.
    """
    reason = fast_path_blocker(module, query, key, attention_mask, sliding_window=sliding_window, dropout=dropout,
                               softcap=softcap, position_bias=position_bias, is_causal=is_causal,
                               output_attentions=bool(kwargs.get("output_attentions", False)))
    if reason is not None:
        extra = {name: x for name, x in (("softcap", softcap), ("s_aux", s_aux), ("is_causal", is_causal),
                                         ("position_bias", position_bias)) if x is not None}
        return delegate(reason, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **extra, **kwargs)
    window = attention_mask.window()
    # HF passes dropout = 0 in eval mode (``self.attention_dropout if self.training else 0.0``).
    return banded_attention(query, key, value, attention_mask, window, scaling, s_aux, dropout), None
