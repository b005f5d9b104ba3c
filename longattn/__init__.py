"""longattn: fused long-sequence attention (banded local, global tokens, LongT5 TGlobal) for PyTorch.

Public API (DESIGN.md section 2): :func:`local_attention`, :func:`longformer_attention`,
:func:`tglobal_attention`, :func:`block_aggregate`, :func:`tglobal_block_ids`, :func:`available_backends`, and their
packed variable-length versions (``*_varlen``, ``longattn.varlen_api``; conversions in ``longattn.varlen``).
Nothing here touches the GPU at import time.
"""

from . import (
    _ops,  # noqa: F401  (registers the torch.ops.longattn custom ops)
    nn,  # noqa: F401  (drop-in modules: longattn.nn.SlidingWindowAttention, ...)
    varlen,  # noqa: F401  (packed batches: longattn.varlen.pack / unpack / check_cu_seqlens)
)
from ._validation import set_debug
from .api import block_aggregate, local_attention, longformer_attention, tglobal_attention, tglobal_block_ids
from .dispatch import BackendUnavailableError, available_backends
from .hf_attention import register_hf_attention  # imports transformers only when called
from .models import apply_longattn, revert_longattn
from .varlen_api import (
    block_aggregate_varlen,
    local_attention_varlen,
    longformer_attention_varlen,
    tglobal_attention_varlen,
    tglobal_block_ids_varlen,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "apply_longattn",
    "revert_longattn",
    "register_hf_attention",
    "available_backends",
    "set_debug",
    "block_aggregate",
    "local_attention",
    "longformer_attention",
    "tglobal_attention",
    "tglobal_block_ids",
    "local_attention_varlen",
    "longformer_attention_varlen",
    "tglobal_attention_varlen",
    "block_aggregate_varlen",
    "tglobal_block_ids_varlen",
]
