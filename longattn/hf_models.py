"""Random-weight Hugging Face models with sliding-window layers, for tests and benchmarks of ``"longattn"``.

:func:`build_hf_model` makes a base model (no LM head: its output is ``last_hidden_state``) of one of the
families :data:`FAMILIES` names, tiny (for CPU tests) or with the real model's layer shapes (for benchmarks; pass
``num_hidden_layers`` to keep it small). Windows are HF's ``config.sliding_window`` (ModernBERT: its
``local_attention`` is the full window, ``2 * sliding_window``). Imports transformers when called.
"""

from __future__ import annotations

import torch

# family -> (config class, model class, shared kwargs, tiny kwargs, base kwargs). Tiny: head_dim 16, 4 heads, a
# window of 16 so that S ~ 64-200 exercises the band; one global layer next to the sliding ones where the family
# has both. Base: the real model's attention shapes (ModernBERT-base, Mistral-7B, Qwen2-7B, Gemma-3-1B, Gemma-2-2B,
# GPT-OSS-20B).
_TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=64, max_position_embeddings=1024,
             attention_dropout=0.0)
FAMILIES = {
    "modernbert": ("ModernBertConfig", "ModernBertModel",
                   dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                        embedding_dropout=0.0, mlp_dropout=0.0),
                   dict(_TINY, num_hidden_layers=3, local_attention=16, global_attn_every_n_layers=3),
                   dict(hidden_size=768, num_attention_heads=12, intermediate_size=1152, num_hidden_layers=22,
                        local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=65536)),
    "mistral": ("MistralConfig", "MistralModel", dict(vocab_size=128),
                dict(_TINY, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, sliding_window=16),
                dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=14336, num_hidden_layers=32, sliding_window=4096,
                     max_position_embeddings=65536)),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(vocab_size=128, use_sliding_window=True),
              dict(_TINY, num_hidden_layers=2, num_key_value_heads=4, sliding_window=16, max_window_layers=1),
              dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                   num_hidden_layers=28, sliding_window=4096, max_window_layers=0, max_position_embeddings=65536)),
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=128),
               dict(_TINY, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
               dict(hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                    query_pre_attn_scalar=256, intermediate_size=6912, num_hidden_layers=26, sliding_window=512,
                    max_position_embeddings=65536)),
    "gemma2": ("Gemma2Config", "Gemma2Model", dict(vocab_size=128),  # attn_logit_softcapping=50 by default
               dict(_TINY, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=16),
               dict(hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                    query_pre_attn_scalar=256, intermediate_size=9216, num_hidden_layers=26, sliding_window=4096,
                    max_position_embeddings=65536)),
    "gpt_oss": ("GptOssConfig", "GptOssModel", dict(vocab_size=128),
                dict(_TINY, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, sliding_window=16,
                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=131072),  # YaRN's default
                dict(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                     intermediate_size=2880, num_hidden_layers=24, sliding_window=128, num_local_experts=32,
                     num_experts_per_tok=4, max_position_embeddings=131072)),
}


def build_hf_config(family: str, *, size: str = "tiny", **overrides):
    """The config of :func:`build_hf_model` (same arguments, no weights)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    if size not in ("tiny", "base"):
        raise ValueError(f"size: expected 'tiny' or 'base', got {size!r}")
    config_cls, _, shared, tiny, base = FAMILIES[family]
    kwargs = {**shared, **(tiny if size == "tiny" else base), **overrides}
    if "layer_types" not in overrides and "num_hidden_layers" in overrides:
        kwargs.pop("layer_types", None)  # let the config derive the pattern for the new depth
    return getattr(transformers, config_cls)(**kwargs)


def build_hf_model(family: str, *, size: str = "tiny", attn_implementation: str = "eager", seed: int = 0,
                   dtype: torch.dtype = torch.float32, device="cpu", **overrides) -> torch.nn.Module:
    """A randomly initialised base model of ``family`` (see :data:`FAMILIES`), in eval mode.

    ``overrides`` replace config fields (e.g. ``num_key_value_heads=2`` for grouped-query attention,
    ``sliding_window``, ``num_hidden_layers``). The same ``seed`` gives the same weights for every
    ``attn_implementation``, so two models can be compared layer for layer. Pass ``"longattn"`` only after
    :func:`longattn.register_hf_attention`.
    """
    import transformers

    config = build_hf_config(family, size=size, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config)
    return model.to(device=device, dtype=dtype).eval()
