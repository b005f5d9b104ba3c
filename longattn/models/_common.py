"""What every patched forward shares: the per-instance patch state and the one-time fallback warnings."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

_STATE_ATTR = "_longattn_patch"
_warned: set[str] = set()


@dataclasses.dataclass
class PatchState:
    """Stored on a patched module instance (a plain attribute: never in the state dict).

    ``original`` is the instance-level ``forward`` the module had before patching, or None when it used its
    class's (the usual case); revert restores exactly that.
    """

    original: Callable | None
    backend: str


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
    warn_once(f"{type(module).__name__}:{reason}",
              f"longattn: {type(module).__name__} falls back to the stock Hugging Face forward ({reason}).")
