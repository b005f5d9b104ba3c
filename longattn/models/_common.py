"""What every patched forward shares: the per-instance patch state and the one-time fallback warnings."""

from __future__ import annotations

import contextvars
import dataclasses
import warnings
from collections.abc import Callable

import torch

_STATE_ATTR = "_longattn_patch"
_warned: set[str] = set()
# Set by longattn.distributed.sequence_parallel (a SeqParallelContext) for the duration of its block.
SEQ_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("longattn_sequence_parallel", default=None)


def active_seq_parallel():
    """The active ``longattn.distributed.sequence_parallel`` context (its ``.shards`` go to the ops'
    ``seq_parallel=``), or None outside one: the one place the patched forwards learn they run sharded."""
    return SEQ_PARALLEL.get()


@dataclasses.dataclass
class PatchState:
    """Stored on a patched module instance (a plain attribute: never in the state dict).

    ``original`` is the instance-level ``forward`` the module had before patching, or None when it used its
    class's (the usual case); revert restores exactly that.
    """

    original: Callable | None
    backend: str
    packed: bool = False  # apply_longattn(packed=True): run on the real tokens only (longattn.models._packing)


def patch_state(module) -> PatchState | None:
    return module.__dict__.get(_STATE_ATTR)


def stock_forward(module) -> Callable:
    """The forward the module would run unpatched, bound to it."""
    state = patch_state(module)
    if state is not None and state.original is not None:
        return state.original
    return type(module).forward.__get__(module)


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` comes up in this process (fallbacks happen every layer, every step)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def fallback_reason(module, output_attentions: bool) -> str | None:
    """Why a fused kernel cannot stand in for ``module``'s stock forward on this call, or None.

    ``output_attentions=True`` asks for the attention probabilities, which a fused kernel never forms.
    (Attention dropout in training runs in the fused ops: ``attention_dropout``.)
    """
    if output_attentions:
        return "output_attentions=True: the fused kernels never form attention probabilities"
    return None


def attention_dropout(module, p: float) -> float:
    """The ``dropout_p`` of a patched layer's op: the stock module's attention-probability dropout ``p`` in
    training mode (where stock applies ``nn.functional.dropout(probs, p, training=True)``), 0 in eval mode."""
    return float(p) if module.training else 0.0


def warn_fallback(module, reason: str) -> None:
    if SEQ_PARALLEL.get() is not None:  # the stock forward would see one shard as the whole sequence
        raise ValueError(f"sequence_parallel: {type(module).__name__} cannot run sharded ({reason})")
    warn_once(f"{type(module).__name__}:{reason}",
              f"longattn: {type(module).__name__} falls back to the stock Hugging Face forward ({reason}).")


_PER_FORWARD_ATTR = "_longattn_per_forward"


def once_per_forward(carrier, mask, key: tuple, make):
    """``make()``, computed by the first layer of a forward and reused by the others.

    The encoder hands every layer the same ``mask`` object and some object made once per forward (the
    ``carrier``: LongT5 layer 0's compact ``position_bias``, Longformer's ``is_index_masked``), so what a layer
    derives from the mask (block ids, the key padding mask, the packed layout) rides on the carrier as a plain Python
    attribute, one entry per ``key``: no host sync after the first layer, nothing in the graph, gone with the
    carrier. Reuse needs the layer's own ``mask`` data and ``key``, so a carrier from another call never lends its
    values. The attribute sits on the carrier's storage and the mask is compared by data (storage, offset, sizes,
    strides, version): reentrant checkpointing hands each layer, in its forward and its recompute, detached copies
    or aliases of the carrier and the mask, which share both. Where the carrier is None, has no storage, or under
    ``torch.compile`` (which traces every layer anyway), the value is computed again.
    """
    if carrier is None or torch.compiler.is_compiling():
        return make()
    holder = _storage(carrier)
    holder = carrier if holder is None else holder
    shared = getattr(holder, _PER_FORWARD_ATTR, None)
    mine = _data_id(mask)
    if shared is None or not (shared[0] is mask or (mine is not None and _same_data(shared[1], mine))):
        shared = (mask, mine, {})
        setattr(holder, _PER_FORWARD_ATTR, shared)
    if key not in shared[2]:
        shared[2][key] = make()
    return shared[2][key]


def _storage(x):
    """``x.untyped_storage()`` (one Python object per storage, shared by views and detached copies), or None for
    a tensor without one (wrapper subclasses, functorch's batched tensors)."""
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None


def _data_id(x):
    """``(storage, offset, sizes, strides, dtype, version)`` of a tensor's data now, or None (None, no storage,
    an inference tensor: no version counter); equal for ``x`` and its detached copies until one is modified."""
    storage = None if x is None else _storage(x)
    if storage is None:
        return None
    try:
        return storage, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x._version
    except RuntimeError:
        return None


def _same_data(a, b) -> bool:
    return a is not None and b is not None and a[0] is b[0] and a[1:] == b[1:]
