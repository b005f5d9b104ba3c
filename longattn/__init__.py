"""longattn: fused long-sequence attention (banded local, global tokens, LongT5 TGlobal) for PyTorch.

Public API (DESIGN.md section 2): :func:`local_attention`, :func:`longformer_attention`,
:func:`tglobal_attention`, :func:`block_aggregate`, :func:`tglobal_block_ids`, :func:`available_backends`.
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
]
